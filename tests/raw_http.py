"""A raw HTTP/1.1 client for the ingest port's edge tests: what is written is exactly what splitter reads.

aiohttp's client (and every SDK) frames requests correctly; the cases that matter here are the ones
a well-behaved client never produces: pipelining, a request split across writes at awkward places,
malformed heads, bodies that arrive a byte at a time, answers that are never read.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import orjson
from proxy_harness import WEB_KEY, basic

AUTH = basic(WEB_KEY)


def track(message_id: str, user: str = "u-1", **properties: object) -> bytes:
    return orjson.dumps({"type": "track", "event": "Edge", "userId": user, "messageId": message_id, "properties": properties})


def request(path: str, body: bytes, *extra: str, version: str = "HTTP/1.1", length: bool = True, auth: str = AUTH) -> bytes:
    head = [f"POST {path} {version}", "Host: 127.0.0.1", f"Authorization: {auth}", "Content-Type: application/json", *extra]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def head(*lines: str) -> bytes:
    return ("\r\n".join(["POST /v1/track HTTP/1.1", "Host: x", f"Authorization: {AUTH}", *lines]) + "\r\n\r\n").encode("latin-1")


class Client:
    """One raw connection to a listener (`http://host:port`)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Client:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """One response: status, headers (lower-cased names), body (Content-Length framed)."""
        async with asyncio.timeout(timeout):
            status_line = await self.reader.readline()
            assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), status_line
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection: an end of stream, or a reset, which a kernel
        sends instead when bytes the client was still writing arrive after the close (a trickle)."""
        async with asyncio.timeout(timeout):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    async def nothing_more(self, wait: float = 0.5) -> bool:
        """True when no further byte comes within `wait` seconds (or the server closed): no extra answer."""
        try:
            async with asyncio.timeout(wait):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return True

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Go away with a RST, as a crashed client does: the server sees the connection lost, not an EOF."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

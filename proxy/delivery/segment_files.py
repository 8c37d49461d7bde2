"""The spool's files: segments created with their marker, records written whole or cut back off,
fsyncs, every descriptor closed exactly once; ack notes; a segment file's repair at start-up.

This is where a full disk bites, so the rules are kept in one small place:

- `os.write` on a nearly full disk may write part of the data and return the count without an
  error. Everything is written until done or refused (`write_all`); a refused append is cut back off
  (`ftruncate`, which needs no space), so the file ends with its last whole record again.
- A new segment's descriptor is kept only once its whole format marker is written; otherwise it is
  closed at once and the file removed (a file left behind holds no whole record, and the next start
  removes it).
- `broken` marks an active file that must not be appended to any more: a cut that failed left a
  tear past its last record, or an fsync of it failed (a later fsync may succeed although pages of
  the failed one were lost, and no 200 may rest on a file with a hole before it). The spool seals it
  and starts a new one at its next write.
- A sealed file's descriptor stays open while a sync round may use it (rounds overlap: each counts
  the descriptors it took until the event loop `release`s them) and is handed to the first round
  that starts once none uses it, whose worker thread closes it after its fsyncs (closed under a
  running fsync, its number could be handed to a client socket and the fsync, or worse a write, would
  land there). The close runs in that thread, not the event loop's, and after the round's requests
  have their answer, because closing the last descriptor of a segment that was delivered and
  unlinked meanwhile frees its 16 MB on the spot (ext4: tens of ms under load). Closing goes through one list that a
  descriptor enters once, so it is closed once; only the active one is ever written.
- Ack notes are best effort (not fsynced, a crash replays a little): one that cannot be written is
  left to the next ack. A segment's note is removed before the segment, and notes without their
  segment are removed at start-up, so that no note can speak for a later segment with its id.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from proxy.delivery.spool_format import FORMAT, HEADER, MAGIC, PREFIX, REUSED, check_format, header_size, ours_at, scan
from proxy.log import get_logger

log = get_logger("splitter.spool")
READ_SLACK = 64 * 1024  # read a little past the budget: the record that stops the read is framed in it
Dirty = tuple[set[int], bool, list[int]]  # descriptors to fsync, whether the directory needs it too, sealed ones the round closes


def write_all(fd: int, parts: Sequence[bytes], offset: int) -> None:
    """Write all of `parts`, in order, at `offset`, with one `pwritev` when the disk takes it all; or
    raise: a write on a nearly full disk may write a part without an error, and the rest is then
    written on from there. (At an offset, not appended: a reused file goes on past its last record.)"""
    total = sum(map(len, parts))
    done = os.pwritev(fd, parts, offset) if len(parts) > 1 else os.pwrite(fd, parts[0], offset)
    if done == total:
        return
    if done <= 0:
        raise OSError(errno.EIO, "write made no progress")
    view = memoryview(b"".join(parts))
    while done < total:
        written = os.pwrite(fd, view[done:], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += written


def unlink(path: Path) -> None:
    """Remove `path` if it is there; a failure is logged, not raised (the next start tidies up)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("spool_file_not_removed", path=str(path), error=str(exc))


def recover_file(path: Path, segment: int) -> tuple[int, list[bytes], int, int]:
    """Segment `segment`'s file's record payloads, where they start, how many torn or corrupt bytes
    were cut off its end (fsynced), and its format. What an earlier segment left past the last record
    of a reused file is cut too, but is no tear: it does not count. Raises SpoolFormatError for
    another format's file, changing nothing."""
    data = path.read_bytes()
    start, fmt = check_format(path, data)
    payloads, valid = scan(data, start, fmt, segment)
    if valid < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(valid)
            os.fsync(handle.fileno())
    torn = 0 if data.startswith(REUSED) and not ours_at(data, valid, segment) else len(data) - valid
    return start, payloads, torn, fmt


def read_records(segment: Path, segment_id: int, offset: int, end: int, budget: int, fmt: int = FORMAT) -> list[memoryview]:
    """Whole record payloads of `segment` from `offset`, about `budget` bytes of them (at least one if
    there is one), never past `end`, the last whole record the spool knows of: a tear beyond is not read.
    Views of one read's buffer: `decode` copies each record's events out once."""
    fd = os.open(segment, os.O_RDONLY)
    try:
        data = read_at(fd, min(end - offset, budget + READ_SLACK), offset)  # scan() checks every crc it reads: no more
        if len(data) >= HEADER.size:
            wanted = header_size(fmt) + HEADER.unpack_from(data)[0]
            if len(data) < wanted <= end - offset:  # a first record larger than the read: read again, whole
                data = read_at(fd, wanted, offset)
    finally:
        os.close(fd)
    return scan(memoryview(data), 0, fmt, segment_id)[0]


def read_at(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file: a `pread` may return less than
    asked (a signal, a network file system) without that being the end."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def appended_at(segment: Path, offset: int, fmt: int = FORMAT) -> float | None:
    """When the record at `offset` was spooled; None if it cannot be read (the reader reports that)."""
    try:
        with open(segment, "rb") as handle:
            handle.seek(offset + header_size(fmt))
            prefix = handle.read(PREFIX.size)
    except OSError:
        return None
    return float(PREFIX.unpack(prefix)[0]) if len(prefix) == PREFIX.size else None


def read_note(segment: Path) -> int:
    """Records acked at the head of `segment`, per its note (0 without one)."""
    try:
        return int(segment.with_suffix(".ack").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def write_note(segment: Path, acked: int) -> bool:
    """Note `acked` for `segment`, atomically; False when it could not be written (a full disk)."""
    temporary = segment.with_suffix(".ack.tmp")
    try:
        temporary.write_text(str(acked))
        os.replace(temporary, segment.with_suffix(".ack"))
    except OSError:
        unlink(temporary)
        return False
    return True


def remove_segment(segment: Path) -> None:
    """The note first: a segment left without its note is replayed (duplicates), never the reverse."""
    unlink(segment.with_suffix(".ack"))
    unlink(segment)


def forget_orphan_notes(directory: Path, ids: set[int]) -> None:
    """Notes without their segment (a stop between the two unlinks), and notes' temporary files."""
    for path in [*directory.glob("*.ack"), *directory.glob("*.ack.tmp")]:
        stem = path.name.split(".", 1)[0]
        if path.name.endswith(".tmp") or not stem.isdigit() or int(stem) not in ids:
            unlink(path)


class SegmentFiles:
    """The active segment's descriptor, and sealed ones that a sync round may still be using."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.active: int | None = None  # the only descriptor ever written
        self.broken = False  # the active file must not be appended to (see the module docstring)
        self._dirty: set[int] = set()  # written since the last round took them
        self._sealed: list[int] = []  # each enters once, and leaves when closed
        self._in_use: dict[int, int] = {}  # descriptor: sync rounds that took it and are not over (see `release`)
        self._dir_dirty = False

    def create(self, path: Path) -> None:
        """Make `path` the active file, with its marker; or raise, leaving neither file nor descriptor."""
        assert self.active is None, "seal the active segment first"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, (MAGIC,), 0)
        except OSError:
            os.close(fd)  # never kept, so closed here and nowhere else
            unlink(path)
            raise
        self._activate(fd)

    def reuse(self, old: Path, path: Path) -> None:
        """Make `path` the active file by renaming `old` (a delivered format-4 segment's file) and
        marking it `REUSED`: its blocks are written over rather than freed and allocated again. Or
        raise, leaving `old` where it was or gone, and no descriptor."""
        assert self.active is None, "seal the active segment first"
        if path.exists():  # as create's O_EXCL: a file that could not be removed is skipped, not written over
            unlink(old)  # given up (the spool no longer counts it): never left behind uncounted
            raise OSError(errno.EEXIST, "File exists", str(path))
        try:
            fd = os.open(old, os.O_WRONLY)
        except OSError:
            unlink(old)
            raise
        try:
            write_all(fd, (REUSED,), 0)  # before the rename: a crash between the two leaves a kept file, removed at start
            os.rename(old, path)
        except OSError:
            os.close(fd)
            unlink(old)
            raise
        self._activate(fd)

    def _activate(self, fd: int) -> None:
        self.active, self.broken = fd, False
        self._dirty.add(fd)
        self._dir_dirty = True

    def append(self, parts: Sequence[bytes], offset: int) -> None:
        """Append `parts`, whole, at `offset` (the end of the active file's last whole record); or raise,
        with the file cut back to `offset` (or, if even that fails, marked `broken`)."""
        assert self.active is not None and not self.broken
        try:
            write_all(self.active, parts, offset)
        except OSError:
            if not self.cut(offset):
                self.broken = True
            raise
        finally:
            self._dirty.add(self.active)

    def cut(self, offset: int) -> bool:
        """Cut the active file back to `offset`; False (logged) if that fails."""
        assert self.active is not None
        try:
            os.ftruncate(self.active, offset)  # shrinking needs no space
        except OSError as exc:
            log.error("spool_cut_failed", directory=str(self.directory), offset=offset, error=str(exc))
            return False
        return True

    def seal(self) -> None:
        """No more writes to the active file; its descriptor is closed once no sync round needs it."""
        if self.active is not None:
            self._sealed.append(self.active)
        self.active, self.broken = None, False

    def take_dirty(self) -> Dirty:
        """As a sync round starts: what it must sync, and the sealed descriptors no round uses, which its
        thread closes. One this round or an earlier one still running syncs is left for a later round:
        closed under a running fsync, its number could be reused by a socket meanwhile."""
        fds, self._dirty = self._dirty, set()
        for fd in fds:
            self._in_use[fd] = self._in_use.get(fd, 0) + 1
        closing = [fd for fd in self._sealed if fd not in self._in_use]
        self._sealed = [fd for fd in self._sealed if fd in self._in_use]
        sync_dir, self._dir_dirty = self._dir_dirty, False
        return fds, sync_dir, closing

    def release(self, dirty: Dirty) -> None:
        """The round that took `dirty` is over (its thread is done with the descriptors, whatever the
        outcome): in the event loop, so that the counts are never updated from two threads."""
        for fd in dirty[0]:
            left = self._in_use[fd] - 1
            if left:
                self._in_use[fd] = left
            else:
                del self._in_use[fd]

    def sync(self, dirty: Dirty) -> None:
        """fsync what `take_dirty` returned; runs in a worker thread."""
        fds, sync_dir, _ = dirty
        for fd in fds:
            os.fdatasync(fd)  # the size when it grew; mtime needs no flush (a reused file often does not grow)
        if sync_dir:
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def close_sealed(self, dirty: Dirty) -> None:
        """Close the sealed descriptors `take_dirty` handed over (no round uses them); runs in the
        round's worker thread after its fsyncs, which never wait for it."""
        for fd in dirty[2]:
            try:
                os.close(fd)  # released even when close reports an error (Linux): never retried
            except OSError as exc:
                log.error("spool_close_failed", directory=str(self.directory), error=str(exc))

    def sync_failed(self, dirty: Dirty) -> None:
        fds, sync_dir, _ = dirty
        if self.active is not None and self.active in fds:
            self.broken = True
        self._dir_dirty = self._dir_dirty or sync_dir

    def close(self) -> None:
        """Sync what is unsynced (best effort: the process is stopping) and close every descriptor; no
        round is running (the group commit is idle)."""
        self.seal()
        dirty = self.take_dirty()
        try:
            self.sync((dirty[0], False, dirty[2]))
        except OSError as exc:
            log.error("spool_sync_failed", directory=str(self.directory), error=str(exc), at="close")
        self.close_sealed(dirty)
        self.release(dirty)
        self._close_sealed()

    def _close_sealed(self) -> None:
        sealed, self._sealed = self._sealed, []
        for fd in sealed:
            os.close(fd)

"""nginx baselines: what a C proxy costs for the same traffic, run from a generated config.

Two shapes, both with keep-alive to the receivers (`upstream { keepalive }`, HTTP/1.1, no
`Connection` header):
- `pass`: plain `proxy_pass` to Segment's receiver, the ceiling for a pass-through proxy;
- `split`: `split_clients` on a hash of the `X-User` header (the load generators set it per
  request) picks Segment or RudderStack as the primary, and `mirror` copies the request to the
  other one, each with its own credentials. nginx cannot read the body, so it splits per request
  rather than per event, and its mirror subrequest holds the primary's answer until it finishes.

nginx runs in the foreground (`daemon off`, one worker) from a temporary directory holding its pid,
error log and every *_temp_path, on a free 127.0.0.1 port, pinned to the proxy core. No root needed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loadtest.harness import PROXY_CORE, pin, with_children
from proxy.delivery.upstream import basic_auth

RUDDER_SHARE_PERCENT = 30  # the same share bench.yaml's catch-all rule splits to RudderStack
KEEPALIVE = 64

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
%(user)s
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(dir)s/client_body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  client_body_buffer_size 1m;  # a 30 KB batch stays in memory, never in client_body_temp_path
  client_max_body_size 4m;
  upstream segment { server %(segment)s; keepalive %(keepalive)d; }
  upstream rudderstack { server %(rudderstack)s; keepalive %(keepalive)d; }
%(routing)s
}
"""

PASS = """\
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://segment;
    }
  }"""

SPLIT = """\
  split_clients "${http_x_user}" $primary {
    %(share)d%% rudderstack;
    * segment;
  }
  map $primary $secondary { rudderstack segment; default rudderstack; }
  map $primary $primary_auth { rudderstack "%(rudder_auth)s"; default $http_authorization; }
  map $primary $secondary_auth { rudderstack $http_authorization; default "%(rudder_auth)s"; }
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      mirror /_mirror;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization $primary_auth;
      proxy_pass http://$primary;
    }
    location = /_mirror {
      internal;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization $secondary_auth;
      proxy_pass http://$secondary$request_uri;
    }
  }"""


def nginx_binary() -> str | None:
    """nginx on PATH, or Debian's /usr/sbin/nginx (not on a non-root user's PATH)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    scratch: Path

    def pids(self) -> list[int]:
        """Master and worker: both are the proxy's CPU and memory."""
        return with_children(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: fast shutdown
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.scratch, ignore_errors=True)


def start_nginx(binary: str, shape: Literal["pass", "split"], segment: str, rudderstack: str, rudder_key: str) -> Nginx:
    """Write the config for `shape` next to nginx's scratch files, start it, wait until it listens."""
    scratch = Path(tempfile.mkdtemp(prefix="splitter-nginx-"))
    port = free_port()
    rudder_auth = basic_auth(rudder_key)
    routing = (PASS if shape == "pass" else SPLIT) % {"port": port, "share": RUDDER_SHARE_PERCENT, "rudder_auth": rudder_auth}
    # As root the master would hand the worker to `nobody`, which may not read the scratch dir.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    config = CONFIG % {"dir": scratch, "user": user, "segment": segment.removeprefix("http://"),
                       "rudderstack": rudderstack.removeprefix("http://"), "keepalive": KEEPALIVE, "routing": routing}
    (scratch / "nginx.conf").write_text(config)
    with (scratch / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen([*pin(PROXY_CORE), binary, "-p", str(scratch), "-e", str(scratch / "error.log"), "-c", str(scratch / "nginx.conf")],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = (scratch / "stderr.log").read_text() + (scratch / "error.log").read_text() if (scratch / "error.log").exists() else ""
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(f"nginx exited with {process.returncode}: {error.strip()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Nginx(process, f"http://127.0.0.1:{port}", scratch)
        except OSError:
            time.sleep(0.05)
    Nginx(process, "", scratch).stop()
    raise RuntimeError("nginx did not listen within 10 s")

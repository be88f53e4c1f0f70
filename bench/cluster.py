"""Real Redis and nginx processes on loopback, for the scale-out tests and the benchmark.

Both come from Debian packages (``apt-get install redis-server nginx``; .ci/run installs them).
A missing binary fails the test with that command, never skips it: CI must run these.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX_CONF = Path(__file__).parent.parent / "deploy" / "nginx" / "nginx.conf"


def binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    raise AssertionError(f"{name} is not installed: .ci/run shows how CI installs it (redis-server, nginx, kubectl)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Redis:
    """redis-server on a free port, its data (append-only file) in ``folder``; restartable on the same port."""

    def __init__(self, folder: Path, port: int = 0):
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                   str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", ""]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(10)

    def cli(self, *args: str) -> str:
        command = [binary("redis-cli"), "-p", str(self.port), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def nginx_config(upstreams: list[int], port: int, folder: Path) -> str:
    """deploy/nginx/nginx.conf, pointed at replicas on loopback ports and listening on ``port``,
    with its pid file, logs and temporary files in ``folder``: the deployed config, tested."""
    text = NGINX_CONF.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in upstreams)
    text, n = re.subn(r"(upstream lstmd \{\n)(?:\s*server [^\n]*\n)+", lambda m: m.group(1) + servers, text)
    assert n == 1, "deploy/nginx/nginx.conf: no 'upstream lstmd' block with server lines"
    text, n = re.subn(r"listen \d+ http2;", f"listen 127.0.0.1:{port} http2;", text)
    assert n == 1, "deploy/nginx/nginx.conf: no 'listen <port> http2;' line"
    text = re.sub(r"pid [^;]*;", f"pid {folder}/nginx.pid;", text)
    text = re.sub(r"error_log [^;]*;", f"error_log {folder}/error.log warn;", text)
    text = re.sub(r"access_log [^;]*;", "access_log off;", text)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in kinds)
    return text.replace("http {\n", "http {\n" + temp, 1)


class Nginx:
    """nginx in the foreground, proxying gRPC to ``upstreams`` (ports on 127.0.0.1)."""

    def __init__(self, folder: Path, upstreams: list[int]):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = folder / "nginx.conf"
        self.config.write_text(nginx_config(upstreams, self.port, folder))
        command = [binary("nginx"), "-c", str(self.config), "-p", str(folder), "-g", "daemon off;"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(self.port)
        except AssertionError:
            self.process.kill()
            raise AssertionError(f"nginx did not start: {self.process.communicate()[1]}") from None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.communicate(timeout=10)

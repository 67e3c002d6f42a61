"""`fastblt serve` as a child process on the loopback interface, for tests and benchmarks.

The child runs in a process group of its own and is stopped through that group (SIGTERM, then
SIGKILL after a grace period), never by name; it binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def probe_context(url: str, client_cert: tuple[str | Path, str | Path] | None = None) -> ssl.SSLContext | None:
    """For a readiness probe of one's own server on this machine: over HTTPS, its certificate is
    not checked (it names the server's public host, not the loopback address probed); a server
    that requires client certificates (mutual TLS) is shown `client_cert`, a (certificate, key)."""
    if not url.startswith("https:"):
        return None
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    return context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(["--max-batch", "8"]) as srv: srv.url` -> a ready server's base URL.

    Args:
        args: extra `fastblt serve` options (host and port are set here).
        ready_timeout: seconds to wait for GET /health to answer 200.
        log: where the child's output goes (default: a temporary file, shown if it fails to start).
        env: variables added to this process's environment for the child.
        client_cert: (certificate, key) the readiness probe shows a server run with --ssl-ca-certs.
    """

    def __init__(self, args: list[str] | None = None, ready_timeout: float = 300.0, log: Path | None = None,
                 env: dict[str, str] | None = None,
                 client_cert: tuple[str | Path, str | Path] | None = None):  # fmt: skip
        self.args, self.ready_timeout, self.client_cert = list(args or []), ready_timeout, client_cert
        self.env = None if env is None else {**os.environ, **env}  # added to this process's environment
        self.port = free_port()
        self.url = f"{'https' if '--ssl-certfile' in self.args else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log
        self._own_log = log is None  # a temporary log is removed when the server stops
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "fastblt.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *self.args]  # fmt: skip
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkstemp(prefix="fastblt-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)  # fmt: skip
        deadline, context = time.monotonic() + self.ready_timeout, probe_context(self.url, self.client_cert)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastblt serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fastblt serve not ready after {self.ready_timeout} s:\n{self.output()}")

    def output(self) -> str:
        """The end of the server's output so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def group(self) -> list[int]:
        """The live processes of the server's group (the server first, then its lane workers and
        the zygote they are forked from); zombies left. Linux (/proc); empty elsewhere or before
        it starts."""
        if self.proc is None or not Path("/proc").is_dir():
            return []
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                state, _, pgid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):  # ended meanwhile
                continue
            if int(pgid) == self.proc.pid and state != "Z":
                found.append(int(proc.name))
        return sorted(found, key=lambda pid: pid != self.proc.pid)

    def workers(self) -> list[int]:
        """The server's lane worker processes (named fastblt-lane)."""
        found = []
        for pid in self.group()[1:]:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "fastblt-lane":
                    found.append(pid)
            except OSError:  # ended meanwhile
                continue
        return found

    def signal(self, sig: int) -> None:
        """Send `sig` to the server's process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the group, wait up to `grace` seconds, then SIGKILL it; the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

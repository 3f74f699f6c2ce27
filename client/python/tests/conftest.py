"""Starts the real `warden` binary (`serve --dev`, mTLS) for the test
session and gives tests its address, certificates and a CLI to create keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def warden_bin() -> Path:
    path = Path(os.environ.get("WARDEN_BIN", REPO / "target" / "debug" / "warden"))
    if not path.exists():
        subprocess.run(["cargo", "build", "-q", "-p", "warden-server", "--bin", "warden"], cwd=REPO, check=True)
    return path


@dataclass
class Warden:
    proc: subprocess.Popen
    addr: str
    metrics_addr: str
    dev_dir: Path
    stderr_lines: list

    def cli(self, *args: str) -> dict:
        out = subprocess.run(
            [str(warden_bin()), *args, "--dev-dir", str(self.dev_dir)],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout) if "--json" in args else {}

    def create_key(self, *args: str) -> dict:
        return self.cli("keys", "create", "--json", *args)

    def tls(self) -> dict:
        return {
            "ca": str(self.dev_dir / "ca.pem"),
            "cert": str(self.dev_dir / "client.pem"),
            "key": str(self.dev_dir / "client-key.pem"),
        }

    def metric(self, prefix: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def pause(self) -> None:
        """SIGSTOP: a hung process, which reads nothing and answers nothing.

        Returns once every thread has stopped: the signal only marks the
        process, and a thread busy on the other core could otherwise answer
        one more call after this returns (a CI run saw a call to a "paused"
        warden succeed).
        """
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not self._stopped():
            assert time.monotonic() < deadline, "warden did not stop on SIGSTOP"
            time.sleep(0.001)

    def _stopped(self) -> bool:
        """Whether every thread of the process is stopped (state T)."""
        tasks = Path(f"/proc/{self.proc.pid}/task")
        states = []
        for task in tasks.iterdir():
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
            # The state follows the parenthesised command name.
            states.append(stat.rsplit(")", 1)[1].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a paused process would not act on SIGTERM
            self.proc.terminate()
            self.proc.wait(timeout=20)


def start_warden(dev_dir: Path, config: Path | None = None, ready: bool = True) -> Warden:
    """``serve --dev`` in ``dev_dir``; with ``config``, that config file
    instead (its TLS files may be the ones an earlier ``--dev`` run left in
    ``dev_dir``, which ``tls()`` names). With ``ready=False`` it returns
    once the server listens, before its restart fence has passed: for a
    run that only leaves its dev certificates behind."""
    serve = ["--dev", "--dev-dir", str(dev_dir)] if config is None else ["--config", str(config)]
    proc = subprocess.Popen(
        [str(warden_bin()), "serve", *serve,
         "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RUST_LOG": "info"},
    )
    addr = metrics = None
    deadline = time.monotonic() + 30
    while addr is None:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"warden did not start: {proc.stderr.read()}")
        if line.startswith("metrics on "):
            metrics = line.split()[2]
        if line.startswith("listening on "):
            addr = line.split()[2]
        if time.monotonic() > deadline:
            raise RuntimeError("warden did not start in time")
    stderr_lines: list = []
    threading.Thread(target=lambda: [stderr_lines.append(l) for l in proc.stderr], daemon=True).start()
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    if not ready:
        return Warden(proc, addr, metrics, dev_dir, stderr_lines)
    # Requests signed before the restart fence (the start second plus the
    # future skew) are STALE; /readyz answers 200 once it has passed.
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            if urllib.request.urlopen(f"http://{metrics}/readyz", timeout=2).status == 200:
                break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("warden did not become ready in time")
        time.sleep(0.05)
    return Warden(proc, addr, metrics, dev_dir, stderr_lines)


@pytest.fixture(scope="session")
def warden(tmp_path_factory) -> Warden:
    server = start_warden(tmp_path_factory.mktemp("warden") / "dev")
    yield server
    server.stop()


@pytest.fixture
def own_warden(tmp_path) -> Warden:
    """A warden of this test's own, for tests that pause, kill or stop it."""
    server = start_warden(tmp_path / "own")
    yield server
    server.stop()


@pytest.fixture
def warden_settings(settings, warden):
    """Points the example project's WARDEN setting at the test server."""
    app = warden.create_key("--owner", "example-app", "--bearer")
    settings.WARDEN = {
        **settings.WARDEN,
        "TARGET": warden.addr,
        "CA": warden.tls()["ca"],
        "CERT": warden.tls()["cert"],
        "KEY": warden.tls()["key"],
        "APP_API_KEY": app["api_key"],
        "FAILURE_MODE": "closed",
    }
    return settings


TRANSPORTS = ("native", "grpcio")


def _require_the_compiled_transport() -> None:
    """Fails in CI (tests/run installs the compiled transport) and skips
    elsewhere when it is not installed."""
    from warden_client.client import native_transport_available

    if not native_transport_available():
        message = "warden-client-native is not installed (pip install ./client/python-native)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    """Each sync-client test runs over both transports."""
    if request.param == "native":
        _require_the_compiled_transport()
    return request.param


@pytest.fixture
def native() -> None:
    """A test of the compiled transport alone. Named first among a test's
    fixtures, so that without the transport no server is started for it."""
    _require_the_compiled_transport()

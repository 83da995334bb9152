"""`python -m jaxclf.serve` as a child process on a free port, ready to take requests (tests, benchmarks, notebooks).

    with ServerProcess(["--workdir", "runs/quickstart"]) as server:
        requests.post(server.url + "/v1/classify", files={"images": open("cat.png", "rb")})

The server binds port 0 (the system picks a free one, so nothing can take it in between) and the
port is read from uvicorn's start-up line; `__enter__` returns once /readyz answers 200.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

_RUNNING = re.compile(r"Uvicorn running on https?://[^\s:]+:(\d+)")


class ServerProcess:
    """A jaxclf.serve process started with `args` (e.g. ["--workdir", RUN, "--max_batch", "8"]) on `host`."""

    def __init__(self, args: Sequence[str], *, host: str = "127.0.0.1", env: dict | None = None,
                 cwd: str | None = None, ready_timeout: float = 600):
        self.args, self.host, self.env, self.cwd, self.ready_timeout = list(args), host, env, cwd, ready_timeout
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="jaxclf-serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> str:
        """The server's stdout and stderr, for a look after a failure."""
        return self._log.name

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jaxclf.serve", *self.args, "--host", self.host, "--port", "0"],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

    def wait_ready(self) -> None:
        """Block until /readyz answers 200; RuntimeError with the log's end if the server exits or times out."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}:\n{self.log_tail()}")
            if self.port is None:
                found = _RUNNING.search(self.log_text())
                self.port = int(found.group(1)) if found else None
            if self.port is not None and self._ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {self.ready_timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # HTTPError (503) is a URLError
            return False

    def log_text(self) -> str:
        with open(self._log.name) as f:
            return f.read()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after 30 s; the log file is removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        os.unlink(self._log.name)

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""A client of `ftlab serve` on the standard library alone (the tests, the benchmark and docs/serving.md use it):
one image per request, as a multipart file or as base64 JSON; and a server started in a child process."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_S = 180  # a worker is a spawned process: it imports torch, Lightning and timm again (slow on a busy box)


def multipart(
    field: str, filename: str, data: bytes, content_type: str = "application/octet-stream"
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str | None, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """POST `body` to `url`: the status and the JSON answer (an HTTP error's too)."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def predict(server: str, image: bytes | str | Path, as_json: bool = False, timeout: float = 60.0) -> dict[str, Any]:
    """The server's answer for one image (a file or its bytes): `classes`, `probabilities`, `top` ...; a
    RuntimeError with the server's `detail` when it answers an error."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    if as_json:
        body, content_type = json.dumps({"image": base64.b64encode(data).decode()}).encode(), "application/json"
    else:
        body, content_type = multipart("image", "image", data)
    status, answer = post(f"{server.rstrip('/')}/predict", body, content_type, timeout)
    if status != 200:
        raise RuntimeError(f"{status}: {answer.get('detail')}")
    return answer


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A running `ftlab serve`: its process, address and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_S) -> ServerProcess:
        """Itself, once `GET /health` answers 200; a RuntimeError with its log if it ends or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server ended with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout:.0f} s:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM, then its exit status once it has drained (SIGKILL after 60 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_server(model: str | Path, log: Path, *options: str, cwd: Path | None = None) -> ServerProcess:
    """`ftlab serve --ckpt_path <model>` started in a child process on a free port, with `options` (`--max_batch_size=8`
    ...) and its output in `log`; `wait_ready` waits for it."""
    port = free_port()
    repo = Path(__file__).resolve().parents[2]  # this checkout, importable by the child
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lightning_modules.cli.main", "serve", "--ckpt_path", str(model), "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen([*cmd, *options], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return ServerProcess(process, f"http://127.0.0.1:{port}", log)

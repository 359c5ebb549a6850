"""A client of `ftlab serve` on the standard library alone (the tests, the benchmark and docs/serving.md use it):
one image per request, as a multipart file or as base64 JSON."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any


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

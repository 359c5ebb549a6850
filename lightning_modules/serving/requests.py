"""What a request to `POST /predict` must be, checked before it reaches LitServe: an image as a multipart file field
`image`, or JSON `{"image": "<base64>"}`. Anything else is a 4xx JSON error naming what was wrong.

`ImageRequests` is an ASGI middleware in LitServe's HTTP processes. It answers the mistakes of the envelope (wrong
content type, empty or oversized body, JSON that does not parse or lacks the key, a form without the field) and
hands every other request on as JSON `{"image": "<base64>"}`, the one shape the inference workers read. LitServe
alone would answer those mistakes with a 500 and a traceback (it parses any body that is not a form as JSON, and a
hook that raises fails every request of its batch).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("finetune_lab.serve")

FIELD = "image"  # the multipart field and the JSON key that hold the image
MAX_BODY = 50 * 1024 * 1024  # bytes of a request body (a 48-megapixel phone photo is about 20 MB)
ACCEPTED = 'send multipart/form-data with a file field \'image\', or application/json {"image": "<base64>"}'


class Rejected(NamedTuple):
    """A request that cannot be answered with a prediction: the HTTP status and what was wrong."""

    status: int
    detail: str


class BadRequest(Exception):
    """A request that is not an image in one of the accepted shapes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.rejected = Rejected(status, detail)


def error_response(rejected: Rejected) -> JSONResponse:
    """The JSON error answer, `{"detail": ...}` as FastAPI and LitServe answer theirs."""
    return JSONResponse({"detail": rejected.detail}, status_code=rejected.status)


def log_rejected(rejected: Rejected) -> None:
    """The one log line of a request answered with an error."""
    logger.warning("rejected request (%d): %s", rejected.status, rejected.detail)


class ImageRequest(BaseModel):
    """What reaches the inference workers: the image, base64 (LitServe parses and checks the JSON body into it)."""

    image: str


def json_image(payload: Any) -> bytes:
    """The image of a JSON payload `{"image": "<base64>"}`, or a BadRequest naming what is wrong with it."""
    if not isinstance(payload, dict):
        raise BadRequest(400, f"JSON body is a {type(payload).__name__}, not an object with the key 'image'")
    if FIELD not in payload:
        keys = ", ".join(repr(k) for k in list(payload)[:5]) or "none"
        raise BadRequest(400, f"JSON body has no key 'image' (its keys: {keys}); {ACCEPTED}")
    return base64_image(payload[FIELD])


def base64_image(value: Any) -> bytes:
    """The bytes of a base64 image (a `data:` URL too), or a BadRequest."""
    if not isinstance(value, str):
        raise BadRequest(400, f"JSON 'image' is a {type(value).__name__}, not a base64 string")
    try:
        data = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(400, f"JSON 'image' is not valid base64 ({err})") from None
    if not data:
        raise BadRequest(400, "empty image: JSON 'image' holds no bytes")
    return data


async def read_image(request: Request, max_body: int = MAX_BODY) -> bytes:
    """The image bytes of a request to `/predict`, or a BadRequest (415 content type, 413 size, 400 the rest)."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise BadRequest(415, f"content type {content_type or '(none)'!r} is not accepted: {ACCEPTED}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise BadRequest(413, f"body of {int(declared):,} bytes is above the limit of {max_body:,}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise BadRequest(413, f"body is above the limit of {max_body:,} bytes")
    if not body:
        raise BadRequest(400, f"empty body: {ACCEPTED}")
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise BadRequest(400, f"body is not valid JSON ({err})") from None
        return json_image(payload)
    return await form_image(request, body)


async def form_image(request: Request, body: bytes) -> bytes:
    """The file of the multipart field `image` in `body`, or a BadRequest."""

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=4, max_fields=16) as form:
            upload = form.get(FIELD)
            if upload is None:
                fields = ", ".join(repr(k) for k in list(form.keys())[:5]) or "none"
                raise BadRequest(400, f"form has no field 'image' (its fields: {fields}); {ACCEPTED}")
            if isinstance(upload, str):
                raise BadRequest(400, "form field 'image' is text, not a file (curl -F image=@photo.jpg)")
            data = await upload.read()
    except (MultiPartException, HTTPException, ValueError) as err:  # Starlette answers a broken form so
        raise BadRequest(400, f"multipart body cannot be parsed ({getattr(err, 'detail', err)})") from None
    if not data:
        raise BadRequest(400, "empty image: form field 'image' holds no bytes")
    return data


class ImageRequests:
    """ASGI middleware before LitServe's endpoint `path`: answers a malformed request with its 4xx JSON error
    (logged once) and passes every other one on as JSON `{"image": "<base64>"}`."""

    def __init__(self, app: ASGIApp, path: str = "/predict", max_body: int = MAX_BODY) -> None:
        self.app = app
        self.path = path
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check and rewrite a POST to `path`; anything else goes through untouched."""
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            image = await read_image(Request(scope, receive), self.max_body)
        except BadRequest as err:
            log_rejected(err.rejected)
            await error_response(err.rejected)(scope, receive, send)
            return
        body = json.dumps({FIELD: base64.b64encode(image).decode("ascii")}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        given = False

        async def rewritten() -> Message:
            nonlocal given
            if given:
                return await receive()  # the client's disconnect, when it comes
            given = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, rewritten, send)

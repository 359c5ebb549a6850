"""Requests for `ftlab serve` from a test (the server itself starts through `lightning_modules.serving.client`):
images that are broken in the ways a client can break them."""

from __future__ import annotations

import io
import struct
import zlib

from tests.helpers.data import photo


def png_header(width: int, height: int) -> bytes:
    """A PNG file that claims `width` x `height` pixels in its header and holds one row (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + chunk(b"IEND", b"")
    )


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small JPEG photo."""
    out = io.BytesIO()
    photo(seed, size).save(out, "JPEG")
    return out.getvalue()

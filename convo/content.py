"""Content blocks: normalizing what people write, checking what the API would refuse, and moving
image/document bytes out to blobs (stored once by sha256) and back in at replay.

Replies from the API are never passed through `normalize`: they are stored exactly as received,
unknown block types included, because newer models reject a history whose earlier turns changed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from convo.errors import ContentError
from convo.types import Block

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
DOCUMENT_MEDIA_TYPES = ("application/pdf",)
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # the API's per-image limit, on the base64 string
MAX_IMAGE_SIDE = 8000
MAX_DOCUMENT_BYTES = 32 * 1024 * 1024
# Far beyond any model's context window (about 4 characters a token); a bigger turn is a mistake.
MAX_TEXT_CHARS = 4_000_000
BLOB_SOURCE = "convo_blob"

USER_BLOCK_TYPES = frozenset({"text", "image", "document", "tool_result", "search_result"})
ASSISTANT_BLOCK_TYPES = frozenset({"text", "tool_use"})
TOOL_RESULT_BLOCK_TYPES = frozenset({"text", "image", "document", "search_result"})


@dataclass(frozen=True, slots=True)
class BlobData:
    sha256: str
    media_type: str
    data: bytes


def sniff_media_type(data: bytes) -> str | None:
    """The media type the bytes really are, whatever a file name or caller claims."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    return None


def image_size(data: bytes, media_type: str) -> tuple[int, int] | None:
    """(width, height) read from the image header, or None when the header is not understood."""
    try:
        if media_type == "image/png" and len(data) >= 24 and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if media_type == "image/gif" and len(data) >= 10:
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if media_type == "image/webp" and len(data) >= 30:
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
        if media_type == "image/jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise ContentError(f"{where}: text must be a string")
    if not text.strip():
        raise ContentError(f"{where}: text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise ContentError(
            f"{where}: text of {len(text):,} characters is over convo's limit of "
            f"{MAX_TEXT_CHARS:,} (larger than any model's context window)"
        )


def _decode_base64(data: Any, where: str) -> bytes:
    if not isinstance(data, str):
        raise ContentError(f"{where}: base64 data must be a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ContentError(f"{where}: data is not valid base64") from None


def check_media(data: bytes, claimed: str | None, where: str, *, image: bool) -> str:
    """The real media type of image or document bytes, refusing a mismatch or an oversize."""
    actual = sniff_media_type(data)
    allowed = IMAGE_MEDIA_TYPES if image else DOCUMENT_MEDIA_TYPES
    if actual is None or actual not in allowed:
        what = "an image (JPEG, PNG, GIF or WebP)" if image else "a PDF"
        raise ContentError(f"{where}: the bytes are not {what}")
    if claimed and claimed != actual:
        raise ContentError(f"{where}: claims {claimed} but the bytes are {actual}")
    if image:
        # The API counts the base64 string ("image exceeds 5 MB maximum: N bytes > 5242880
        # bytes", N being about 4/3 of the file size), not the decoded bytes.
        encoded = 4 * ((len(data) + 2) // 3)
        if encoded > MAX_IMAGE_BYTES:
            raise ContentError(
                f"{where}: {len(data):,} bytes ({encoded:,} as base64) is over the API's limit "
                f"of {MAX_IMAGE_BYTES:,} bytes of base64 per image"
            )
    elif len(data) > MAX_DOCUMENT_BYTES:
        raise ContentError(
            f"{where}: {len(data):,} bytes is over the API's limit of {MAX_DOCUMENT_BYTES:,} bytes"
        )
    if image:
        size = image_size(data, actual)
        if size is None or min(size) < 1:
            # Its limits could not be checked, and the API would refuse it on every send.
            raise ContentError(f"{where}: the image's header cannot be read: it is truncated or damaged")
        if max(size) > MAX_IMAGE_SIDE:
            raise ContentError(
                f"{where}: {size[0]}x{size[1]} px is over the API's limit of "
                f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
            )
    return actual


def image_block(path: str | Path) -> Block:
    """An image block from a file, its media type taken from the bytes, not the name."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ContentError(f"cannot read image {p}: {e.strerror or e}") from None
    media_type = check_media(data, None, f"image {p}", image=True)
    return {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": media_type,
            "data": base64.b64encode(data).decode(),
        },
    }


def check_json(value: Any, where: str) -> None:
    """Refuse what JSON cannot carry exactly (NaN, sets, bytes, huge ints, lone surrogates,
    non-string keys): stored history must be byte-for-byte what is sent."""
    try:
        # orjson first: it refuses nesting past 255 levels (convo could never send it), where
        # json would recurse until Python's own limit.
        orjson.dumps(value)
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, OverflowError, orjson.JSONEncodeError) as e:
        raise ContentError(f"{where}: not valid JSON content ({str(e).splitlines()[0][:120]})") from None


def normalize(content: str | Block | list[Block], role: str, *, where: str = "turn") -> list[Block]:
    """What a person wrote as a validated block list: a string becomes one text block."""
    if isinstance(content, str):
        _check_text(content, where)
        check_json(content, where)
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list) or not content:
        raise ContentError(f"{where}: content must be a non-empty string or list of blocks")
    allowed = USER_BLOCK_TYPES if role == "user" else ASSISTANT_BLOCK_TYPES
    blocks = [_check_block(b, allowed, f"{where} block {i}") for i, b in enumerate(content)]
    check_json(blocks, where)
    return blocks


def _check_block(block: Any, allowed: frozenset[str], where: str) -> Block:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ContentError(f"{where}: a content block must be an object with a 'type'")
    kind = block["type"]
    if kind not in allowed:
        raise ContentError(
            f"{where}: block type {kind!r} is not allowed here (allowed: {', '.join(sorted(allowed))})"
        )
    if "cache_control" in block:
        raise ContentError(
            f"{where}: cache_control is added when a request is built, never stored in a turn"
        )
    if kind == "text":
        _check_text(block.get("text"), where)
    elif kind in ("image", "document"):
        source = block.get("source")
        if not isinstance(source, dict):
            raise ContentError(f"{where}: {kind} block needs a 'source'")
        stype = source.get("type")
        if stype == "base64":
            data = _decode_base64(source.get("data"), where)
            actual = check_media(data, source.get("media_type"), where, image=kind == "image")
            if not source.get("media_type"):
                # The API requires it; the bytes tell what it is.
                block = {**block, "source": {**source, "media_type": actual}}
        elif stype == "url":
            if not isinstance(source.get("url"), str) or not source["url"].startswith(
                ("https://", "http://")
            ):
                raise ContentError(f"{where}: {kind} url must be http(s)")
        elif not (kind == "document" and stype in ("text", "content")):
            raise ContentError(f"{where}: unsupported {kind} source type {stype!r}")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            raise ContentError(f"{where}: tool_result needs a tool_use_id")
        inner = block.get("content")
        if isinstance(inner, list):
            checked = [
                _check_block(b, TOOL_RESULT_BLOCK_TYPES, f"{where}.content[{j}]")
                for j, b in enumerate(inner)
            ]
            if any(c is not b for c, b in zip(checked, inner, strict=True)):
                block = {**block, "content": checked}
        elif inner is not None and not isinstance(inner, str):
            raise ContentError(f"{where}: tool_result content must be a string or blocks")
        if "is_error" in block and not isinstance(block["is_error"], bool):
            raise ContentError(f"{where}: is_error must be true or false")
    elif kind == "tool_use":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise ContentError(f"{where}: tool_use needs an id and a name")
        if not isinstance(block.get("input", {}), dict):
            raise ContentError(f"{where}: tool_use input must be an object")
    return block


def extract_blobs(blocks: list[Block]) -> tuple[list[Block], list[BlobData]]:
    """Replace base64 image/document bytes by sha256 references; return the bytes to store."""
    found: list[BlobData] = []

    def walk(block: Block) -> Block:
        kind = block.get("type")
        if kind in ("image", "document"):
            source = block.get("source") or {}
            if source.get("type") == "base64":
                data = base64.b64decode(source["data"])
                media_type = sniff_media_type(data) or source.get("media_type", "")
                sha = hashlib.sha256(data).hexdigest()
                found.append(BlobData(sha, media_type, data))
                ref: dict[str, Any] = {
                    "type": BLOB_SOURCE,
                    "media_type": media_type,
                    "sha256": sha,
                    "size": len(data),
                }
                if kind == "image":
                    dims = image_size(data, media_type)
                    if dims:
                        ref["width"], ref["height"] = dims
                return {**block, "source": ref}
        if kind == "tool_result" and isinstance(block.get("content"), list):
            return {**block, "content": [walk(b) for b in block["content"]]}
        return block

    return [walk(b) for b in blocks], found


def blank_text(block: Any) -> bool:
    """A text block with nothing but whitespace: the API refuses one in history, so a reply's
    are not stored (nor imported)."""
    return (
        isinstance(block, dict) and block.get("type") == "text"
        and isinstance(block.get("text"), str) and not block["text"].strip()
    )


def blob_refs(blocks: list[Block]) -> list[dict[str, Any]]:
    """Every blob reference in a block list (tool_result contents included)."""
    refs: list[dict[str, Any]] = []
    for b in blocks:
        source = b.get("source")
        if isinstance(source, dict) and source.get("type") == BLOB_SOURCE:
            refs.append(source)
        elif b.get("type") == "tool_result" and isinstance(b.get("content"), list):
            refs.extend(blob_refs(b["content"]))
    return refs


def inline_blobs(blocks: list[Block], blobs: dict[str, bytes]) -> list[Block]:
    """The blocks as the API wants them: each blob reference back to inline base64."""

    def walk(b: Block) -> Block:
        source = b.get("source")
        if isinstance(source, dict) and source.get("type") == BLOB_SOURCE:
            data = base64.b64encode(blobs[source["sha256"]]).decode()
            return {
                **b,
                "source": {"type": "base64", "media_type": source["media_type"], "data": data},
            }
        if b.get("type") == "tool_result" and isinstance(b.get("content"), list):
            return {**b, "content": [walk(x) for x in b["content"]]}
        return b

    return [walk(b) for b in blocks]

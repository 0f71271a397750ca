"""A local, deliberately pessimistic estimate of a request's input tokens.

``POST /v1/messages/count_tokens`` is the real answer, but it can be unreachable (offline,
rate-limited, a test double). convo then still has to decide whether a request fits the context
window or a budget, and for those decisions an overestimate is the safe side: a refused send
costs a retry, an underestimate costs a 400 or an overspend. So every rule here rounds up.

The rules:
- text: UTF-8 bytes / 4, rounded up per string. About 4 characters per token for English; counting
  bytes rather than characters keeps non-Latin scripts (denser in tokens) from being undercounted.
- tools: their JSON, plus the hidden tool-use system prompt the API adds (~350 tokens).
- tool inputs, unknown blocks: their JSON.
- images: ``width * height / 750`` from the PNG / JPEG / GIF / WebP header, after the API's
  downscale (1568 px long edge, at most ~1600 tokens); the cap when the size cannot be read.
  Opus 4.7 raised the limit to a 2576 px edge (~3.75 MP, ~5000 tokens); that larger limit is
  used for it, for later models and for any model name convo cannot place.
- documents: plain text as text; base64 PDFs by size (:data:`PDF_BYTES_PER_TOKEN`).
- a few tokens of framing per message and per block.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple

from convo.capabilities import parse_model

__all__ = [
    "BLOCK_OVERHEAD_TOKENS",
    "BYTES_PER_TOKEN",
    "DEFAULT_IMAGE_TOKENS",
    "HIGH_RES_IMAGES",
    "STANDARD_IMAGES",
    "ImageLimits",
    "DOCUMENT_URL_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "PDF_BYTES_PER_TOKEN",
    "REQUEST_OVERHEAD_TOKENS",
    "TOOLS_OVERHEAD_TOKENS",
    "estimate_input_tokens",
    "estimate_text_tokens",
    "image_limits",
    "image_size",
]

BYTES_PER_TOKEN = 4
REQUEST_OVERHEAD_TOKENS = 8
MESSAGE_OVERHEAD_TOKENS = 5
BLOCK_OVERHEAD_TOKENS = 3
# The API prepends a tool-use system prompt of about 300-350 tokens whenever tools are present.
TOOLS_OVERHEAD_TOKENS = 350
PIXELS_PER_TOKEN = 750


class ImageLimits(NamedTuple):
    """The API downscales an image to ``max_edge`` px and ``max_tokens``; larger costs no more."""

    max_edge: int
    max_tokens: int


# Claude 3 to 4.6: a 1568 px long edge and about 1.15 megapixels (~1600 tokens).
STANDARD_IMAGES = ImageLimits(1568, 1600)
# Opus 4.7 and later: a 2576 px long edge and about 3.75 megapixels (~5000 tokens).
HIGH_RES_IMAGES = ImageLimits(2576, 5000)
DEFAULT_IMAGE_TOKENS = STANDARD_IMAGES.max_tokens
# PDFs cost each page's text plus an image of the page: roughly 1.5k-3k tokens for a page that
# takes 25-100 KB. 8 bytes per token overestimates text PDFs by ~2-4x (scanned ones by more);
# that is the price of not parsing the PDF.
PDF_BYTES_PER_TOKEN = 8
# A document by URL: size unknown until the API fetches it; assume a few dense pages.
DOCUMENT_URL_TOKENS = 10_000


def estimate_text_tokens(text: str) -> int:
    """Tokens of a piece of text: UTF-8 bytes / 4, rounded up."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def _json_tokens(value: Any) -> int:
    return estimate_text_tokens(json.dumps(value, ensure_ascii=False, default=str))


def image_limits(model: str | None) -> ImageLimits:
    """How far the API downscales images for ``model``: high-res for Opus 4.7+ and unknowns."""
    parsed = parse_model(model) if model else None
    if parsed is not None and parsed.known_family and parsed.version <= (4, 6):
        return STANDARD_IMAGES
    return HIGH_RES_IMAGES


def estimate_input_tokens(body: dict[str, Any]) -> int:
    """Estimated input tokens of a Messages API request ``body`` (system, tools, messages).

    Never less than the true count in ordinary use; see the module docstring for the rules.
    Malformed parts are counted by their JSON rather than rejected: validation is not this
    function's job, and it must not raise on something the API would accept.
    """
    model = body.get("model")
    count = _Counter(image_limits(model if isinstance(model, str) else None))
    total = REQUEST_OVERHEAD_TOKENS
    system = body.get("system")
    if isinstance(system, str):
        total += estimate_text_tokens(system)
    elif isinstance(system, list):
        total += count.blocks(system)
    tools = body.get("tools")
    if tools:
        total += TOOLS_OVERHEAD_TOKENS + sum(_json_tokens(_strip_cache(t)) for t in tools)
    if body.get("tool_choice"):
        total += _json_tokens(body["tool_choice"])
    for message in body.get("messages") or ():
        total += MESSAGE_OVERHEAD_TOKENS
        content = message.get("content") if isinstance(message, dict) else message
        total += count.content(content)
    return total


def _strip_cache(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "cache_control"}
    return value


class _Counter:
    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits

    def content(self, content: Any) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return estimate_text_tokens(content)
        if isinstance(content, list):
            return self.blocks(content)
        return _json_tokens(content)

    def blocks(self, blocks: Iterable[Any]) -> int:
        return sum(BLOCK_OVERHEAD_TOKENS + self.block(b) for b in blocks)

    def block(self, block: Any) -> int:
        if isinstance(block, str):
            return estimate_text_tokens(block)
        if not isinstance(block, dict):
            return _json_tokens(block)
        kind = block.get("type")
        if kind == "text":
            return estimate_text_tokens(str(block.get("text", "")))
        if kind == "thinking":
            # Earlier turns' thinking may be dropped by the API; counting it errs high.
            return estimate_text_tokens(str(block.get("thinking", "")))
        if kind == "redacted_thinking":
            return estimate_text_tokens(str(block.get("data", "")))
        if kind == "tool_use":
            name = estimate_text_tokens(str(block.get("name", "")))
            return name + _json_tokens(block.get("input", {}))
        if kind == "tool_result":
            return self.content(block.get("content"))
        if kind == "image":
            return self.image(block.get("source"))
        if kind == "document":
            return self.document(block)
        return _json_tokens(_strip_cache(block))

    def image(self, source: Any) -> int:
        limits = self.limits
        if not isinstance(source, dict) or source.get("type") != "base64":
            return limits.max_tokens
        size = image_size(str(source.get("data", "")))
        if size is None:
            return limits.max_tokens
        width, height = size
        long_edge = max(width, height)
        if long_edge > limits.max_edge:
            scale = limits.max_edge / long_edge
            width, height = round(width * scale), round(height * scale)
        return min(limits.max_tokens, math.ceil(width * height / PIXELS_PER_TOKEN))

    def document(self, block: dict[str, Any]) -> int:
        source = block.get("source")
        extra = sum(
            estimate_text_tokens(str(block[k])) for k in ("title", "context") if block.get(k)
        )
        if not isinstance(source, dict):
            return extra + _json_tokens(source)
        kind = source.get("type")
        if kind == "text":
            return extra + estimate_text_tokens(str(source.get("data", "")))
        if kind == "content":
            return extra + self.content(source.get("content"))
        if kind == "base64":
            raw_bytes = len(str(source.get("data", ""))) * 3 // 4
            return extra + math.ceil(raw_bytes / PDF_BYTES_PER_TOKEN)
        return extra + DOCUMENT_URL_TOKENS


# but pathological files, which then fall back to the default.
_HEADER_B64_CHARS = 256 * 1024
# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data_b64: str) -> tuple[int, int] | None:
    """(width, height) from the header of a base64 PNG, JPEG, GIF or WebP; None if unreadable."""
    prefix = "".join(data_b64[:_HEADER_B64_CHARS].split())
    prefix = prefix[: len(prefix) // 4 * 4]
    try:
        head = base64.b64decode(prefix)
    except (binascii.Error, ValueError):
        return None
    try:
        size = _png(head) or _gif(head) or _webp(head) or _jpeg(head)
    except (struct.error, IndexError):
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png(b: bytes) -> tuple[int, int] | None:
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return int(w), int(h)
    return None


def _gif(b: bytes) -> tuple[int, int] | None:
    if b[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", b[6:10])
        return int(w), int(h)
    return None


def _webp(b: bytes) -> tuple[int, int] | None:
    if b[:4] != b"RIFF" or b[8:12] != b"WEBP":
        return None
    chunk = b[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and b[20] == 0x2F:
        bits = int.from_bytes(b[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and b[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", b[26:30])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + length
    return None

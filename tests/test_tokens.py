from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import pytest

from convo.tokens import (
    BLOCK_OVERHEAD_TOKENS,
    DOCUMENT_URL_TOKENS,
    HIGH_RES_IMAGES,
    MESSAGE_OVERHEAD_TOKENS,
    PDF_BYTES_PER_TOKEN,
    REQUEST_OVERHEAD_TOKENS,
    STANDARD_IMAGES,
    TOOLS_OVERHEAD_TOKENS,
    estimate_input_tokens,
    estimate_text_tokens,
    image_limits,
    image_size,
)

MODEL = "claude-sonnet-4-5"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(w: int, h: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", w, h) + b"\x08\x02\0\0\0"


def jpeg(w: int, h: int, app_bytes: int = 16) -> bytes:
    app = b"\xff\xe1" + struct.pack(">H", app_bytes + 2) + b"\0" * app_bytes  # EXIF-like
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app + sof + b"\xff\xd9"


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\0\0\0"


def webp_vp8x(w: int, h: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    body += (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def webp_vp8l(w: int, h: int) -> bytes:
    bits = (w - 1) | ((h - 1) << 14)
    body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + bits.to_bytes(4, "little")
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def webp_vp8(w: int, h: int) -> bytes:
    body = b"VP8 " + struct.pack("<I", 10) + b"\0\0\0" + b"\x9d\x01\x2a" + struct.pack("<HH", w, h)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def image_block(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    source = {"type": "base64", "media_type": media_type, "data": b64(data)}
    return {"type": "image", "source": source}


def one_message(content: Any, model: str = MODEL) -> int:
    """Tokens of ``content`` alone: the estimate minus the request and message framing."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return estimate_input_tokens(body) - REQUEST_OVERHEAD_TOKENS - MESSAGE_OVERHEAD_TOKENS


def test_text_is_about_four_characters_per_token_rounded_up() -> None:
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("abcd") == 1
    assert estimate_text_tokens("abcde") == 2
    assert estimate_text_tokens("x" * 4000) == 1000


def test_non_latin_text_counts_bytes() -> None:
    # Three UTF-8 bytes per character: CJK text is denser in tokens than English.
    assert estimate_text_tokens("日本語の文章") == math.ceil(18 / 4)


def test_empty_request_is_just_overhead() -> None:
    assert estimate_input_tokens({"model": MODEL, "messages": []}) == REQUEST_OVERHEAD_TOKENS


def test_messages_system_and_overheads() -> None:
    body = {
        "model": MODEL,
        "system": "s" * 400,
        "messages": [
            {"role": "user", "content": "u" * 40},
            {"role": "assistant", "content": [{"type": "text", "text": "a" * 80}]},
        ],
    }
    expected = (
        REQUEST_OVERHEAD_TOKENS
        + 100
        + 2 * MESSAGE_OVERHEAD_TOKENS
        + 10
        + (BLOCK_OVERHEAD_TOKENS + 20)
    )
    assert estimate_input_tokens(body) == expected


def test_system_as_blocks() -> None:
    body = {
        "model": MODEL,
        "system": [{"type": "text", "text": "s" * 40, "cache_control": {"type": "ephemeral"}}],
        "messages": [],
    }
    assert estimate_input_tokens(body) == REQUEST_OVERHEAD_TOKENS + BLOCK_OVERHEAD_TOKENS + 10


def test_tools_count_their_json_plus_the_tool_prompt() -> None:
    tool = {"name": "t", "description": "d" * 100, "input_schema": {"type": "object"}}
    body = {"model": MODEL, "messages": [], "tools": [tool]}
    tool_tokens = math.ceil(len(json.dumps(tool)) / 4)
    expected = REQUEST_OVERHEAD_TOKENS + TOOLS_OVERHEAD_TOKENS + tool_tokens
    assert estimate_input_tokens(body) == expected


def test_tool_use_and_result_are_counted() -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x" * 400}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "r" * 800}
    nested = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "r" * 800}],
    }
    assert one_message([use]) > 100
    assert one_message([result]) == BLOCK_OVERHEAD_TOKENS + 200
    assert one_message([nested]) == 2 * BLOCK_OVERHEAD_TOKENS + 200


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(800, 600), (800, 600)),
        (jpeg(640, 480), (640, 480)),
        (jpeg(1000, 500, app_bytes=30_000), (1000, 500)),
        (gif(300, 200), (300, 200)),
        (webp_vp8x(1024, 768), (1024, 768)),
        (webp_vp8l(500, 400), (500, 400)),
        (webp_vp8(320, 240), (320, 240)),
    ],
)
def test_image_size_from_headers(data: bytes, size: tuple[int, int]) -> None:
    assert image_size(b64(data)) == size


@pytest.mark.parametrize(
    "data", ["", "not base64!!", b64(b"plain text, not an image"), b64(b"\xff\xd8\xff")]
)
def test_image_size_unreadable(data: str) -> None:
    assert image_size(data) is None


def test_image_tokens_from_size() -> None:
    # 750 x 750 / 750 = 750 tokens
    assert one_message([image_block(png(750, 750))]) == BLOCK_OVERHEAD_TOKENS + 750
    # 200 x 100 / 750 = 26.7 -> 27
    assert one_message([image_block(gif(200, 100), "image/gif")]) == BLOCK_OVERHEAD_TOKENS + 27


def test_large_images_are_capped_as_the_api_downscales_them() -> None:
    big = [image_block(png(4000, 3000))]
    assert one_message(big) == BLOCK_OVERHEAD_TOKENS + STANDARD_IMAGES.max_tokens
    assert one_message(big, "claude-opus-4-7") == BLOCK_OVERHEAD_TOKENS + HIGH_RES_IMAGES.max_tokens
    # A long thin image: scaled to 1568 x 157 -> ceil(246176 / 750) = 329
    assert one_message([image_block(png(4000, 400))]) == BLOCK_OVERHEAD_TOKENS + 329


def test_unknown_size_images_use_the_cap() -> None:
    url_image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert one_message([url_image]) == BLOCK_OVERHEAD_TOKENS + 1600
    assert one_message([image_block(b"garbage")]) == BLOCK_OVERHEAD_TOKENS + 1600


def test_image_limits_by_model() -> None:
    assert image_limits("claude-sonnet-4-6") == STANDARD_IMAGES
    assert image_limits("claude-3-5-haiku-20241022") == STANDARD_IMAGES
    assert image_limits("claude-opus-4-7") == HIGH_RES_IMAGES
    assert image_limits("claude-opus-5") == HIGH_RES_IMAGES
    assert image_limits("mystery-model") == HIGH_RES_IMAGES
    assert image_limits(None) == HIGH_RES_IMAGES


def test_documents() -> None:
    pdf = b"%PDF-1.7" + b"\0" * 80_000
    pdf_block = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(pdf)},
    }
    b64_len = len(b64(pdf))
    assert one_message([pdf_block]) == BLOCK_OVERHEAD_TOKENS + math.ceil(
        b64_len * 3 // 4 / PDF_BYTES_PER_TOKEN
    )
    text_doc = {
        "type": "document",
        "title": "t" * 8,
        "source": {"type": "text", "media_type": "text/plain", "data": "d" * 400},
    }
    assert one_message([text_doc]) == BLOCK_OVERHEAD_TOKENS + 2 + 100
    url_doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/x.pdf"}}
    assert one_message([url_doc]) == BLOCK_OVERHEAD_TOKENS + DOCUMENT_URL_TOKENS


def test_thinking_and_unknown_blocks_are_counted() -> None:
    thinking = {"type": "thinking", "thinking": "t" * 400, "signature": "sig"}
    assert one_message([thinking]) == BLOCK_OVERHEAD_TOKENS + 100
    unknown = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}
    assert one_message([unknown]) == BLOCK_OVERHEAD_TOKENS + math.ceil(len(json.dumps(unknown)) / 4)


def test_estimate_errs_high_for_english_text() -> None:
    # English prose runs ~4.5+ characters per token with Claude's tokenizers; the estimate
    # must not fall below a conservative 5 chars/token reading of the same text.
    text = "The quick brown fox jumps over the lazy dog. " * 200
    assert one_message(text) >= len(text) / 5


def test_malformed_parts_do_not_raise() -> None:
    body: dict[str, Any] = {
        "model": 42,
        "system": None,
        "messages": [
            {"role": "user", "content": None},
            {"role": "user", "content": {"weird": True}},
            {"role": "user", "content": [7, "bare string", {"no": "type"}]},
            "not a message",
        ],
    }
    assert estimate_input_tokens(body) > REQUEST_OVERHEAD_TOKENS

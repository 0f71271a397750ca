"""convo.content: normalizing user content, sniffing real image bytes, and blobs out and back in.

Every image here is built byte by byte in the test, so the sizes read back come from headers the
test wrote, not from fixtures the code was written against.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from convo.content import (
    BLOB_SOURCE,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_SIDE,
    blob_refs,
    check_media,
    extract_blobs,
    image_block,
    image_size,
    inline_blobs,
    normalize,
    sniff_media_type,
)
from convo.errors import ContentError

# -- image builders ------------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def make_png(width: int, height: int, *, pixels: bool = True) -> bytes:
    """A valid RGB PNG; with pixels=False only the header (for huge claimed sizes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if pixels:
        rows = (
            b"\x00" + b"".join(bytes([x * 40 % 256, y * 40 % 256, 128]) for x in range(width))
            for y in range(height)
        )
        raw = b"".join(rows)
        out += _png_chunk(b"IDAT", zlib.compress(raw))
    return out + _png_chunk(b"IEND", b"")


def make_gif(width: int, height: int) -> bytes:
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0)
    palette = b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return header + palette + image + b"\x3b"


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def make_jpeg(width: int, height: int, *, sof: int = 0xC0, fill: bool = False) -> bytes:
    """SOI, APP0 (JFIF), DQT, DHT (whose bytes would read as a bogus size), SOFn, SOS, EOI."""
    app0 = _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    dqt = _jpeg_segment(0xDB, b"\x00" + bytes(range(1, 65)))
    # A Huffman table segment: 0xC4 is in the SOF range but is not a frame header.
    dht = _jpeg_segment(0xC4, b"\x00" + b"\x00\x01\x05\x01" + bytes(12) + b"\x07\x77")
    frame = _jpeg_segment(sof, b"\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00")
    sos = _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34\x56"
    pad = b"\xff\xff" if fill else b""
    return b"\xff\xd8" + app0 + dqt + dht + pad + frame + sos + b"\xff\xd9"


def _riff(chunks: bytes) -> bytes:
    body = b"WEBP" + chunks
    return b"RIFF" + struct.pack("<I", len(body)) + body


def make_webp_vp8x(width: int, height: int) -> bytes:
    payload = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    return _riff(b"VP8X" + struct.pack("<I", len(payload)) + payload)


def make_webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 12
    return _riff(b"VP8L" + struct.pack("<I", len(payload)) + payload)


def make_webp_vp8(width: int, height: int) -> bytes:
    payload = b"\x30\x01\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 6
    return _riff(b"VP8 " + struct.pack("<I", len(payload)) + payload)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes, media_type: str | None) -> dict[str, Any]:
    source: dict[str, Any] = {"type": "base64", "data": b64(data)}
    if media_type is not None:
        source = {"type": "base64", "media_type": media_type, "data": b64(data)}
    return {"type": "image", "source": source}


PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"

IMAGES = {
    "png": (make_png(3, 2), "image/png", (3, 2)),
    "gif": (make_gif(7, 5), "image/gif", (7, 5)),
    "jpeg": (make_jpeg(640, 480), "image/jpeg", (640, 480)),
    "jpeg-progressive": (make_jpeg(321, 123, sof=0xC2), "image/jpeg", (321, 123)),
    "webp-vp8x": (make_webp_vp8x(300, 17), "image/webp", (300, 17)),
    "webp-vp8l": (make_webp_vp8l(1000, 9), "image/webp", (1000, 9)),
    "webp-vp8": (make_webp_vp8(513, 258), "image/webp", (513, 258)),
}


# -- normalize -------------------------------------------------------------------------------------


def test_string_becomes_one_text_block() -> None:
    assert normalize("Hello, Claude", "user") == [{"type": "text", "text": "Hello, Claude"}]
    assert normalize("  spaced  ", "assistant") == [{"type": "text", "text": "  spaced  "}]


def test_single_block_dict_becomes_a_list() -> None:
    block = {"type": "text", "text": "hi"}
    assert normalize(block, "user") == [block]


@pytest.mark.parametrize("empty", ["", " ", "\n\t ", "\u3000"])
def test_empty_or_whitespace_text_refused(empty: str) -> None:
    with pytest.raises(ContentError):
        normalize(empty, "user")
    with pytest.raises(ContentError):
        normalize([{"type": "text", "text": "ok"}, {"type": "text", "text": empty}], "user")


@pytest.mark.parametrize(
    "content", [[], None, 42, [{"text": "no type"}], ["a string block"], [{"type": 3}]]
)
def test_malformed_content_refused(content: Any) -> None:
    with pytest.raises(ContentError):
        normalize(content, "user")


def test_text_must_be_a_string() -> None:
    with pytest.raises(ContentError):
        normalize([{"type": "text", "text": 5}], "user")
    with pytest.raises(ContentError):
        normalize([{"type": "text"}], "user")


@pytest.mark.parametrize(
    "kind", ["thinking", "redacted_thinking", "server_tool_use", "future_block", "tool_use"]
)
def test_unknown_or_assistant_only_block_types_refused_in_user_turns(kind: str) -> None:
    with pytest.raises(ContentError) as exc:
        normalize([{"type": kind, "id": "x", "name": "f", "input": {}}], "user")
    assert kind in str(exc.value)


@pytest.mark.parametrize("kind", ["image", "tool_result", "thinking", "future_block"])
def test_user_only_or_unknown_block_types_refused_in_assistant_turns(kind: str) -> None:
    with pytest.raises(ContentError):
        normalize([{"type": kind, "tool_use_id": "x"}], "assistant")


def test_assistant_turn_may_hold_text_and_tool_use() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
    ]
    assert normalize(copy.deepcopy(blocks), "assistant") == blocks


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "tool_use", "name": "f", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": ["not", "an", "object"]},
    ],
)
def test_bad_tool_use_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ContentError):
        normalize([bad], "assistant")


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_cache_control_refused(role: str) -> None:
    with pytest.raises(ContentError) as exc:
        normalize([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}], role)
    assert "cache_control" in str(exc.value)


def test_cache_control_inside_tool_result_content_refused() -> None:
    inner = [{"type": "text", "text": "r", "cache_control": {"type": "ephemeral"}}]
    with pytest.raises(ContentError):
        normalize([{"type": "tool_result", "tool_use_id": "toolu_1", "content": inner}], "user")


@pytest.mark.parametrize(
    "content",
    [
        "42",
        "",
        [{"type": "text", "text": "42"}],
        [{"type": "text", "text": "see"}, image(IMAGES["png"][0], "image/png")],
    ],
)
def test_good_tool_results_accepted(content: Any) -> None:
    block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": content, "is_error": False}
    assert normalize([copy.deepcopy(block)], "user") == [block]
    no_content = {"type": "tool_result", "tool_use_id": "toolu_1"}
    assert normalize([no_content], "user") == [no_content]


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "tool_result", "content": "x"},
        {"type": "tool_result", "tool_use_id": "", "content": "x"},
        {"type": "tool_result", "tool_use_id": 7, "content": "x"},
        {"type": "tool_result", "tool_use_id": "t", "content": 42},
        {"type": "tool_result", "tool_use_id": "t", "content": {"type": "text", "text": "x"}},
        {"type": "tool_result", "tool_use_id": "t", "content": "x", "is_error": "yes"},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": " "}]},
        {
            "type": "tool_result",
            "tool_use_id": "t",
            "content": [{"type": "tool_use", "id": "a", "name": "f"}],
        },
        {
            "type": "tool_result",
            "tool_use_id": "t",
            "content": [{"type": "tool_result", "tool_use_id": "u"}],
        },
        {"type": "tool_result", "tool_use_id": "t", "content": ["text"]},
    ],
)
def test_bad_tool_result_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ContentError):
        normalize([bad], "user")


def test_normalize_does_not_change_valid_blocks() -> None:
    blocks = [
        {"type": "text", "text": "Look", "citations": None},
        image(IMAGES["jpeg"][0], "image/jpeg"),
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": b64(PDF)},
            "title": "T",
        },
        {
            "type": "document",
            "source": {"type": "text", "media_type": "text/plain", "data": "plain"},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
    ]
    original = copy.deepcopy(blocks)
    assert normalize(blocks, "user") == original
    assert blocks == original


def test_image_without_media_type_gets_the_sniffed_one() -> None:
    """The API requires media_type on base64 images; convo knows it from the bytes."""
    data, media_type, _ = IMAGES["gif"]
    block = image(data, None)
    (out,) = normalize([block], "user")
    assert out["source"] == {"type": "base64", "media_type": media_type, "data": b64(data)}
    assert "media_type" not in block["source"]
    result: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [image(data, None)],
    }
    (out,) = normalize([result], "user")
    assert out["content"][0]["source"]["media_type"] == media_type
    assert "media_type" not in result["content"][0]["source"]


@pytest.mark.parametrize(
    "source",
    [
        None,
        "https://example.com/x.png",
        {"type": "url", "url": "ftp://example.com/x.png"},
        {"type": "url", "url": "file:///etc/passwd"},
        {"type": "file", "file_id": "f"},
        {"type": "base64", "media_type": "image/png", "data": "not base64!"},
        {"type": "base64", "media_type": "image/png", "data": None},
        {"type": "base64", "media_type": "image/png", "data": b64(make_png(2, 2))[:-3] + "\n"},
    ],
)
def test_bad_image_sources_refused(source: Any) -> None:
    with pytest.raises(ContentError):
        normalize([{"type": "image", "source": source}], "user")


def test_text_over_the_limit_refused() -> None:
    from convo.content import MAX_TEXT_CHARS

    normalize("x" * 1000, "user")
    with pytest.raises(ContentError):
        normalize("x" * (MAX_TEXT_CHARS + 1), "user")


# -- sniffing and sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_sniff_and_size_of_real_images(name: str) -> None:
    data, media_type, size = IMAGES[name]
    assert sniff_media_type(data) == media_type
    assert image_size(data, media_type) == size
    (out,) = normalize([image(data, media_type)], "user")
    assert out["source"]["data"] == b64(data)


def test_jpeg_with_fill_bytes_before_a_marker() -> None:
    """JPEG allows any number of 0xFF fill bytes before a marker."""
    data = make_jpeg(800, 600, fill=True)
    assert image_size(data, "image/jpeg") == (800, 600)


def test_png_size_is_big_endian() -> None:
    assert image_size(make_png(0x0102, 0x0304, pixels=False), "image/png") == (258, 772)


def test_sniff_pdf_and_unknown() -> None:
    assert sniff_media_type(PDF) == "application/pdf"
    for junk in (
        b"",
        b"hello world",
        b"\x89PN",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"GIF90a",
        b"\xff\xd8",
    ):
        assert sniff_media_type(junk) is None


def test_image_size_of_truncated_headers_is_none() -> None:
    assert image_size(b"\x89PNG\r\n\x1a\n", "image/png") is None
    assert image_size(b"GIF89a", "image/gif") is None
    assert image_size(b"\xff\xd8\xff\xe0\x00\x10", "image/jpeg") is None
    assert image_size(make_webp_vp8x(5, 5)[:20], "image/webp") is None


def test_image_claiming_png_whose_bytes_are_jpeg_refused() -> None:
    jpeg = IMAGES["jpeg"][0]
    with pytest.raises(ContentError) as exc:
        normalize([image(jpeg, "image/png")], "user")
    assert "image/png" in str(exc.value) and "image/jpeg" in str(exc.value)
    with pytest.raises(ContentError):
        check_media(jpeg, "image/png", "x", image=True)


@pytest.mark.parametrize(
    "data", [b"just some text", PDF, b"\x00" * 64, b"RIFF\x10\x00\x00\x00AVI LIST"]
)
def test_non_image_bytes_refused(data: bytes) -> None:
    with pytest.raises(ContentError):
        normalize([image(data, "image/png")], "user")
    with pytest.raises(ContentError):
        normalize([image(data, None)], "user")


def test_pdf_accepted_as_document_but_not_an_image_as_document() -> None:
    normalize(
        [
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": b64(PDF)},
            }
        ],
        "user",
    )
    with pytest.raises(ContentError):
        normalize(
            [
                {
                    "type": "document",
                    "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": b64(IMAGES["png"][0]),
                    },
                }
            ],
            "user",
        )


def _padded(head: bytes, total: int) -> bytes:
    return head + b"\x00" * (total - len(head))


def test_image_over_the_size_limit_refused() -> None:
    head = make_png(100, 100, pixels=False)
    with pytest.raises(ContentError):
        normalize([image(_padded(head, MAX_IMAGE_BYTES + 1), "image/png")], "user")
    with pytest.raises(ContentError):
        check_media(_padded(head, 6 * 1024 * 1024), None, "x", image=True)


def test_image_size_limit_is_counted_on_the_base64_the_api_receives() -> None:
    """The API refuses "image exceeds 5 MB maximum: N bytes > 5242880 bytes" where N is the
    length of the base64 string (a 4 MB file gives N of about 5.5 MB)."""
    head = make_png(100, 100, pixels=False)
    largest = MAX_IMAGE_BYTES * 3 // 4  # its base64 is exactly MAX_IMAGE_BYTES long
    assert len(b64(_padded(head, largest))) == MAX_IMAGE_BYTES
    assert check_media(_padded(head, largest), "image/png", "x", image=True) == "image/png"
    with pytest.raises(ContentError):
        check_media(_padded(head, largest + 1), "image/png", "x", image=True)


@pytest.mark.parametrize(
    "data",
    [
        make_png(MAX_IMAGE_SIDE + 1, 10, pixels=False),
        make_png(10, MAX_IMAGE_SIDE + 1, pixels=False),
        make_gif(MAX_IMAGE_SIDE + 1, 1),
        make_jpeg(1, MAX_IMAGE_SIDE + 1),
        make_webp_vp8x(MAX_IMAGE_SIDE + 1, 1),
        make_webp_vp8l(1, MAX_IMAGE_SIDE + 1),
    ],
)
def test_image_over_8000_px_refused(data: bytes) -> None:
    with pytest.raises(ContentError) as exc:
        normalize([image(data, None)], "user")
    assert str(MAX_IMAGE_SIDE + 1) in str(exc.value)


def test_image_of_exactly_8000_px_accepted() -> None:
    data = make_png(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE, pixels=False)
    assert check_media(data, "image/png", "x", image=True) == "image/png"


def test_image_block_from_file_uses_the_bytes_not_the_name(tmp_path: Path) -> None:
    data = IMAGES["png"][0]
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    assert image_block(path) == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": b64(data)},
    }
    with pytest.raises(ContentError):
        image_block(tmp_path / "missing.png")
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(ContentError):
        image_block(text_file)


# -- blobs --------------------------------------------------------------------------------------------


def test_extract_and_inline_round_trip() -> None:
    png, gif, jpeg = IMAGES["png"][0], IMAGES["gif"][0], IMAGES["jpeg"][0]
    blocks = [
        {"type": "text", "text": "three images and a document"},
        image(png, "image/png"),
        image(gif, "image/gif"),
        {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
        image(jpeg, "image/jpeg"),
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": b64(PDF)},
            "title": "Spec",
            "citations": {"enabled": True},
        },
    ]
    original = copy.deepcopy(blocks)
    stored, found = extract_blobs(blocks)
    assert blocks == original  # the input is not changed
    assert "data" not in str(stored)  # no base64 left in what is stored
    assert {b.sha256: b.data for b in found} == {
        hashlib.sha256(d).hexdigest(): d for d in (png, gif, jpeg, PDF)
    }
    refs = blob_refs(stored)
    assert [r["type"] for r in refs] == [BLOB_SOURCE] * 4
    assert [(r.get("width"), r.get("height")) for r in refs] == [
        (3, 2),
        (7, 5),
        (640, 480),
        (None, None),
    ]
    assert [r["size"] for r in refs] == [len(png), len(gif), len(jpeg), len(PDF)]
    assert stored[0] == original[0] and stored[3] == original[3]
    assert stored[5]["title"] == "Spec"

    replayed = inline_blobs(stored, {b.sha256: b.data for b in found})
    assert replayed == original


def test_blobs_inside_tool_result_content() -> None:
    png = IMAGES["png"][0]
    webp = IMAGES["webp-vp8x"][0]
    blocks: list[dict[str, Any]] = [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": [
                {"type": "text", "text": "two screenshots"},
                image(png, "image/png"),
                image(webp, "image/webp"),
            ],
        },
        {"type": "text", "text": "what do you see?"},
    ]
    original = copy.deepcopy(blocks)
    stored, found = extract_blobs(blocks)
    assert len(found) == 2
    inner = stored[0]["content"]
    assert inner[1]["source"]["type"] == BLOB_SOURCE and inner[2]["source"]["type"] == BLOB_SOURCE
    assert (inner[2]["source"]["width"], inner[2]["source"]["height"]) == (300, 17)
    assert len(blob_refs(stored)) == 2
    assert inline_blobs(stored, {b.sha256: b.data for b in found}) == original


def test_string_tool_result_content_untouched() -> None:
    blocks = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "plain"}]
    stored, found = extract_blobs(blocks)
    assert stored == blocks and found == []
    assert inline_blobs(stored, {}) == blocks


def test_same_bytes_give_the_same_sha_different_bytes_differ() -> None:
    a = make_png(4, 4)
    b = make_png(4, 5)
    stored, found = extract_blobs(
        [image(a, "image/png"), image(b, "image/png"), image(bytes(a), "image/png")]
    )
    shas = [r["sha256"] for r in blob_refs(stored)]
    assert shas[0] == shas[2] != shas[1]
    again, _ = extract_blobs([image(a, "image/png")])
    assert blob_refs(again)[0]["sha256"] == shas[0]
    assert shas[0] == hashlib.sha256(a).hexdigest()
    assert {f.sha256 for f in found} == {shas[0], shas[1]}


def test_extract_takes_the_media_type_from_the_bytes() -> None:
    data = IMAGES["webp-vp8l"][0]
    stored, found = extract_blobs([image(data, None)])
    assert blob_refs(stored)[0]["media_type"] == "image/webp"
    assert found[0].media_type == "image/webp"
    assert inline_blobs(stored, {found[0].sha256: data})[0]["source"]["media_type"] == "image/webp"


def test_inline_with_a_missing_blob_is_an_error_not_silent() -> None:
    stored, _ = extract_blobs([image(IMAGES["png"][0], "image/png")])
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as no broken block is built
        inline_blobs(stored, {})

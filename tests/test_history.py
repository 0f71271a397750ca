"""The history builder as a pure function: turn records in, a Messages API body (or a refusal) out.

No database here: every test hands `convo.history` plain `TurnRecord` lists.
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convo.capabilities import supports_prefill
from convo.content import BLOB_SOURCE
from convo.errors import ConvoError, HistoryError, InvalidInput, PrefillNotSupported
from convo.history import (
    MANY_IMAGES,
    MANY_IMAGES_MAX_SIDE,
    MAX_IMAGES,
    REPLAYED_TOOL,
    TurnRecord,
    build_messages,
    build_request,
    check_structure,
    merge_settings,
)

SETTINGS: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 256}
TOOL_DEF = {"name": "f", "description": "f", "input_schema": {"type": "object"}}
NO_PREFILL_MODELS = [
    "claude-sonnet-4-6",
    "claude-opus-4-6",
    "claude-opus-4-7",
    "claude-sonnet-4-6-20260115",
    "claude-haiku-5",
    "some-unknown-model",
]
PREFILL_MODELS = [
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
    "claude-opus-4-1",
]


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def user(tid: str, *blocks: Any, kind: str = "user") -> TurnRecord:
    return TurnRecord(tid, "user", kind, [text(b) if isinstance(b, str) else b for b in blocks])


def reply(tid: str, *blocks: Any, stop: str | None = "end_turn") -> TurnRecord:
    return TurnRecord(
        tid, "assistant", "reply", [text(b) if isinstance(b, str) else b for b in blocks], stop
    )


def assistant(tid: str, *blocks: Any, kind: str = "synthetic") -> TurnRecord:
    return TurnRecord(
        tid, "assistant", kind, [text(b) if isinstance(b, str) else b for b in blocks]
    )


def tool_use(tid: str, name: str = "lookup", **inp: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def tool_result(tid: str, content: Any = "42", **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tid, "content": content, **extra}


def blob_image(sha: str, width: int = 10, height: int = 10, size: int = 3) -> dict[str, Any]:
    return {
        "type": "image",
        "source": {
            "type": BLOB_SOURCE,
            "media_type": "image/png",
            "sha256": sha,
            "size": size,
            "width": width,
            "height": height,
        },
    }


def url_image(n: int) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": f"https://example.com/{n}.png"}}


def texts(message: dict[str, Any]) -> list[str]:
    return [b["text"] for b in message["content"] if b["type"] == "text"]


# -- rule 1: order and merging -----------------------------------------------------------------


def test_messages_follow_path_order() -> None:
    path = [
        user("u1", "first question"),
        reply("r1", "first answer"),
        user("u2", "second question"),
        reply("r2", "second answer"),
        user("u3", "third question"),
    ]
    body = build_request(path, SETTINGS)
    assert [m["role"] for m in body["messages"]] == [t.role for t in path]
    assert [texts(m) for m in body["messages"]] == [[t.content[0]["text"]] for t in path]
    messages, owners = build_messages(path)
    assert owners == ["u1", "r1", "u2", "r2", "u3"]
    assert messages == body["messages"]


def test_reversed_path_gives_reversed_messages() -> None:
    """The builder follows the order it is given, not ids or anything else."""
    path = [user("zz", "A?"), reply("aa", "B."), user("mm", "C?")]
    order = [texts(m)[0] for m in build_request(path, SETTINGS)["messages"]]
    assert order == ["A?", "B.", "C?"]


def test_consecutive_user_turns_become_one_message_with_separate_blocks() -> None:
    path = [user("u1", "Hello"), user("u2", "are you there?"), reply("r1", "Yes.")]
    body = build_request(path, SETTINGS)
    assert len(body["messages"]) == 2
    first = body["messages"][0]
    assert first["role"] == "user"
    assert first["content"] == [text("Hello"), text("are you there?")]
    _, owners = build_messages(path)
    assert owners == ["u2", "r1"]


def test_prefill_and_its_reply_are_joined_into_one_text_block() -> None:
    path = [
        user("u1", "Which option? (A), (B) or (C)"),
        assistant("p1", "The answer is (", kind="prefill"),
        reply("r1", "C)"),
        user("u2", "Why?"),
    ]
    body = build_request(path, SETTINGS)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [text("The answer is (C)")]


def test_synthetic_assistant_turn_is_continued_by_its_reply_too() -> None:
    path = [
        user("u1", "Say it"),
        assistant("s1", "Once upon"),
        reply("r1", " a time"),
        user("u2", "go on"),
    ]
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("Once upon a time")]


def test_reply_after_prefill_keeps_its_other_blocks() -> None:
    path = [
        user("u1", "Look it up"),
        assistant("p1", "Let me check", kind="prefill"),
        reply("r1", ".", tool_use("toolu_1", q="x"), stop="tool_use"),
        user("t1", tool_result("toolu_1"), kind="tool_result"),
    ]
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("Let me check."), tool_use("toolu_1", q="x")]


def test_reply_starting_with_a_non_text_block_is_not_joined() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "c2ln"}
    path = [
        user("u1", "Hi"),
        assistant("p1", "Well", kind="prefill"),
        reply("r1", thinking, "done"),
    ]
    path.append(user("u2", "ok"))
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("Well"), thinking, text("done")]


def test_a_reply_after_a_pause_turn_is_appended_not_joined() -> None:
    """The paused content was sent back as received: replayed later it must stay so (history
    is append-only), with its continuation's blocks after it, as the API combines them."""
    path = [
        user("u1", "Search"),
        reply("r1", "Searching", stop="pause_turn"),
        reply("r2", " found it"),
        user("u2", "ok"),
    ]
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("Searching"), text(" found it")]
    assert build_request(path[:2], SETTINGS)["messages"][1]["content"] == [text("Searching")]


def test_two_assistant_turns_that_are_not_a_continuation_stay_separate_blocks() -> None:
    path = [user("u1", "Hi"), reply("r1", "Hello"), assistant("s1", "and more"), user("u2", "ok")]
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("Hello"), text("and more")]


def test_text_block_with_extra_fields_is_not_joined() -> None:
    cited = {
        "type": "text",
        "text": "C)",
        "citations": [{"type": "char_location", "cited_text": "x"}],
    }
    path = [
        user("u1", "?"),
        assistant("p1", "(", kind="prefill"),
        reply("r1", cited),
        user("u2", "ok"),
    ]
    body = build_request(path, SETTINGS)
    assert body["messages"][1]["content"] == [text("("), cited]


# -- rule 2: the final assistant turn ----------------------------------------------------------


def _prefill_path(prefill: str = "The answer is (", kind: str = "prefill") -> list[TurnRecord]:
    return [user("u1", "Pick A, B or C"), assistant("p1", prefill, kind=kind)]


@pytest.mark.parametrize("model", NO_PREFILL_MODELS)
def test_prefill_refused_for_models_that_reject_it(model: str) -> None:
    with pytest.raises(PrefillNotSupported) as exc:
        build_request(_prefill_path(), {**SETTINGS, "model": model})
    assert exc.value.turn_id == "p1"
    assert model in str(exc.value)


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "claude-opus-4-6"])
def test_prefill_not_supported_comes_before_any_other_prefill_complaint(model: str) -> None:
    """Trailing whitespace and thinking are also wrong here, but the model is the first problem."""
    s = {**SETTINGS, "model": model, "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    with pytest.raises(HistoryError) as exc:
        build_request(_prefill_path("The answer is ", kind="synthetic"), s)
    assert type(exc.value) is PrefillNotSupported
    assert exc.value.turn_id == "p1"


@pytest.mark.parametrize("model", NO_PREFILL_MODELS)
def test_final_finished_reply_is_a_prefill_too(model: str) -> None:
    path = [user("u1", "Hi"), reply("r1", "Hello", stop="end_turn")]
    with pytest.raises(PrefillNotSupported):
        build_request(path, {**SETTINGS, "model": model})


@pytest.mark.parametrize("model", PREFILL_MODELS)
@pytest.mark.parametrize("kind", ["prefill", "synthetic"])
def test_prefill_accepted_for_models_that_take_it(model: str, kind: str) -> None:
    assert supports_prefill(model)
    body = build_request(_prefill_path(kind=kind), {**SETTINGS, "model": model})
    assert body["model"] == model
    assert body["messages"][-1] == {"role": "assistant", "content": [text("The answer is (")]}


def test_prefill_model_override_table_is_used() -> None:
    body = build_request(
        _prefill_path(),
        {**SETTINGS, "model": "my-proxy-model"},
        prefill_models={"my-proxy-model": True},
    )
    assert body["messages"][-1]["role"] == "assistant"
    with pytest.raises(PrefillNotSupported):
        build_request(_prefill_path(), SETTINGS, prefill_models={"claude-sonnet-4-5": False})


@pytest.mark.parametrize("tail", [" ", "\n", "\t", "  \n"])
def test_prefill_with_trailing_whitespace_refused(tail: str) -> None:
    with pytest.raises(HistoryError) as exc:
        build_request(_prefill_path("The answer is" + tail), SETTINGS)
    assert type(exc.value) is HistoryError
    assert exc.value.turn_id == "p1"


def test_joined_prefill_and_reply_ending_in_whitespace_refused_at_the_end() -> None:
    path = [
        user("u1", "?"),
        assistant("p1", "The", kind="prefill"),
        reply("r1", " answer ", stop="max_tokens"),
    ]
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "r1"


def test_prefill_with_leading_whitespace_is_fine() -> None:
    body = build_request(_prefill_path("  indented"), SETTINGS)
    assert body["messages"][-1]["content"][-1]["text"] == "  indented"


def test_prefill_with_thinking_enabled_refused() -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    with pytest.raises(HistoryError) as exc:
        build_request(_prefill_path(), {**SETTINGS, "thinking": thinking})
    assert type(exc.value) is HistoryError
    assert exc.value.turn_id == "p1"
    with pytest.raises(HistoryError):
        build_request(_prefill_path(), SETTINGS, overrides={"thinking": thinking})
    # Disabled thinking is no obstacle.
    body = build_request(_prefill_path(), {**SETTINGS, "thinking": {"type": "disabled"}})
    assert body["messages"][-1]["role"] == "assistant"


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", "claude-opus-4-6", "claude-sonnet-4-5"])
def test_paused_reply_at_the_end_is_sent_back_for_any_model(model: str) -> None:
    paused = [
        {
            "type": "server_tool_use",
            "id": "srvtoolu_1",
            "name": "web_search",
            "input": {"query": "x"},
        },
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
    ]
    path = [user("u1", "Search"), reply("r1", *paused, stop="pause_turn")]
    s = {**SETTINGS, "model": model, "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    body = build_request(path, s)
    assert body["messages"][-1] == {"role": "assistant", "content": paused}


def test_thinking_and_unknown_blocks_replayed_byte_for_byte() -> None:
    blocks = [
        {
            "type": "thinking",
            "thinking": "Let me think\n about é and 😀",
            "signature": "EqQBCkYIBxgCKkA+/=",
        },
        {
            "type": "redacted_thinking",
            "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP",
        },
        {
            "type": "text",
            "text": "Result",
            "citations": [
                {
                    "type": "web_search_result_location",
                    "url": "https://x",
                    "cited_text": "y",
                    "encrypted_index": "Eo8B",
                }
            ],
        },
        {
            "type": "future_block",
            "payload": {"z": [1, 2.5, None, True], "a": {"nested": "x"}},
            "id": "fb_1",
        },
        tool_use("toolu_9", q="y"),
    ]
    original = json.dumps(blocks)
    path = [
        user("u1", "Go"),
        reply("r1", *copy.deepcopy(blocks), stop="tool_use"),
        user("t1", tool_result("toolu_9"), kind="tool_result"),
    ]
    body = build_request(path, SETTINGS)
    assert json.dumps(body["messages"][1]["content"]) == original


# -- rule 3: tool pairing -----------------------------------------------------------------------


def _tool_path(*result_turns: TurnRecord) -> list[TurnRecord]:
    return [
        user("u1", "Weather in Paris and Rome?"),
        reply(
            "r1",
            "Checking both.",
            tool_use("toolu_a", city="Paris"),
            tool_use("toolu_b", city="Rome"),
            stop="tool_use",
        ),
        *result_turns,
    ]


def test_parallel_tool_results_in_one_user_message_accepted() -> None:
    path = _tool_path(
        user(
            "t1",
            tool_result("toolu_a", "18C"),
            tool_result("toolu_b", "22C"),
            "thanks",
            kind="tool_result",
        )
    )
    body = build_request(path, SETTINGS)
    assert body["messages"][2]["content"][:2] == [
        tool_result("toolu_a", "18C"),
        tool_result("toolu_b", "22C"),
    ]


def test_tool_results_in_separate_turns_merge_into_one_message() -> None:
    path = _tool_path(
        user("t1", tool_result("toolu_b", "22C"), kind="tool_result"),
        user("t2", tool_result("toolu_a", "18C"), kind="tool_result"),
        user("u2", "And tomorrow?"),
    )
    body = build_request(path, SETTINGS)
    assert len(body["messages"]) == 3
    assert body["messages"][2]["content"] == [
        tool_result("toolu_b", "22C"),
        tool_result("toolu_a", "18C"),
        text("And tomorrow?"),
    ]


def test_missing_tool_result_refused_naming_the_tool_use_turn() -> None:
    path = _tool_path(user("t1", tool_result("toolu_a"), kind="tool_result"))
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "r1"
    assert "toolu_b" in str(exc.value)
    assert "toolu_a" not in str(exc.value)


def test_tool_use_answered_by_plain_text_refused() -> None:
    path = _tool_path(user("u2", "never mind"))
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "r1"


def test_tool_result_after_text_refused() -> None:
    path = _tool_path(
        user(
            "t1", "here you go", tool_result("toolu_a"), tool_result("toolu_b"), kind="tool_result"
        )
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t1"


def test_tool_result_after_text_of_an_earlier_merged_turn_refused() -> None:
    path = _tool_path(
        user("u2", "here you go"),
        user("t1", tool_result("toolu_a"), tool_result("toolu_b"), kind="tool_result"),
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t1"


def test_tool_result_for_unknown_id_refused() -> None:
    path = _tool_path(
        user(
            "t1",
            tool_result("toolu_a"),
            tool_result("toolu_b"),
            tool_result("toolu_zzz"),
            kind="tool_result",
        )
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t1"
    assert "toolu_zzz" in str(exc.value)


def test_unknown_tool_result_is_blamed_on_its_own_turn_when_merged() -> None:
    """The user message is two turns; the bad block is in the first, so that is the one to name."""
    path = _tool_path(
        user(
            "t1",
            tool_result("toolu_a"),
            tool_result("toolu_b"),
            tool_result("toolu_zzz"),
            kind="tool_result",
        ),
        user("u2", "and one more thing"),
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t1"


def test_tool_result_with_no_tool_use_before_it_refused() -> None:
    path = [
        user("u1", "Hi"),
        reply("r1", "Hello"),
        user("t1", tool_result("toolu_a"), kind="tool_result"),
    ]
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t1"


def test_duplicate_tool_result_refused() -> None:
    path = _tool_path(
        user("t1", tool_result("toolu_a"), tool_result("toolu_b"), kind="tool_result"),
        user("t2", tool_result("toolu_a"), kind="tool_result"),
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t2"
    assert "toolu_a" in str(exc.value)


def test_tool_result_for_an_older_tool_use_refused() -> None:
    path = _tool_path(
        user("t1", tool_result("toolu_a"), tool_result("toolu_b"), kind="tool_result"),
        reply("r2", "Done."),
        user("t2", tool_result("toolu_a"), kind="tool_result"),
    )
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "t2"


def test_same_tool_use_id_twice_in_one_message_refused() -> None:
    """Two merged assistant turns calling the same id: one result cannot answer both."""
    path = [
        user("u1", "Go"),
        assistant("s1", tool_use("toolu_1")),
        reply("r1", "Calling.", tool_use("toolu_1"), stop="tool_use"),
        user("t1", tool_result("toolu_1"), kind="tool_result"),
    ]
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "r1"


def test_tool_use_without_an_id_refused() -> None:
    path = [
        user("u1", "Go"),
        reply("r1", {"type": "tool_use", "name": "f", "input": {}}, stop="tool_use"),
    ]
    with pytest.raises(HistoryError) as exc:
        check_structure(path, final_pending_ok=True)
    assert exc.value.turn_id == "r1"


def test_first_turn_at_fault_is_named_when_assistant_turns_merge() -> None:
    path = [assistant("s1", "one"), assistant("s2", "two"), user("u1", "Hi")]
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "s1"


def test_pending_tool_use_at_the_end_refused() -> None:
    path = _tool_path()
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "r1"
    assert "toolu_a" in str(exc.value) and "toolu_b" in str(exc.value)
    check_structure(path, final_pending_ok=True)  # a fork at the tool call is fine
    with pytest.raises(HistoryError):
        check_structure(path, final_pending_ok=False)


def test_partial_results_are_pending_not_wrong_but_cannot_be_sent() -> None:
    # Parallel results are added one at a time: a branch holding only some is still valid...
    path = _tool_path(user("t1", tool_result("toolu_a"), kind="tool_result"))
    check_structure(path, final_pending_ok=True)
    # ...but it cannot be sent, and nothing may follow the results until all are in.
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert "toolu_b" in str(exc.value)
    with pytest.raises(HistoryError):
        check_structure(path + [user("u9", "more text")], final_pending_ok=True)


def test_check_structure_accepts_empty_and_valid_paths() -> None:
    check_structure([], final_pending_ok=False)
    check_structure([user("u1", "Hi"), reply("r1", "Hello")], final_pending_ok=False)


# -- rule 4: first message, images ---------------------------------------------------------------


def test_first_message_must_be_from_the_user() -> None:
    path = [assistant("s1", "I speak first"), user("u1", "Hi")]
    with pytest.raises(HistoryError) as exc:
        build_request(path, SETTINGS)
    assert exc.value.turn_id == "s1"
    with pytest.raises(HistoryError):
        check_structure(path, final_pending_ok=True)


def test_empty_path_refused() -> None:
    with pytest.raises(HistoryError):
        build_request([], SETTINGS)


def _image_path(images: list[dict[str, Any]], per_turn: int = 10) -> list[TurnRecord]:
    path: list[TurnRecord] = []
    for i in range(0, len(images), per_turn):
        n = i // per_turn
        path.append(user(f"u{n}", *images[i : i + per_turn], "What is this?"))
        path.append(reply(f"r{n}", "A picture."))
    path.append(user("last", "Thanks"))
    return path


def test_one_hundred_images_accepted_and_inlined() -> None:
    images = [blob_image("aa") for _ in range(MAX_IMAGES)]
    body = build_request(_image_path(images), SETTINGS, blobs={"aa": b"PNG"})
    sources = [b["source"] for m in body["messages"] for b in m["content"] if b["type"] == "image"]
    assert len(sources) == MAX_IMAGES
    assert all(s == {"type": "base64", "media_type": "image/png", "data": "UE5H"} for s in sources)


def test_more_than_one_hundred_images_refused() -> None:
    images = [blob_image("aa") for _ in range(MAX_IMAGES + 1)]
    with pytest.raises(HistoryError):
        build_request(_image_path(images), SETTINGS, blobs={"aa": b"PNG"})
    urls = [url_image(i) for i in range(MAX_IMAGES + 1)]
    with pytest.raises(HistoryError):
        build_request(_image_path(urls), SETTINGS, blobs={})


def test_images_inside_tool_results_count_too() -> None:
    inner = [blob_image("aa") for _ in range(MAX_IMAGES + 1)]
    path = [
        user("u1", "Screenshot please"),
        reply("r1", tool_use("toolu_1"), stop="tool_use"),
        user("t1", tool_result("toolu_1", inner), kind="tool_result"),
    ]
    with pytest.raises(HistoryError):
        build_request(path, SETTINGS, blobs={"aa": b"PNG"})
    body = build_request(
        path[:2] + [user("t1", tool_result("toolu_1", inner[:3]), kind="tool_result")],
        SETTINGS,
        blobs={"aa": b"PNG"},
    )
    sources = [b["source"] for b in body["messages"][2]["content"][0]["content"]]
    assert sources == [{"type": "base64", "media_type": "image/png", "data": "UE5H"}] * 3


def test_many_images_with_one_over_2000_px_refused() -> None:
    images = [blob_image("aa") for _ in range(MANY_IMAGES)] + [
        blob_image("bb", MANY_IMAGES_MAX_SIDE + 1, 100)
    ]
    blobs = {"aa": b"PNG", "bb": b"BIG"}
    with pytest.raises(HistoryError) as exc:
        build_request(_image_path(images), SETTINGS, blobs=blobs)
    assert f"{MANY_IMAGES_MAX_SIDE + 1}x100" in str(exc.value)
    tall = images[:-1] + [blob_image("bb", 100, MANY_IMAGES_MAX_SIDE + 1)]
    with pytest.raises(HistoryError):
        build_request(_image_path(tall), SETTINGS, blobs=blobs)


def test_large_image_fine_with_few_images_and_2000_px_fine_with_many() -> None:
    few = [blob_image("aa") for _ in range(MANY_IMAGES - 1)] + [blob_image("bb", 7000, 7000)]
    build_request(_image_path(few), SETTINGS, blobs={"aa": b"PNG", "bb": b"BIG"})
    many = [blob_image("aa") for _ in range(MANY_IMAGES)] + [
        blob_image("bb", MANY_IMAGES_MAX_SIDE, MANY_IMAGES_MAX_SIDE)
    ]
    build_request(_image_path(many), SETTINGS, blobs={"aa": b"PNG", "bb": b"BIG"})


def test_request_over_32_mb_of_media_refused() -> None:
    big = 13 * 1024 * 1024
    images = [blob_image(s, size=big) for s in ("aa", "bb")]
    with pytest.raises(HistoryError):
        build_request(_image_path(images), SETTINGS, blobs={"aa": b"x", "bb": b"y"})


# -- rule 5: settings and overrides --------------------------------------------------------------

PATH = [user("u1", "Hello")]


def test_only_the_parameters_set_are_sent() -> None:
    body = build_request(PATH, SETTINGS)
    assert set(body) == {"model", "max_tokens", "messages"}
    assert body["model"] == SETTINGS["model"] and body["max_tokens"] == SETTINGS["max_tokens"]


def test_temperature_present_only_when_set_even_if_zero() -> None:
    assert "temperature" not in build_request(PATH, SETTINGS)
    assert build_request(PATH, {**SETTINGS, "temperature": 0})["temperature"] == 0
    assert build_request(PATH, {**SETTINGS, "temperature": 0.7})["temperature"] == 0.7


def test_overrides_replace_and_none_unsets() -> None:
    s = {
        **SETTINGS,
        "temperature": 0.7,
        "system": "Be brief.",
        "stop_sequences": ["END"],
        "top_k": 5,
    }
    body = build_request(
        PATH, s, overrides={"temperature": 0.1, "model": "claude-opus-4-6", "top_k": None}
    )
    assert body["temperature"] == 0.1
    assert body["model"] == "claude-opus-4-6"
    assert "top_k" not in body
    assert body["system"] == "Be brief."
    assert body["stop_sequences"] == ["END"]
    body = build_request(PATH, s, overrides={"system": None, "temperature": None})
    assert "system" not in body and "temperature" not in body
    # The conversation's settings themselves are untouched.
    assert s["temperature"] == 0.7 and s["top_k"] == 5


def test_merge_settings_semantics() -> None:
    base = {"model": "m", "temperature": 1.0}
    merged = merge_settings(base, {"temperature": None, "top_p": 0.5})
    assert merged == {"model": "m", "top_p": 0.5}
    assert base == {"model": "m", "temperature": 1.0}
    assert merge_settings(base, None) == base


@pytest.mark.parametrize("key", ["temprature", "stream", "messages", "api_key"])
def test_unknown_override_refused(key: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        build_request(PATH, SETTINGS, overrides={key: 1})
    assert key in str(exc.value)


@pytest.mark.parametrize("max_tokens", [0, -1, "100", None, 1.5])
def test_invalid_max_tokens_refused(max_tokens: Any) -> None:
    with pytest.raises(InvalidInput):
        build_request(PATH, {**SETTINGS, "max_tokens": max_tokens})


def test_missing_model_refused() -> None:
    with pytest.raises(InvalidInput):
        build_request(PATH, {"max_tokens": 10})
    with pytest.raises(InvalidInput):
        build_request(PATH, SETTINGS, overrides={"model": None})


def test_all_request_params_are_passed_through() -> None:
    extra = {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "stop_sequences": ["\n\nHuman:"],
        "metadata": {"user_id": "u-123"},
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    body = build_request(PATH, {**SETTINGS, "max_tokens": 2048, **extra})
    for key, value in extra.items():
        assert body[key] == value


def test_system_as_blocks_is_sent_as_is() -> None:
    system = [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Answer in French."},
    ]
    assert build_request(PATH, {**SETTINGS, "system": system})["system"] == system


# -- cache -------------------------------------------------------------------------------------


def test_cache_markers() -> None:
    assert "cache_control" not in build_request(PATH, SETTINGS)
    assert build_request(PATH, {**SETTINGS, "cache": "5m"})["cache_control"] == {
        "type": "ephemeral"
    }
    assert build_request(PATH, {**SETTINGS, "cache": "1h"})["cache_control"] == {
        "type": "ephemeral",
        "ttl": "1h",
    }
    assert "cache_control" not in build_request(
        PATH, {**SETTINGS, "cache": "5m"}, overrides={"cache": None}
    )
    assert (
        build_request(PATH, {**SETTINGS, "cache": "5m"}, overrides={"cache": "1h"})[
            "cache_control"
        ]["ttl"]
        == "1h"
    )


def test_cache_is_never_put_inside_messages() -> None:
    path = [user("u1", "Hi"), reply("r1", "Hello"), user("u2", "More")]
    body = build_request(path, {**SETTINGS, "cache": "1h"})
    assert "cache_control" not in json.dumps(body["messages"])
    assert "cache" not in body


def test_cache_off_means_no_marker() -> None:
    """The error message lists 'off' as valid; the builder must accept it as 'no cache'."""
    assert "cache_control" not in build_request(PATH, {**SETTINGS, "cache": "off"})


@pytest.mark.parametrize("bad", ["10m", "1H", 5, "ephemeral"])
def test_invalid_cache_refused(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        build_request(PATH, {**SETTINGS, "cache": bad})


# -- rule 6: stable, serializable, pure ------------------------------------------------------------


def _rich_path() -> list[TurnRecord]:
    return [
        user("u1", "Look at this", blob_image("aa", 30, 20)),
        assistant("p1", "It shows", kind="prefill"),
        reply(
            "r1",
            " a cat.",
            {"type": "thinking", "thinking": "cat?", "signature": "sig=="},
            tool_use("toolu_1", animal="cat", nested={"a": [1, 2]}),
            stop="tool_use",
        ),
        user(
            "t1",
            tool_result("toolu_1", [text("a tabby"), blob_image("bb", 5, 5)]),
            kind="tool_result",
        ),
        user("u2", 'Café ☕ 😀 \u2028 "quoted" \\ backslash'),
    ]


def test_output_is_json_serializable_and_byte_stable() -> None:
    s = {**SETTINGS, "cache": "5m", "temperature": 0.5, "system": "sys"}
    blobs = {"aa": b"\x89PNG-aa", "bb": b"\x89PNG-bb"}
    first = json.dumps(build_request(_rich_path(), s, blobs=blobs))
    second = json.dumps(build_request(_rich_path(), copy.deepcopy(s), blobs=dict(blobs)))
    third = json.dumps(build_request(_rich_path(), s, blobs=blobs))
    assert first == second == third
    decoded = json.loads(first)
    assert decoded["messages"][1]["content"][0] == text("It shows a cat.")


def test_building_does_not_mutate_the_records_or_settings() -> None:
    path = _rich_path()
    s = {**SETTINGS, "cache": "1h", "temperature": 0.5}
    overrides = {"temperature": None, "top_k": 3}
    blobs = {"aa": b"\x89PNG-aa", "bb": b"\x89PNG-bb"}
    before = copy.deepcopy((path, s, overrides, blobs))
    body = build_request(path, s, overrides=overrides, blobs=blobs)
    assert (path, s, overrides, blobs) == before
    # The blob references stay references in the records; only the body has base64.
    assert path[0].content[1]["source"]["type"] == BLOB_SOURCE
    assert body["messages"][0]["content"][1]["source"]["type"] == "base64"
    # Building twice from the same (untouched) records gives the same result.
    assert build_request(path, s, overrides=overrides, blobs=blobs) == body


def test_build_messages_does_not_mutate_joined_turns() -> None:
    path = [user("u1", "Q"), assistant("p1", "The answer is (", kind="prefill"), reply("r1", "C)")]
    before = copy.deepcopy(path)
    build_messages(path)
    build_messages(path)
    assert path == before


# -- property: any sequence of turns is either a valid body or a ConvoError --------------------

TOOL_IDS = ["toolu_1", "toolu_2", "toolu_3"]
printable = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8)
unknown_block = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["future_block", "server_tool_use", "mystery"]),
        "value": st.integers(),
    }
)
user_block = st.one_of(
    printable.map(text),
    st.builds(tool_result, st.sampled_from(TOOL_IDS), st.one_of(printable, st.just([text("r")]))),
    st.integers(0, 3).map(url_image),
    unknown_block,
)
assistant_block = st.one_of(
    printable.map(text),
    st.builds(tool_use, st.sampled_from(TOOL_IDS)),
    st.builds(lambda s: {"type": "thinking", "thinking": s, "signature": "sig"}, printable),
    unknown_block,
)


@st.composite
def random_turn(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {
            "role": "user",
            "kind": draw(st.sampled_from(["user", "tool_result"])),
            "content": draw(st.lists(user_block, min_size=1, max_size=4)),
            "stop": None,
        }
    kind = draw(st.sampled_from(["reply", "synthetic", "prefill"]))
    stop = (
        draw(st.sampled_from([None, "end_turn", "tool_use", "pause_turn", "max_tokens"]))
        if kind == "reply"
        else None
    )
    return {
        "role": "assistant",
        "kind": kind,
        "content": draw(st.lists(assistant_block, min_size=1, max_size=4)),
        "stop": stop,
    }


@st.composite
def tool_exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A reply calling tools and the results, usually well formed, sometimes not."""
    ids = draw(st.lists(st.sampled_from(TOOL_IDS), min_size=1, max_size=3, unique=True))
    uses = [tool_use(i) for i in ids]
    turns: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "kind": "reply",
            "content": [text("Calling."), *uses],
            "stop": "tool_use",
        }
    ]
    answered = draw(st.permutations(ids))
    if draw(st.integers(0, 4)) == 0 and answered:
        answered = answered[:-1]
    results = [tool_result(i) for i in answered]
    if draw(st.booleans()):
        turns += [
            {"role": "user", "kind": "tool_result", "content": [r], "stop": None} for r in results
        ]
    elif results:
        turns.append({"role": "user", "kind": "tool_result", "content": results, "stop": None})
    if draw(st.booleans()):
        turns.append({"role": "user", "kind": "user", "content": [text("and?")], "stop": None})
    return turns


@st.composite
def turn_sequences(draw: st.DrawFn) -> list[TurnRecord]:
    segments = draw(
        st.lists(
            st.one_of(random_turn().map(lambda t: [t]), tool_exchange()), min_size=0, max_size=8
        )
    )
    if draw(st.booleans()):
        segments.insert(
            0, [{"role": "user", "kind": "user", "content": [text("start")], "stop": None}]
        )
    flat = [t for seg in segments for t in seg]
    return [
        TurnRecord(f"t{i}", t["role"], t["kind"], t["content"], t["stop"])
        for i, t in enumerate(flat)
    ]


def _all_text(blocks: list[dict[str, Any]]) -> str:
    return "".join(b["text"] for b in blocks if b["type"] == "text")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=turn_sequences(), model=st.sampled_from(["claude-sonnet-4-5", "claude-sonnet-4-6"]))
def test_any_turn_sequence_builds_a_valid_body_or_raises_a_convo_error(
    path: list[TurnRecord], model: str
) -> None:
    before = copy.deepcopy(path)
    try:
        body = build_request(path, {"model": model, "max_tokens": 100}, blobs={})
    except ConvoError:
        assert path == before
        return
    assert path == before
    json.dumps(body)
    messages = body["messages"]
    assert messages, "a body with no messages"
    assert messages[0]["role"] == "user"
    for a, b in itertools.pairwise(messages):
        assert a["role"] != b["role"], "roles must alternate"
    for m in messages:
        assert m["content"], "every message needs content"
    # Nothing lost or invented: the same text in the same order, the same other blocks.
    assert _all_text([b for m in messages for b in m["content"]]) == _all_text(
        [b for t in path for b in t.content]
    )
    assert [b for m in messages for b in m["content"] if b["type"] != "text"] == [
        b for t in path for b in t.content if b["type"] != "text"
    ]
    # Tool pairing, checked independently of the builder's own check.
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        used = [b["id"] for b in m["content"] if b["type"] == "tool_use"]
        if i + 1 == len(messages):
            assert not used, "a final tool_use without results was sent"
            continue
        nxt = messages[i + 1]["content"]
        lead = []
        for b in nxt:
            if b["type"] != "tool_result":
                break
            lead.append(b["tool_use_id"])
        assert sorted(lead) == sorted(used)
        assert not any(b["type"] == "tool_result" for b in nxt[len(lead) :])
    if messages[0]["role"] == "user":
        first_results = [b for b in messages[0]["content"] if b["type"] == "tool_result"]
        assert not first_results, "a tool_result with no tool_use before it"
    # A final assistant message is a prefill only where the model takes one.
    if messages[-1]["role"] == "assistant":
        last = path[-1]
        paused = last.kind == "reply" and last.stop_reason == "pause_turn"
        assert paused or supports_prefill(model)
        final = messages[-1]["content"][-1]
        if not paused and final["type"] == "text":
            assert final["text"] == final["text"].rstrip()


def test_a_tool_use_id_is_unique_across_the_whole_request() -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a"}
    path = [
        TurnRecord(1, "user", "user", [{"type": "text", "text": "call f"}]),
        TurnRecord(2, "assistant", "synthetic", [use]),
        TurnRecord(3, "user", "tool_result", [result]),
        TurnRecord(4, "assistant", "synthetic", [use]),
        TurnRecord(5, "user", "tool_result", [result]),
    ]
    with pytest.raises(HistoryError, match="no other tool_use") as e:
        build_request(path, {"model": "claude-sonnet-4-5", "max_tokens": 10, "tools": [TOOL_DEF]})
    assert e.value.turn_id == 4
    body = build_request(path[:3], {"model": "claude-sonnet-4-5", "max_tokens": 10})
    # With no tools set, the tool the history calls is named again and cannot be called.
    assert body["tools"] == [
        {"name": "f", "description": REPLAYED_TOOL, "input_schema": {"type": "object"}}
    ]
    assert body["tool_choice"] == {"type": "none"}


def test_thinking_rules_apply_to_manual_thinking_only() -> None:
    """Adaptive thinking may skip thinking, so a reply Claude wrote can be a bare tool_use."""
    path = [
        TurnRecord(1, "user", "user", [{"type": "text", "text": "weather?"}]),
        TurnRecord(2, "assistant", "reply", [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]),
        TurnRecord(3, "user", "tool_result", [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]),
    ]
    settings = {**SETTINGS, "max_tokens": 4000, "tools": [TOOL_DEF]}
    adaptive = build_request(path, {**settings, "thinking": {"type": "adaptive"}})
    assert adaptive["thinking"] == {"type": "adaptive"}
    with pytest.raises(HistoryError, match="must start with Claude's thinking") as e:
        build_request(path, {**settings, "thinking": {"type": "enabled", "budget_tokens": 2000}})
    assert e.value.turn_id == 2


def test_a_tool_choice_without_tools_is_refused_and_none_is_left_out() -> None:
    path = [TurnRecord(1, "user", "user", [{"type": "text", "text": "hi"}])]
    for kind in ("auto", "any"):
        with pytest.raises(InvalidInput, match="needs tools"):
            build_request(path, {**SETTINGS, "tool_choice": {"type": kind}})
    # With no tools there is nothing to call: the same request without it.
    assert "tool_choice" not in build_request(path, {**SETTINGS, "tool_choice": {"type": "none"}})


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"tools": [TOOL_DEF, TOOL_DEF]}, "two tools have the same name: f"),
        ({"tools": [TOOL_DEF], "tool_choice": {"type": "tool", "name": "g"}}, "does not define"),
        ({"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 1000}}, "from 1,024"),
        ({"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 2000}}, "budget_tokens"),
        ({"max_tokens": 2000, "thinking": {"type": "enabled"}}, "budget_tokens"),
        ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "9h"}}]},
         "cache_control marker must be"),
        ({"tools": [{**TOOL_DEF, "cache_control": {"type": "persistent"}}]}, "cache_control marker must be"),
    ],
)
def test_requests_the_api_would_refuse_are_refused_before_sending(settings: dict[str, Any], fragment: str) -> None:
    path = [TurnRecord(1, "user", "user", [{"type": "text", "text": "hi"}])]
    with pytest.raises(InvalidInput, match=fragment):
        build_request(path, {**SETTINGS, **settings})
    # (the same with the rule kept: a valid neighbour builds)
    build_request(path, {**SETTINGS, "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 1024}})

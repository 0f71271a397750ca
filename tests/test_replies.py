"""Replies the stand-in never gives, from a scripted server on loopback: a pause_turn and its
continuation, a tool call cut by max_tokens, a connection that drops after message_stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from convo import APIError, Store
from tests.helpers.kit import cli_env, make_store
from tests.helpers.scripted import Answer, ScriptedAPI, message, stream_of


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


SEARCH = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}}
RESULTS = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []}
WEATHER = {"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}


def _store(db_url: str, api: ScriptedAPI) -> Store:
    return make_store(db_url, api.url)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_pause_turn_continuation_is_its_own_reply_and_the_paused_content_replays_as_received(
    db_url: str, streamed: bool
) -> None:
    paused = message(SEARCH, RESULTS, text("Searching now."), stop="pause_turn", n=1)
    rest = message(text("Found it."), n=2)
    after = message(text("You're welcome."), n=3)
    answers = [Answer(events=stream_of(m)) if streamed else Answer(m) for m in (paused, rest, after)]
    with ScriptedAPI(*answers) as api, _store(db_url, api) as store:
        conv = store.create("claude-sonnet-4-5")

        def send(content: str | None) -> Any:
            if streamed:
                return conv.stream(content).until_done()
            return conv.send(content)

        first = send("search x")
        assert first.stop_reason == "pause_turn" and first.text == "Searching now."
        second = send(None)  # continue the paused turn
        # This call's text, not the paused one's again (that was its own reply's text).
        assert second.text == "Found it."
        assert conv._stored_reply() is not None and conv._stored_reply().text == "Found it."  # type: ignore[union-attr]
        send("thanks")
        bodies = api.requests
        # Sent back as it was received, to be continued...
        assert bodies[1]["messages"][-1] == {"role": "assistant", "content": [SEARCH, RESULTS, text("Searching now.")]}
        # ...and replayed the same later: the continuation's blocks come after it, not joined.
        assert bodies[2]["messages"][1] == {
            "role": "assistant", "content": [SEARCH, RESULTS, text("Searching now."), text("Found it.")],
        }


def test_after_a_synthetic_turn_the_reply_continues_its_text(db_url: str) -> None:
    with ScriptedAPI(Answer(message(text(" a time there was."))), Answer(message(text("ok")))) as api:
        with _store(db_url, api) as store:
            conv = store.create("claude-sonnet-4-5")
            conv.add_user("Tell me a story")
            conv.add_assistant("Once upon")
            reply = conv.send()
            assert reply.text == "Once upon a time there was."
            assert conv._stored_reply().text == reply.text  # type: ignore[union-attr]
            conv.send("more")
            assert api.requests[1]["messages"][1]["content"] == [text("Once upon a time there was.")]


def test_the_cli_does_not_print_a_paused_reply_again_when_continuing_it(db_url: str, tmp_path: Path) -> None:
    paused = message(SEARCH, RESULTS, text("Searching now."), stop="pause_turn", n=1)
    with ScriptedAPI(Answer(events=stream_of(paused)), Answer(events=stream_of(message(text("Found it."), n=2)))) as api:
        env = cli_env(api.url, tmp_path)

        def convo(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "convo", "--db", db_url, *args], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)

        assert convo("new").returncode == 0
        first = convo("send", "search x")
        assert first.returncode == 0 and "Searching now." in first.stdout
        second = convo("send")
        assert second.returncode == 0, second.stderr
        assert "Found it." in second.stdout and "Searching now." not in second.stdout


def test_a_tool_call_cut_by_max_tokens_is_refused_with_its_reason_and_billed_in_full(db_url: str) -> None:
    cut = message(text("I will call the tool"), {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                 "input": {"city": "Paris"}},
                  stop="max_tokens", input_tokens=10, output_tokens=30)
    events = stream_of(cut, json_parts={1: ['{"city": "Par']})
    with ScriptedAPI(Answer(events=events), Answer(message(text("Sunny"), n=2))) as api:
        with _store(db_url, api) as store:
            conv = store.create("claude-sonnet-4-5", tools=[WEATHER])
            with pytest.raises(APIError, match="reached max_tokens inside a tool call.*raise max_tokens"):
                conv.stream("Weather in Paris?").until_done()
            assert len(api.requests) == 1  # not retried: the same request would be cut the same way
            assert [t.kind for t in conv.turns()] == ["user"]  # the turn kept, nothing of the reply
            (call,) = conv.calls()
            assert call["status"] == "error" and call["reply_id"] is None
            # The final count, not an estimate from the text: the cut reply was billed for 30.
            assert (call["input_tokens"], call["output_tokens"]) == (10, 30)
            assert call["cost_usd"] == pytest.approx((10 * 3 + 30 * 15) / 1e6)
            assert "estimated" not in call["error_message"]
            assert call["partial_text"] == "I will call the tool"
            assert conv.retry(max_tokens=4096).text == "Sunny"
            assert api.requests[1]["max_tokens"] == 4096


def test_a_stream_whose_connection_drops_after_message_stop_is_a_finished_reply(db_url: str) -> None:
    whole = message(text("complete reply"), input_tokens=10, output_tokens=20)
    with ScriptedAPI(Answer(events=stream_of(whole), short_by=50), Answer(message(text("second"), n=2))) as api:
        with _store(db_url, api) as store:
            conv = store.create("claude-sonnet-4-5")
            reply = conv.stream("hi").until_done()
            assert reply.text == "complete reply"
            assert len(api.requests) == 1  # not retried: nothing was billed twice
            (call,) = conv.calls()
            assert call["status"] == "ok" and call["reply_id"] == reply.turn_id
            assert [t.kind for t in conv.turns()] == ["user", "reply"]


def test_a_stream_cut_before_message_stop_is_still_retried(db_url: str) -> None:
    """The other side of the rule above: a body that ends early, before message_stop, is a cut
    stream (billed, retried), whatever the connection does after."""
    whole = message(text("complete reply"), input_tokens=10, output_tokens=20)
    events = stream_of(whole)[:-1]  # no message_stop
    with ScriptedAPI(Answer(events=events, short_by=50), Answer(events=stream_of(message(text("again"), n=2)))) as api:
        with _store(db_url, api) as store:
            conv = store.create("claude-sonnet-4-5")
            reply = conv.stream("hi").until_done()
            assert reply.text == "again" and len(api.requests) == 2
            assert [c["status"] for c in conv.calls()] == ["cut", "ok"]



def test_names_a_server_gives_are_stored_without_control_characters(db_url: str) -> None:
    """A stop reason or a message id is printed by `show` and exported: one with a line break or
    an escape is stored with U+FFFD in their place (an import holds a file to the same)."""
    odd = {**message(text("hi")), "stop_reason": "end\nturn\x1b[2J", "id": "msg\x1b]0;x\x07"}
    with ScriptedAPI(Answer(odd)) as api, _store(db_url, api) as store:
        conv = store.create("claude-sonnet-4-5")
        conv.send("hello")
        assert conv.turns()[-1].stop_reason == "end\ufffdturn\ufffd[2J"
        (call,) = conv.calls()
        assert (call["stop_reason"], call["message_id"]) == ("end\ufffdturn\ufffd[2J", "msg\ufffd]0;x\ufffd")
        assert store.import_(store.export(conv.id)).calls()[0]["message_id"] == call["message_id"]

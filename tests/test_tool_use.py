"""Tool use and JSON output, against the local stand-in, on SQLite and PostgreSQL.

The stand-in answers with a tool_use when tools are offered and the message names a tool
("weather" for get_weather), one parallel tool_use per Capitalized word ("Paris", "Rome"), fills
inputs from the schema (strings get the word, integers 1), and answers tool results with text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field
from sqlalchemy import func, select

import convo
from convo import Conversation, Store
from convo.client import Client
from convo.errors import HistoryError, InvalidInput, OutputInvalid
from convo.models import Base
from convo.standin import LABEL, StandIn

REPO = Path(__file__).resolve().parent.parent
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city"}},
        "required": ["city"],
    },
}


@pytest.fixture
def client(standin: StandIn) -> Iterator[Client]:
    with Client(api_key="test-key", base_url=standin.base_url) as c:
        yield c


@pytest.fixture
def store(db_url: str, client: Client) -> Iterator[Store]:
    with Store(db_url, client=client) as s:
        yield s


@pytest.fixture
def conv(store: Store) -> Conversation:
    return store.create(tools=[WEATHER])


def row_counts(store: Store) -> dict[str, int]:
    with store.storage.engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in Base.metadata.sorted_tables
        }


def last_body(standin: StandIn) -> dict[str, Any]:
    return standin.requests[-1]["body"]


def result_block(tool_use_id: str, content: str, **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content, **extra}


# -- tools on the conversation, results by hand --------------------------------------------


def test_tools_are_stored_and_sent_again_by_a_resumed_store(
    db_url: str, client: Client, store: Store, conv: Conversation, standin: StandIn
) -> None:
    assert conv.info.params["tools"] == [WEATHER]
    first = conv.request("What's the weather in Paris?")
    assert first["tools"] == [WEATHER]
    with Store(db_url, client=client) as again:
        resumed = again.get(conv.id)
        assert resumed.request("What's the weather in Paris?") == first
        reply = resumed.send("What's the weather in Paris?")
    assert last_body(standin)["tools"] == [WEATHER]
    assert reply.stop_reason == "tool_use"


def test_tool_use_then_result_then_text(store: Store, conv: Conversation, standin: StandIn) -> None:
    reply = conv.send("What's the weather in Paris?")
    assert reply.stop_reason == "tool_use"
    assert [(u.name, u.input) for u in reply.tool_uses] == [("get_weather", {"city": "Paris"})]
    assert [u.id for u in conv.pending_tool_uses()] == [reply.tool_uses[0].id]
    stored = conv.turns()[-1]
    assert (stored.id, stored.kind, stored.stop_reason) == (reply.turn_id, "reply", "tool_use")

    result = conv.add_tool_result(reply.tool_uses[0].id, "18 C, cloudy")
    assert conv.turn(result).kind == "tool_result"
    assert conv.pending_tool_uses() == []
    final = conv.send()
    assert final.stop_reason == "end_turn"
    assert final.text == f"{LABEL}Tool results: get_weather: 18 C, cloudy"
    sent = last_body(standin)["messages"]
    assert sent[-2]["role"] == "assistant" and sent[-2]["content"] == reply.content
    assert sent[-1] == {
        "role": "user",
        "content": [result_block(reply.tool_uses[0].id, "18 C, cloudy")],
    }
    # And the thread goes on.
    conv.send("Thanks")
    assert last_body(standin)["messages"][-1]["content"][0]["text"] == "Thanks"


def test_error_result_is_carried(store: Store, conv: Conversation, standin: StandIn) -> None:
    reply = conv.send("What's the weather in Paris?")
    conv.add_tool_result(reply.tool_uses[0].id, "weather service down", is_error=True)
    final = conv.send()
    assert last_body(standin)["messages"][-1]["content"] == [
        result_block(reply.tool_uses[0].id, "weather service down", is_error=True)
    ]
    assert "get_weather: error weather service down" in final.text


def test_parallel_results_go_into_one_user_message(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    reply = conv.send("Weather in Paris and Rome?")
    assert reply.stop_reason == "tool_use"
    paris, rome = reply.tool_uses
    assert (paris.input, rome.input) == ({"city": "Paris"}, {"city": "Rome"})
    # Answer in the other order, with text after them: the results still come first.
    conv.add_tool_result(rome.id, "20 C, sunny")
    assert [u.id for u in conv.pending_tool_uses()] == [paris.id]
    conv.add_tool_result(paris.id, "18 C, cloudy")
    assert conv.pending_tool_uses() == []
    final = conv.send("Which is warmer?")
    sent = last_body(standin)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[-1]["content"] == [
        result_block(rome.id, "20 C, sunny"),
        result_block(paris.id, "18 C, cloudy"),
        {"type": "text", "text": "Which is warmer?"},
    ]
    assert final.stop_reason == "end_turn"


def test_bad_results_and_early_sends_are_refused_and_write_nothing(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    reply = conv.send("Weather in Paris and Rome?")
    paris, rome = reply.tool_uses
    requests = len(standin.requests)
    before = row_counts(store)
    with pytest.raises(HistoryError, match="toolu_unknown"):
        conv.add_tool_result("toolu_unknown", "?")
    with pytest.raises(HistoryError, match="tool_use"):
        conv.send("Hello?")
    assert row_counts(store) == before

    conv.add_tool_result(paris.id, "18 C")
    before = row_counts(store)
    with pytest.raises(HistoryError, match=paris.id):
        conv.add_tool_result(paris.id, "18 C again")
    with pytest.raises(HistoryError, match=rome.id):
        conv.send("Hello?")
    with pytest.raises(HistoryError, match=rome.id):
        conv.send()
    assert row_counts(store) == before
    assert len(standin.requests) == requests

    conv.add_tool_result(rome.id, "20 C")
    with pytest.raises(HistoryError):
        conv.add_tool_result(rome.id, "20 C again")
    assert conv.send().stop_reason == "end_turn"


def test_continuing_right_after_a_tool_use_names_the_missing_results(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    """send() with no text right after a tool_use reply must say the results are missing, not
    "the branch ends with Claude's reply; give text" (giving text is refused too)."""
    reply = conv.send("What's the weather in Paris?")
    before = row_counts(store)
    with pytest.raises(HistoryError, match=reply.tool_uses[0].id):
        conv.send()
    assert row_counts(store) == before
    assert len(standin.requests) == 1


def test_add_user_while_a_tool_use_is_unanswered_is_refused(
    store: Store, conv: Conversation
) -> None:
    """A user text turn between a tool_use and its result makes the branch unsendable for good
    (the result can never again come first): refuse it as send(text) does."""
    reply = conv.send("What's the weather in Paris?")
    before = row_counts(store)
    with pytest.raises(HistoryError):
        conv.add_user("never mind")
    assert row_counts(store) == before
    conv.add_tool_result(reply.tool_uses[0].id, "18 C")
    conv.send()


# -- the tool loop --------------------------------------------------------------------------


def test_run_calls_the_tools_and_stores_every_step(store: Store, standin: StandIn) -> None:
    calls: list[str] = []

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return {"Paris": "18 C, cloudy", "Rome": "20 C, sunny"}[city]

    conv = store.create()
    reply = conv.run("Weather in Paris and Rome?", tools=[get_weather], max_steps=8)
    assert calls == ["Paris", "Rome"]
    assert reply.stop_reason == "end_turn"
    assert reply.text == f"{LABEL}Tool results: get_weather: 18 C, cloudy; get_weather: 20 C, sunny"
    kinds = [(t.role, t.kind) for t in conv.turns()]
    assert kinds == [
        ("user", "user"), ("assistant", "reply"),
        ("user", "tool_result"), ("user", "tool_result"), ("assistant", "reply"),
    ]
    uses = conv.turns()[1].content
    assert [b["input"] for b in uses if b["type"] == "tool_use"] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [t.content for t in conv.turns()[2:4]] == [
        [result_block(uses[1]["id"], "18 C, cloudy")],
        [result_block(uses[2]["id"], "20 C, sunny")],
    ]
    # The definitions went with every request, derived from the function.
    assert [len(r["body"]["tools"]) for r in standin.requests] == [1, 1]
    assert standin.requests[0]["body"]["tools"][0]["name"] == "get_weather"
    assert len(conv.calls()) == 2


def test_a_tool_that_raises_becomes_an_error_result(store: Store, standin: StandIn) -> None:
    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        if city == "Rome":
            raise LookupError(f"no station in {city}")
        return "18 C"

    conv = store.create()
    reply = conv.run("Weather in Paris and Rome?", tools=[get_weather])
    results = [b for m in last_body(standin)["messages"][-1:] for b in m["content"]]
    assert results[0] == result_block(results[0]["tool_use_id"], "18 C")
    assert results[1]["is_error"] is True
    assert results[1]["content"] == "LookupError: no station in Rome"
    assert "error LookupError: no station in Rome" in reply.text


@pytest.mark.parametrize(
    "outcome",
    [
        OSError("cannot open \udcff.txt"),  # a lone surrogate, as an undecodable file name gives
        [{"type": "text", "text": ""}],  # an empty block the API refuses
        [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
    ],
    ids=["raises-with-a-surrogate", "empty-block", "cache-marker"],
)
def test_a_result_the_store_refuses_is_stored_as_an_error_and_not_run_again(
    store: Store, standin: StandIn, outcome: Any
) -> None:
    ran: list[str] = []

    @convo.tool
    def get_weather(city: str) -> Any:
        """The current weather in a city."""
        ran.append(city)
        if city == "Paris":
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return "20 C"

    conv = store.create()
    reply = conv.run("Weather in Paris and Rome?", tools=[get_weather])
    assert ran == ["Paris", "Rome"] and reply.stop_reason == "end_turn"
    first, second = (t.content[0] for t in conv.turns()[2:4])
    assert first["is_error"] is True and "is_error" not in second
    text = first["content"] if isinstance(first["content"], str) else first["content"][0]["text"]
    assert text.strip()
    text.encode("utf-8")  # storable anywhere: no lone surrogate left
    assert not conv.pending_tool_uses()


def test_run_refuses_async_tools_before_sending(store: Store, standin: StandIn) -> None:
    async def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    conv = store.create()
    before = row_counts(store)
    with pytest.raises(InvalidInput, match="async"):
        conv.run("What's the weather in Paris?", tools=[convo.tool(get_weather)])
    assert row_counts(store) == before and standin.requests == []


def test_run_writes_its_images_and_prefill_once(store: Store, tmp_path: Path) -> None:
    from test_content import make_png

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    image = tmp_path / "p.png"
    image.write_bytes(make_png(2, 2))
    conv = store.create()
    reply = conv.run("What's the weather in Paris?", tools=[get_weather], images=[image])
    assert reply.stop_reason == "end_turn"
    kinds = [(t.kind, [b["type"] for b in t.content]) for t in conv.turns()]
    assert kinds == [
        ("user", ["image", "text"]), ("reply", ["text", "tool_use"]),
        ("tool_result", ["tool_result"]), ("reply", ["text"]),
    ]


def test_run_resumed_after_it_had_finished_returns_its_last_reply(store: Store, standin: StandIn) -> None:
    """The process died after the final reply was stored: resuming sends nothing again."""

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    conv = store.create()
    final = conv.run("What's the weather in Paris?", tools=[get_weather])
    sent = len(standin.requests)
    again = conv.run(None, tools=[get_weather])
    assert len(standin.requests) == sent
    # (The ledger keeps the model asked for; the API's answer names the model that replied.)
    assert again.model_dump(exclude={"model"}) == final.model_dump(exclude={"model"})
    # A turn added after it is still sent by a resumed run.
    conv.add_user("And Rome?")
    assert conv.run(None, tools=[get_weather]).turn_id == conv.turns()[-1].id != final.turn_id


def test_run_stops_at_max_steps_with_the_tool_use_unanswered(store: Store) -> None:
    ran: list[str] = []

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append(city)
        return "18 C"

    conv = store.create()
    reply = conv.run("What's the weather in Paris?", tools=[get_weather], max_steps=1)
    assert reply.stop_reason == "tool_use"
    assert ran == []
    assert [u.id for u in conv.pending_tool_uses()] == [u.id for u in reply.tool_uses]
    assert conv.turns()[-1].id == reply.turn_id
    with pytest.raises(InvalidInput):
        conv.run("again", tools=[get_weather], max_steps=0)
    # Picking the loop up later finishes it.
    final = conv.run(None, tools=[get_weather])
    assert ran == ["Paris"] and final.stop_reason == "end_turn"


CRASHING_RUN = r"""
import os, sys
from pathlib import Path
import convo
url, cid, log, crash = sys.argv[1:5]

@convo.tool
def get_weather(city: str) -> str:
    "The current weather in a city."
    with open(log, "a") as f:
        f.write(city + "\n")
    if city == crash:
        os._exit(3)  # the process dies mid-loop: no cleanup, no exception handlers
    return {"Paris": "18 C, cloudy", "Rome": "20 C, sunny"}[city]

store = convo.Store(url)
conv = store.get(cid)
content = None if sys.argv[5] == "resume" else "Weather in Paris and Rome?"
reply = conv.run(content, tools=[get_weather])
print(reply.stop_reason)
print(reply.text)
store.close()
"""


@pytest.mark.slow
def test_run_resumes_in_a_new_process_without_rerunning_finished_tools(
    db_url: str, store: Store, standin: StandIn, tmp_path: Path
) -> None:
    conv = store.create()
    log = tmp_path / "tool-calls.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CONVO_"))},
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": standin.base_url,
        "PYTHONPATH": str(REPO),
    }

    def child(crash: str, mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CRASHING_RUN, db_url, conv.id, str(log), crash, mode],
            check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
        )

    crashed = child("Rome", "start")
    assert crashed.returncode == 3, crashed.stderr
    assert log.read_text().split() == ["Paris", "Rome"]
    # Paris has its result; Rome's tool_use is still open.
    assert [t.kind for t in conv.turns()] == ["user", "reply", "tool_result"]
    assert [u.input for u in conv.pending_tool_uses()] == [{"city": "Rome"}]

    done = child("nowhere", "resume")
    assert done.returncode == 0, done.stderr
    assert log.read_text().split() == ["Paris", "Rome", "Rome"]  # Paris ran once
    stop_reason, text = done.stdout.splitlines()
    assert stop_reason == "end_turn"
    assert text == f"{LABEL}Tool results: get_weather: 18 C, cloudy; get_weather: 20 C, sunny"
    assert [t.kind for t in conv.turns()] == ["user", "reply", "tool_result", "tool_result", "reply"]
    assert len(standin.requests) == 2
    assert [b["type"] for b in last_body(standin)["messages"][-1]["content"]] == ["tool_result"] * 2


def test_resume_with_a_result_added_by_hand(store: Store) -> None:
    ran: list[str] = []

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append(city)
        return "20 C"

    conv = store.create()
    reply = conv.send("Weather in Paris and Rome?", tools=[get_weather])
    conv.add_tool_result(reply.tool_uses[0].id, "18 C (by hand)")
    final = conv.run(None, tools=[get_weather])
    assert ran == ["Rome"]
    assert final.text.endswith("get_weather: 18 C (by hand); get_weather: 20 C")

    # Crashed after the last result was stored, before sending it: resume only sends.
    again = conv.send("Weather in Oslo and Rome?", tools=[get_weather])
    for use in again.tool_uses:
        conv.add_tool_result(use.id, "cold")
    final = conv.run(None, tools=[get_weather])
    assert ran == ["Rome"]
    assert final.stop_reason == "end_turn"
    assert final.text.endswith("get_weather: cold; get_weather: cold")


# -- structured output ----------------------------------------------------------------------


class City(BaseModel):
    name: str
    population: int


def test_send_json_with_a_pydantic_model(store: Store, standin: StandIn) -> None:
    conv = store.create()
    value = conv.send_json("Tell me about Paris", City)
    assert value == City(name="Paris", population=1)
    body = last_body(standin)
    assert body["tool_choice"] == {"type": "tool", "name": "record_output"}
    assert body["tools"][0]["input_schema"]["required"] == ["name", "population"]
    reply_turn, result_turn = conv.turns()[-2:]
    assert reply_turn.kind == "reply" and reply_turn.stop_reason == "tool_use"
    (use,) = [b for b in reply_turn.content if b["type"] == "tool_use"]
    assert use["input"] == {"name": "Paris", "population": 1}
    assert result_turn.kind == "tool_result"
    assert result_turn.content[0]["tool_use_id"] == use["id"]
    assert not result_turn.content[0].get("is_error")
    # Not a conversation setting: the next send offers no tools to call. The API refuses
    # tool blocks in a request that defines no tools, so the one in the history is named
    # again, and tool_choice none keeps the model from calling it.
    conv.send("Thanks")
    body = last_body(standin)
    assert [t["name"] for t in body["tools"]] == ["record_output"]
    assert body["tool_choice"] == {"type": "none"}
    assert conv.turns()[-1].content[-1]["type"] == "text"


def test_a_run_with_its_own_tools_leaves_a_history_later_sends_can_replay(
    store: Store, standin: StandIn
) -> None:
    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    conv = store.create()
    conv.run("What's the weather in Paris?", tools=[get_weather])
    reply = conv.send("And tomorrow, in general terms?")  # the stand-in enforces the API's rule
    assert reply.stop_reason == "end_turn" and not reply.tool_uses
    body = last_body(standin)
    assert [t["name"] for t in body["tools"]] == ["get_weather"]
    assert body["tool_choice"] == {"type": "none"}
    # Tools the request defines itself are sent as they are, without tool_choice none.
    conv.send("Weather in Rome?", tools=[WEATHER])
    assert last_body(standin)["tools"] == [WEATHER] and "tool_choice" not in last_body(standin)


def test_send_json_with_thinking_on_asks_instead_of_forcing(store: Store, standin: StandIn) -> None:
    """The API refuses a forced tool call with extended thinking on."""
    conv = store.create(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000})
    value = conv.send_json("Please record Paris", City)
    assert value == City(name="Paris", population=1)
    body = last_body(standin)
    assert body["tool_choice"] == {"type": "auto"} and body["thinking"]["type"] == "enabled"
    # Off for one request, it forces the call again; adaptive thinking allows forcing it.
    conv.send_json("Please record Rome", City, thinking=None)
    assert last_body(standin)["tool_choice"] == {"type": "tool", "name": "record_output"}
    conv.send_json("Please record Oslo", City, thinking={"type": "adaptive"})
    assert last_body(standin)["tool_choice"] == {"type": "tool", "name": "record_output"}


def test_an_edited_tool_use_turn_cannot_be_answered_with_thinking_on(store: Store, standin: StandIn) -> None:
    conv = store.create(
        tools=[WEATHER], max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}
    )
    reply = conv.send("What's the weather in Paris?")
    assert reply.content[0]["type"] == "thinking"
    (use,) = reply.tool_uses
    assert reply.turn_id is not None
    conv.edit(reply.turn_id, [{"type": "tool_use", "id": use.id, "name": use.name, "input": {"city": "Rome"}}])
    conv.add_tool_result(use.id, "18 C")
    sent = len(standin.requests)
    with pytest.raises(HistoryError, match="must start with Claude's thinking"):
        conv.send()
    assert len(standin.requests) == sent
    assert conv.send(thinking=None).text  # without thinking, the edited loop goes on


def test_send_json_with_a_json_schema(store: Store) -> None:
    conv = store.create()
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["city", "unit", "tags"],
    }
    value = conv.send_json("Weather report for Oslo and Bergen", schema)
    assert value == {"city": "Oslo", "unit": "celsius", "tags": ["Oslo", "Bergen"]}


class Crowd(BaseModel):
    size: int = Field(ge=5)


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 5}}, "required": ["n"]},
            "n: 1 is less than the minimum of 5",
        ),
        (
            {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]{3}$"}}, "required": ["code"]},
            "code: 'Paris' does not match",
        ),
        (Crowd, "size: Input should be greater than or equal to 5"),
    ],
    ids=["minimum", "pattern", "pydantic"],
)
def test_send_json_invalid_output(
    store: Store, standin: StandIn, schema: Any, expected: str
) -> None:
    conv = store.create()
    with pytest.raises(OutputInvalid) as info:
        conv.send_json("Tell me about Paris", schema)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(expected)
    assert expected in str(info.value)
    assert info.value.output in ({"n": 1}, {"code": "Paris"}, {"size": 1})
    # The reply and an error result are stored, and the thread stays sendable.
    result = conv.turns()[-1]
    assert result.kind == "tool_result" and result.content[0]["is_error"] is True
    assert conv.pending_tool_uses() == []
    reply = conv.send("Never mind")
    assert reply.stop_reason == "end_turn"
    assert last_body(standin)["messages"][-1]["content"][0]["is_error"] is True


# -- edits and forks around tool turns ------------------------------------------------------


def test_fork_right_after_a_tool_result(store: Store, conv: Conversation, standin: StandIn) -> None:
    reply = conv.send("What's the weather in Paris?")
    result = conv.add_tool_result(reply.tool_uses[0].id, "18 C, cloudy")
    conv.send()
    main_turns = [t.id for t in conv.turns()]
    assert conv.fork(result) == "fork-1"
    again = conv.send()
    assert again.text.endswith("get_weather: 18 C, cloudy")
    assert [t.id for t in conv.turns()] == [*main_turns[:3], again.turn_id]
    assert [t.id for t in conv.turns("main")] == main_turns


def test_edit_a_tool_result_keeps_the_pairing(store: Store, conv: Conversation, standin: StandIn) -> None:
    reply = conv.send("What's the weather in Paris?")
    use = reply.tool_uses[0]
    old = conv.add_tool_result(use.id, "18 C, cloudy", is_error=True)
    conv.send()
    new = conv.edit(old, "19 C, clear")
    assert conv.branch == "edit-1"
    row = conv.turn(new)
    assert (row.kind, row.parent_id, row.source_id) == ("tool_result", reply.turn_id, old)
    assert row.content == [result_block(use.id, "19 C, clear")]
    final = conv.send()
    assert last_body(standin)["messages"][-1]["content"] == [result_block(use.id, "19 C, clear")]
    assert final.text.endswith("get_weather: 19 C, clear")
    # The original result is still on main.
    assert conv.turns("main")[2].content == [result_block(use.id, "18 C, cloudy", is_error=True)]


def test_edit_one_of_two_parallel_results(store: Store, conv: Conversation, standin: StandIn) -> None:
    reply = conv.send("Weather in Paris and Rome?")
    paris, rome = reply.tool_uses
    first = conv.add_tool_result(paris.id, "18 C")
    second = conv.add_tool_result(rome.id, "20 C")

    conv.edit(second, "21 C")
    conv.send()
    assert last_body(standin)["messages"][-1]["content"] == [
        result_block(paris.id, "18 C"), result_block(rome.id, "21 C"),
    ]

    # Editing the first result gives a branch where Rome is still to be answered, exactly the
    # state add_tool_result leaves between two results.
    conv.checkout("main")
    conv.edit(first, "17 C")
    assert [u.id for u in conv.pending_tool_uses()] == [rome.id]
    conv.add_tool_result(rome.id, "20 C")
    conv.send()
    assert last_body(standin)["messages"][-1]["content"] == [
        result_block(paris.id, "17 C"), result_block(rome.id, "20 C"),
    ]


def test_edit_a_tool_use_reply(store: Store, conv: Conversation, standin: StandIn) -> None:
    """Editing the reply that asked for a tool gives a synthetic turn; it can ask again."""
    reply = conv.send("What's the weather in Paris?")
    assert reply.turn_id is not None
    mine = {"type": "tool_use", "id": "toolu_mine", "name": "get_weather", "input": {"city": "Lyon"}}
    new = conv.edit(reply.turn_id, [mine])
    assert conv.turn(new).kind == "synthetic"
    assert [u.id for u in conv.pending_tool_uses()] == ["toolu_mine"]
    conv.add_tool_result("toolu_mine", "15 C")
    assert conv.send().text.endswith("get_weather: 15 C")


def test_blank_text_blocks_of_a_reply_are_not_stored(db_url: str) -> None:
    """The API can answer `""` before a tool_use (and a streamed text block may get no delta):
    replayed, it would make every later request a 400 (empty text blocks are refused)."""
    import httpx

    reply = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": ""},
            {"type": "text", "text": "  \n"},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=reply)))
    with http, Client(api_key="k", base_url="https://api.invalid", http_client=http) as client, Store(
        db_url, client=client
    ) as store:
        conv = store.create(tools=[WEATHER])
        got = conv.send("What's the weather in Paris?")
        assert [b["type"] for b in got.content] == ["tool_use"]
        assert [b["type"] for b in conv.turns()[-1].content] == ["tool_use"]
        conv.add_tool_result("toolu_1", "18 C")
        assert conv.request()["messages"][1]["content"] == [reply["content"][2]]  # type: ignore[index]


def test_run_gives_images_and_prefill_to_its_first_send_only() -> None:
    """What run() passes to each send, with a conversation that records it (the stand-in
    continues a prefill instead of calling a tool, so the loop would stop after one step)."""
    from types import SimpleNamespace

    from convo.runner import run
    from convo.types import ToolUse

    sends: list[tuple[Any, dict[str, Any]]] = []
    uses = [ToolUse(id="toolu_1", name="get_weather", input={"city": "Paris"}), None]

    class Conv:
        def send(self, content: Any = None, **kw: Any) -> Any:
            sends.append((content, kw))
            use = uses[len(sends) - 1]
            return SimpleNamespace(
                stop_reason="tool_use" if use else "end_turn", tool_uses=[use] if use else []
            )

        def pending_tool_uses(self) -> list[Any]:
            return [uses[0]] if len(sends) == 1 else []

        def add_tool_result(self, *args: Any, **kw: Any) -> None:
            pass

    @convo.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "18 C"

    run(Conv(), "Weather?", tools=[get_weather], images=["p.png"], prefill="It is", temperature=0.5)  # type: ignore[arg-type]
    assert [sorted(kw) for _, kw in sends] == [
        ["images", "prefill", "temperature", "tools"], ["temperature", "tools"]
    ]
    assert sends[0][0] == "Weather?" and sends[1][0] is None


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"s": {"type": "string", "pattern": "("}}, "required": ["s"]},
        {"type": "object", "properties": {"s": {"type": "strin"}}},
        {"type": "object", "properties": {"s": {"type": 5}}},
        {"type": "object", "$ref": "#/nope"},
    ],
    ids=["bad-pattern", "unknown-type", "type-not-a-string", "dangling-ref"],
)
def test_send_json_refuses_a_schema_it_could_not_apply_before_sending(
    store: Store, standin: StandIn, schema: dict[str, Any]
) -> None:
    conv = store.create()
    before = row_counts(store)
    with pytest.raises(InvalidInput, match="not a usable JSON schema"):
        conv.send_json("Tell me about Paris", schema)
    assert row_counts(store) == before and standin.requests == []
    with pytest.raises(InvalidInput, match="sets tool_choice itself"):
        conv.send_json("Tell me about Paris", City, tool_choice={"type": "auto"})
    assert conv.send("hello").text  # the branch is as it was


@pytest.mark.parametrize(
    "change",
    [
        {"content": "just text"},
        {"content": ["x"]},
        {"usage": [1, 2]},
        {"usage": {"input_tokens": 1, "output_tokens": 1, "cache_creation": [1]}},
        {"usage": {"input_tokens": "abc", "output_tokens": 1}},
        {"usage": {"input_tokens": 1, "output_tokens": 1.5}},
        {"usage": {"input_tokens": 1, "output_tokens": 2**63}},
        {"usage": {"input_tokens": -5, "output_tokens": 1}},
        {"stop_reason": 5},
        {"id": 5},
    ],
)
def test_a_malformed_reply_fails_its_call_and_keeps_the_turn(db_url: str, change: dict[str, Any]) -> None:
    """A 200 whose message is not of the API's shape: an APIError, the call recorded as
    failed (not left pending), the user's turn kept once, nothing stored as a reply, and the
    branch free for a retry."""
    import httpx

    good = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    answers = [{**good, **change}, good]
    http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answers.pop(0))))
    with http, Client(api_key="k", base_url="https://api.invalid", http_client=http) as client, Store(
        db_url, client=client
    ) as store:
        conv = store.create()
        with pytest.raises(convo.APIError, match="malformed message"):
            conv.send("hi")
        assert [t.kind for t in conv.turns()] == ["user"]
        assert [c["status"] for c in conv.calls()] == ["error"]
        assert conv.retry().text == "hello"
        assert [t.kind for t in conv.turns()] == ["user", "reply"]

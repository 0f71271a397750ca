"""Token spend: the calls ledger, prices, audits, budgets and prompt-cache breakpoints.

Against a real loopback `StandIn`, on SQLite and PostgreSQL. Expected figures are computed here
independently: prices by hand, and each request's prompt tokens from the body the stand-in
received, following the stand-in's documented rule (canonical JSON of each item, chars / 4).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from helpers.kit import posts

from convo import BudgetExceeded, ContentError, InvalidInput, Store
from convo.client import Client
from convo.errors import BadRequestError
from convo.pricing import Price, PriceTable
from convo.standin import StandIn
from convo.types import Usage

KEY = "sk-test-standin-key"
SONNET = "claude-sonnet-4-5"
# USD per token for claude-sonnet-4-5: 3 / 15 per million, writes 1.25x (5m) or 2x (1h), reads 0.1x
IN, OUT = 3e-6, 15e-6
SYSTEM = " ".join(f"Rule {i}: answer the question you are asked, and nothing else." for i in range(95))


# -- fixtures and independent helpers ------------------------------------------------------


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def prompt_tokens(body: dict[str, Any]) -> int:
    """The request's whole input in the stand-in's documented token rule (not its code)."""
    def strip(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if k != "cache_control"}

    items = [["tool", strip(t)] for t in body.get("tools") or []]
    items += [["system", strip(b)] for b in (_blocks(body["system"]) if body.get("system") else [])]
    items += [[m["role"], strip(b)] for m in body["messages"] for b in _blocks(m["content"])]
    chars = sum(len(_canon(i)) for i in items)
    return (chars + 3) // 4


def billed_input(call: dict[str, Any]) -> int:
    return call["input_tokens"] + call["cache_creation_input_tokens"] + call["cache_read_input_tokens"]


def sonnet_cost(c: dict[str, Any]) -> float:
    """Hand-computed cost of a claude-sonnet-4-5 ledger row."""
    w1h = c["cache_creation_1h_input_tokens"] or 0
    w5m = c["cache_creation_input_tokens"] - w1h
    return (c["input_tokens"] * IN + c["output_tokens"] * OUT + w5m * IN * 1.25
            + w1h * IN * 2 + c["cache_read_input_tokens"] * IN * 0.1)


def breakpoints(body: dict[str, Any]) -> int:
    n = 1 if body.get("cache_control") is not None else 0
    n += sum("cache_control" in t for t in body.get("tools") or [])
    if isinstance(body.get("system"), list):
        n += sum("cache_control" in b for b in body["system"])
    n += sum("cache_control" in b for m in body["messages"] for b in _blocks(m["content"]))
    return n


# -- prices by hand ------------------------------------------------------------------------


def test_sonnet_45_hand_computed_cost() -> None:
    table = PriceTable.default()
    usage = Usage(input_tokens=1000, output_tokens=500, cache_creation_input_tokens=2000,
                  cache_read_input_tokens=10000)
    # 1000*3 + 500*15 + 2000*3.75 + 10000*0.30 = 21,000 per million
    assert table.cost(SONNET, usage) == pytest.approx(0.021)
    assert table.cost("claude-sonnet-4-5-20250929", usage) == pytest.approx(0.021)
    # with no caching the same tokens would all be plain input
    assert table.uncached_cost(SONNET, usage) == pytest.approx((13000 * 3 + 500 * 15) / 1e6)


def test_one_hour_writes_cost_twice_input() -> None:
    table = PriceTable.default()
    one_hour = Usage(cache_creation_input_tokens=2000, cache_creation_5m_input_tokens=0,
                     cache_creation_1h_input_tokens=2000)
    assert table.cost(SONNET, one_hour) == pytest.approx(2000 * 6 / 1e6)
    split = Usage(input_tokens=10, output_tokens=20, cache_creation_input_tokens=3000,
                  cache_creation_5m_input_tokens=1000, cache_creation_1h_input_tokens=2000,
                  cache_read_input_tokens=400)
    assert table.cost(SONNET, split) == pytest.approx(
        (10 * 3 + 20 * 15 + 1000 * 3.75 + 2000 * 6 + 400 * 0.3) / 1e6
    )
    # without a split every write is priced as a 5-minute one
    plain = Usage(cache_creation_input_tokens=2000)
    assert table.cost(SONNET, plain) == pytest.approx(2000 * 3.75 / 1e6)


@pytest.mark.parametrize(
    ("model", "inp", "out"),
    [
        ("claude-opus-4-5", 5, 25),
        ("claude-opus-4-1", 15, 75),
        ("claude-haiku-4-5", 1, 5),
        ("claude-3-5-haiku-20241022", 0.8, 4),
        ("claude-3-haiku-20240307", 0.25, 1.25),
        ("claude-sonnet-4-6", 3, 15),
    ],
)
def test_price_table_figures(model: str, inp: float, out: float) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_creation_input_tokens=1_000_000,
                  cache_read_input_tokens=1_000_000)
    assert PriceTable.default().cost(model, usage) == pytest.approx(inp + out + inp * 1.25 + inp * 0.1)


def test_unknown_model_has_no_price() -> None:
    assert PriceTable.default().cost("acme-llm-1", Usage(input_tokens=5)) is None


# -- the ledger ----------------------------------------------------------------------------


def test_overlong_values_from_the_server_are_cut_to_fit_the_ledger(store: Store, standin: StandIn) -> None:
    """An error type or request id longer than its column is the server's doing: the call is
    still recorded (cut to fit), the API's error still raised, and the export still works."""
    conv = store.create(SONNET)
    standin.fail_next(400, error_type="x" * 100, headers={"request-id": "r" * 300})
    with pytest.raises(BadRequestError):
        conv.send("hello")
    (call,) = conv.calls()
    assert call["status"] == "error"
    assert call["error_type"] == "x" * 64
    assert len(call["request_id"]) == 200 and call["request_id"].endswith("rrr")
    assert store.export(conv.id)["calls"][0]["request_id"] == call["request_id"]
    assert conv.send("again").text  # the branch was released


def test_every_attempt_is_a_row_with_tokens_ids_duration_and_cost(
    store: Store, standin: StandIn
) -> None:
    conv = store.create(SONNET, system=SYSTEM)
    standin.fail_next(529)
    conv.send("First question")                       # 2 rows: error, ok
    standin.cut_stream_next(after_events=5)
    conv.stream("Second question").until_done()       # 2 rows: cut, ok
    standin.fail_next(400)
    with pytest.raises(BadRequestError):
        conv.send("Third question")                   # 1 row: error

    calls = conv.calls()
    assert [(c["status"], c["attempt"]) for c in calls] == [
        ("error", 0), ("ok", 1), ("cut", 0), ("ok", 1), ("error", 0)
    ]
    sent = posts(standin)
    assert len(sent) == 5
    for call, req in zip(calls, sent, strict=True):
        assert call["request_id"] and call["request_id"].startswith("req_standin_")
        assert call["duration_ms"] is not None and call["duration_ms"] >= 0
        assert call["finished_at"] >= call["started_at"]
        assert call["model"] == SONNET
        if call["status"] in ("ok", "cut"):
            # the four counts add up to exactly the prompt that was sent: cache tokens are
            # never counted again as input
            assert billed_input(call) == prompt_tokens(req["body"])
            assert call["cache_creation_5m_input_tokens"] == call["cache_creation_input_tokens"]
            assert call["cache_creation_1h_input_tokens"] == 0
            assert call["cost_usd"] == pytest.approx(sonnet_cost(call))
            assert call["uncached_cost_usd"] == pytest.approx(
                billed_input(call) * IN + call["output_tokens"] * OUT
            )
        else:
            assert billed_input(call) == 0 and call["output_tokens"] == 0
            assert not call["cost_usd"]
    # the request ids in the ledger are the ones the server sent back, in order
    assert len({c["request_id"] for c in calls}) == 5


def test_one_hour_cache_writes_are_split_and_priced_at_2x(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, system=SYSTEM, cache="1h")
    conv.send("First question")
    conv.send("Second question")
    first, second = conv.calls()
    assert first["cache_creation_input_tokens"] > 1024
    assert first["cache_creation_1h_input_tokens"] == first["cache_creation_input_tokens"]
    assert first["cache_creation_5m_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == billed_input(first)
    for c in (first, second):
        assert c["cost_usd"] == pytest.approx(sonnet_cost(c))
    assert first["cost_usd"] == pytest.approx(
        first["input_tokens"] * IN + first["cache_creation_input_tokens"] * IN * 2
        + first["output_tokens"] * OUT
    )


def test_cost_is_fixed_when_written(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET)
    conv.send("Hello")
    before = conv.calls()[0]
    total_before = store.usage().total.cost_usd
    assert before["cost_usd"] == pytest.approx(sonnet_cost(before))

    store.prices = PriceTable.default().with_overrides({SONNET: {"input": 300, "output": 1500}})
    after = conv.calls()[0]
    assert after["cost_usd"] == before["cost_usd"]
    assert store.usage().total.cost_usd == pytest.approx(total_before)

    conv.send("Again")
    new = conv.calls()[1]
    assert new["cost_usd"] == pytest.approx(sonnet_cost(new) * 100)
    assert store.usage().total.cost_usd == pytest.approx(before["cost_usd"] + new["cost_usd"])


def test_unknown_model_is_recorded_without_cost(store: Store, standin: StandIn) -> None:
    priced = store.create(SONNET)
    priced.send("Hello")
    conv = store.create("acme-llm-1")
    reply = conv.send("Hello")
    assert reply.cost_usd is None
    (call,) = conv.calls()
    assert call["status"] == "ok" and call["cost_usd"] is None and call["uncached_cost_usd"] is None
    assert billed_input(call) > 0 and call["output_tokens"] > 0

    report = store.usage(by="model")
    assert report.unpriced_calls == 1
    assert report.models_without_price == ["acme-llm-1"]
    rows = {r.key: r for r in report.rows}
    assert rows["acme-llm-1"].calls == 1 and rows["acme-llm-1"].cost_usd == 0.0
    assert report.total.cost_usd == pytest.approx(priced.calls()[0]["cost_usd"])
    # Each row says how many of its calls its cost leaves out: a bare $0.0000 read as free.
    assert (rows["acme-llm-1"].unpriced_calls, rows[SONNET].unpriced_calls) == (1, 0)
    assert report.total.unpriced_calls == 1
    from convo import render

    table = render.usage_table(report)
    assert [line for line in table.splitlines() if "+?" in line][0].startswith("acme-llm-1")
    assert render.usage_json(report)["rows"][0]["unpriced_calls"] in (0, 1)
    assert "unpriced_calls" in render.usage_csv(report).splitlines()[0]
    listed = {c.id: c for c in store.list()}  # `convo list` and `convo budget` say so too
    assert (listed[conv.id].unpriced_calls, listed[priced.id].unpriced_calls) == (1, 0)
    assert render.fmt_cost(0.0, 1) == "$0.0000+?" and render.fmt_cost(0.5) == "$0.5000"
    # the conversation's own report says the same
    own = store.usage(conversation=conv.id)
    assert own.unpriced_calls == 1 and own.models_without_price == ["acme-llm-1"]
    # a priced-only report is clean
    clean = store.usage(conversation=priced.id)
    assert clean.unpriced_calls == 0 and clean.models_without_price == []


def test_price_override_prices_an_unknown_model(db_url: str, client: Client, standin: StandIn) -> None:
    prices = PriceTable.default().with_overrides({"acme-llm-1": Price(input=2, output=10)})
    with Store(db_url, client=client, prices=prices, sleep=lambda s: None) as store:
        conv = store.create("acme-llm-1")
        reply = conv.send("Hello")
        (call,) = conv.calls()
        w = call["cache_creation_input_tokens"]
        expected = (call["input_tokens"] * 2 + w * 2.5 + call["cache_read_input_tokens"] * 0.2
                    + call["output_tokens"] * 10) / 1e6
        assert call["cost_usd"] == pytest.approx(expected)
        assert reply.cost_usd == pytest.approx(expected)
        assert store.usage().unpriced_calls == 0


# -- audit ---------------------------------------------------------------------------------


def _group(calls: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"calls": 0, "input": 0, "output": 0, "cw": 0, "cr": 0, "cost": 0.0}
    )
    for c in calls:
        g = out[key(c)]
        g["calls"] += 1
        g["input"] += c["input_tokens"]
        g["output"] += c["output_tokens"]
        g["cw"] += c["cache_creation_input_tokens"]
        g["cr"] += c["cache_read_input_tokens"]
        g["cost"] += c["cost_usd"] or 0.0
    return dict(out)


def _assert_report(report: Any, expected: dict[str, dict[str, Any]]) -> None:
    got = {r.key: r for r in report.rows}
    assert set(got) == set(expected)
    for k, e in expected.items():
        r = got[k]
        assert (r.calls, r.input_tokens, r.output_tokens, r.cache_creation_input_tokens,
                r.cache_read_input_tokens) == (e["calls"], e["input"], e["output"], e["cw"], e["cr"]), k
        assert r.cost_usd == pytest.approx(e["cost"]), k
    t = report.total
    assert t.calls == sum(e["calls"] for e in expected.values())
    assert t.input_tokens == sum(e["input"] for e in expected.values())
    assert t.output_tokens == sum(e["output"] for e in expected.values())
    assert t.cache_creation_input_tokens == sum(e["cw"] for e in expected.values())
    assert t.cache_read_input_tokens == sum(e["cr"] for e in expected.values())
    assert t.cost_usd == pytest.approx(sum(e["cost"] for e in expected.values()))


@pytest.fixture
def busy_store(store: Store, standin: StandIn) -> tuple[Store, Any, Any]:
    """Two conversations, two models, a retry, a cut stream and a deleted branch."""
    a = store.create(SONNET, system=SYSTEM)
    first = a.send("First question")
    standin.fail_next(500)
    a.send("Second question")
    assert first.turn_id is not None
    a.fork(first.turn_id, "alt")
    a.send("An alternative second question", model="claude-haiku-4-5")
    a.checkout("main")
    a.delete_branch("alt")
    standin.cut_stream_next(after_events=5)
    a.stream("Third question").until_done()
    b = store.create("claude-3-5-haiku-20241022")
    b.send("Hello from b")
    b.send("Hello again from b")
    return store, a, b


def test_usage_groupings_match_the_ledger(busy_store: tuple[Store, Any, Any]) -> None:
    store, a, b = busy_store
    calls = a.calls() + b.calls()
    assert len(calls) == 8
    assert {c["status"] for c in calls} == {"ok", "error", "cut"}

    _assert_report(store.usage(by="conversation"), _group(calls, lambda c: c["conversation_id"]))
    _assert_report(store.usage(by="model"), _group(calls, lambda c: c["model"]))
    _assert_report(
        store.usage(by="branch"), _group(calls, lambda c: f"{c['conversation_id']}:{c['branch']}")
    )
    _assert_report(
        store.usage(by="day"),
        _group(calls, lambda c: c["started_at"].astimezone(UTC).strftime("%Y-%m-%d")),
    )
    # one conversation, by branch: the deleted branch's spend is still there
    report = store.usage(conversation=a.id, by="branch")
    _assert_report(report, _group(a.calls(), lambda c: c["branch"]))
    assert {r.key for r in report.rows} == {"main", "alt"}
    assert "alt" not in {br.name for br in a.branches()}
    # a.usage() is the same report
    assert a.usage().rows == report.rows
    # a filter on the branch
    _assert_report(
        store.usage(conversation=a.id, branch="alt", by="model"),
        _group([c for c in a.calls() if c["branch"] == "alt"], lambda c: c["model"]),
    )
    # conversation refs may be unique prefixes
    assert store.usage(conversation=b.id[:20]).total.calls == 2


def test_a_stream_cut_before_its_final_usage_bills_an_estimate_of_what_it_sent(
    store: Store, standin: StandIn
) -> None:
    """The cumulative output count comes only in message_delta: a stream cut before it kept
    message_start's placeholder (1 token) however much text had arrived, and audits and
    budgets undercounted it. The received text now sets an estimate, marked as one."""
    from convo.tokens import estimate_text_tokens

    conv = store.create(SONNET)
    standin.cut_stream_next(after_events=12)
    conv.stream("Tell me about the weather in Paris in the spring").until_done()
    (cut,) = [c for c in conv.calls() if c["status"] == "cut"]
    assert len(cut["partial_text"]) > 20
    assert cut["output_tokens"] == estimate_text_tokens(cut["partial_text"]) > 1
    assert cut["error_message"].endswith("(output tokens estimated)")
    assert cut["cost_usd"] > 0


def test_cut_stream_usage_is_counted(busy_store: tuple[Store, Any, Any]) -> None:
    store, a, _ = busy_store
    (cut,) = [c for c in a.calls() if c["status"] == "cut"]
    assert billed_input(cut) > 0 and cut["output_tokens"] > 0 and cut["cost_usd"] > 0
    ok_only = [c for c in a.calls() if c["status"] == "ok"]
    total = store.usage(conversation=a.id).total
    assert total.cost_usd == pytest.approx(sum(c["cost_usd"] or 0 for c in a.calls()))
    assert total.cost_usd > sum(c["cost_usd"] for c in ok_only)
    assert total.output_tokens == sum(c["output_tokens"] for c in a.calls())


def test_usage_since_and_until(busy_store: tuple[Store, Any, Any]) -> None:
    store, a, b = busy_store
    calls = sorted(a.calls() + b.calls(), key=lambda c: (c["started_at"], c["id"]))
    pivot = calls[4]["started_at"]
    later = [c for c in calls if c["started_at"] >= pivot]
    earlier = [c for c in calls if c["started_at"] < pivot]
    assert later and earlier
    _assert_report(store.usage(since=pivot), _group(later, lambda c: c["conversation_id"]))
    _assert_report(store.usage(until=pivot), _group(earlier, lambda c: c["conversation_id"]))
    end = calls[6]["started_at"]
    window = [c for c in calls if pivot <= c["started_at"] < end]
    _assert_report(store.usage(since=pivot, until=end, by="model"), _group(window, lambda c: c["model"]))
    assert store.usage(since=calls[-1]["started_at"] + timedelta(seconds=1)).total.calls == 0
    assert store.usage(conversation=b.id, since=pivot).total.calls == sum(
        1 for c in later if c["conversation_id"] == b.id
    )


def test_usage_since_accepts_aware_datetimes_in_any_zone(busy_store: tuple[Store, Any, Any]) -> None:
    """`since` is an instant: the same instant written in UTC+05:00 selects the same calls."""
    store, a, b = busy_store
    calls = sorted(a.calls() + b.calls(), key=lambda c: (c["started_at"], c["id"]))
    pivot = calls[4]["started_at"]
    east = pivot.astimezone(timezone(timedelta(hours=5)))
    west = pivot.astimezone(timezone(timedelta(hours=-7)))
    expected = sum(1 for c in calls if c["started_at"] >= pivot)
    assert store.usage(since=pivot).total.calls == expected
    assert store.usage(since=east).total.calls == expected
    assert store.usage(since=west).total.calls == expected


def test_usage_rejects_unknown_grouping(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.usage(by="week")


# -- budgets -------------------------------------------------------------------------------


def _nothing_written(store: Store, conv: Any, turns: int, calls: int) -> None:
    assert conv.info.turn_count == turns
    assert len(conv.turns()) == turns
    assert len(conv.calls()) == calls


def test_conversation_budget_refuses_before_any_request(store: Store, standin: StandIn) -> None:
    # the worst case of a default request is over 1024 output tokens at $15/M = $0.0154
    conv = store.create(SONNET, budget_usd=0.01)
    with pytest.raises(BudgetExceeded):
        conv.send("Hello")
    assert posts(standin) == []
    _nothing_written(store, conv, 0, 0)
    # under budget the send goes through
    ok = store.create(SONNET, budget_usd=1.0)
    ok.send("Hello")
    assert len(posts(standin)) == 1
    _nothing_written(store, ok, 2, 1)


def test_a_budget_refuses_a_model_without_a_price(store: Store, standin: StandIn) -> None:
    """Its worst case cannot be priced, so no budget can be kept: refused, nothing written."""
    for budgeted in (store.create("acme-llm-1", budget_usd=5.0), None):
        if budgeted is None:
            store.set_budget(25.0)
        conv = budgeted or store.create("acme-llm-1")
        with pytest.raises(BudgetExceeded, match="no price for model acme-llm-1.*CONVO_PRICES"):
            conv.send("Hello")
        assert posts(standin) == []
        _nothing_written(store, conv, 0, 0)
    store.set_budget(None)
    store.create("acme-llm-1").send("Hello")  # with no budget it is sent, and counted unpriced
    assert len(posts(standin)) == 1 and store.usage().unpriced_calls == 1


def test_conversation_budget_counts_what_was_spent(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, system=SYSTEM, max_tokens=20, budget_usd=0.008)
    conv.send("First question")  # about $0.006 of cache writes
    spent = conv.calls()[0]["cost_usd"]
    estimate = prompt_tokens(conv.request("Second question"))
    worst = (estimate * 3.75 + 20 * 15) / 1e6  # input at the 5-minute cache write price
    assert spent < 0.008 < spent + worst
    n = len(posts(standin))
    with pytest.raises(BudgetExceeded):
        conv.send("Second question")
    assert len(posts(standin)) == n
    _nothing_written(store, conv, 2, 1)


def test_max_input_tokens_cap(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, system=SYSTEM, max_input_tokens=500)
    with pytest.raises(BudgetExceeded):
        conv.send("Hello")
    assert posts(standin) == []
    _nothing_written(store, conv, 0, 0)
    small = store.create(SONNET, max_input_tokens=500)
    small.send("Hello")
    assert len(posts(standin)) == 1


def test_max_input_tokens_applies_to_unpriced_models(store: Store, standin: StandIn) -> None:
    conv = store.create("acme-llm-1", system=SYSTEM, max_input_tokens=500)
    with pytest.raises(BudgetExceeded):
        conv.send("Hello")
    assert posts(standin) == []
    _nothing_written(store, conv, 0, 0)


def test_store_budget_boundary(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, system=SYSTEM, max_tokens=20)
    conv.send("First question")
    spent = store.usage().total.cost_usd
    # Input at the 5-minute cache write price (the request caches): the worst case.
    worst = (prompt_tokens(conv.request("Second question")) * 3.75 + 20 * 15) / 1e6
    n = len(posts(standin))

    store.set_budget(spent + worst - 1e-7)
    with pytest.raises(BudgetExceeded):
        conv.send("Second question")
    assert len(posts(standin)) == n
    _nothing_written(store, conv, 2, 1)

    store.set_budget(spent + worst + 1e-7)
    conv.send("Second question")
    assert len(posts(standin)) == n + 1
    _nothing_written(store, conv, 4, 2)

    store.set_budget(None)
    conv.send("Third question")
    assert len(posts(standin)) == n + 2


def test_the_worst_case_prices_input_as_a_cache_write_when_the_request_caches() -> None:
    """A prefix nothing has cached yet is billed at the write price (1.25x for 5 minutes, 2x
    for an hour): a budget checked at the plain input price let a send cost up to twice what
    it allowed for."""
    from convo.pricing import Price
    from convo.service import _worst_input_price

    price = Price(input=3, output=15)
    plain = {"model": SONNET, "messages": []}
    assert _worst_input_price(price, plain) == 3
    assert _worst_input_price(price, {**plain, "cache_control": {"type": "ephemeral"}}) == 3.75
    one_hour = {"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    assert _worst_input_price(price, {**plain, "system": [one_hour]}) == 6
    assert _worst_input_price(price, {**plain, "tools": [{"name": "t", "cache_control": {"type": "ephemeral"}}]}) == 3.75


def test_a_retry_is_held_to_the_budget_the_failed_attempt_spent_into(
    store: Store, standin: StandIn
) -> None:
    """Each automatic retry of a cut stream is billed again: retries were never checked, and
    a send spent three times its budget. The retry that would pass the budget is not made;
    the turn is kept for `retry` once the budget allows."""
    conv = store.create(SONNET, system=SYSTEM, max_tokens=20)
    worst = (prompt_tokens(conv.request("Tell me about Paris")) * 3.75 + 20 * 15) / 1e6
    conv.set_limits(budget_usd=worst * 1.2)
    standin.cut_stream_next(after_events=12, times=2)
    with pytest.raises(BudgetExceeded, match="not retried after .*your turn is saved"):
        conv.stream("Tell me about Paris").until_done()
    assert [c["status"] for c in conv.calls()] == ["cut"]
    assert len(posts(standin)) == 1
    # The retry's check reused the send's estimate: one count_tokens request, not one a try
    # (a request that may be failing for the same reason, with retries of its own).
    counted = [r for r in standin.requests if r["path"].endswith("/count_tokens")]
    assert len(counted) == 1
    assert [t.kind for t in conv.turns()] == ["user"]  # kept, unanswered
    conv.set_limits(budget_usd=None)
    standin.reset_faults()  # (the second cut was never asked for)
    assert conv.retry().text


@pytest.mark.parametrize("scope", ["conversation", "store"])
def test_a_retry_is_held_to_the_budgets_as_they_are_when_it_is_made(
    db_url: str, client: Client, standin: StandIn, scope: str
) -> None:
    """A retry comes after a failure and its backoff, in which another process may lower a
    budget: the retry was checked against the budgets read when the send began, and was made
    past the new one."""
    conv_id: list[str] = []

    def backoff(_delay: float) -> None:  # another process lowers the budget meanwhile
        with Store(db_url) as other:
            if scope == "store":
                other.set_budget(1e-9)
            else:
                other.get(conv_id[0]).set_limits(budget_usd=1e-9)

    with Store(db_url, client=client, sleep=backoff) as store:
        conv = store.create(SONNET, system=SYSTEM, max_tokens=20)
        conv_id.append(conv.id)
        conv.set_limits(budget_usd=10.0)
        store.set_budget(10.0)
        standin.cut_stream_next(after_events=12, times=1)
        with pytest.raises(BudgetExceeded, match=f"the {scope} budget .*not retried after .*your turn is saved"):
            conv.stream("Tell me about Paris").until_done()
        assert [c["status"] for c in conv.calls()] == ["cut"]
        assert len(posts(standin)) == 1
        assert [t.kind for t in conv.turns()] == ["user"]  # kept, for `retry` once allowed


def test_store_budget_spans_conversations_and_conversation_budget_does_not(
    store: Store, standin: StandIn
) -> None:
    big = store.create(SONNET, system=SYSTEM)
    big.send("Spend something")
    spent = store.usage().total.cost_usd
    assert spent > 0.005
    # a small request in another conversation, well under $0.001 on its own
    small = store.create(SONNET, max_tokens=10, budget_usd=0.001)
    small.send("Hi")  # its own budget only counts its own spend
    store.set_budget(0.002)
    n = len(posts(standin))
    with pytest.raises(BudgetExceeded, match="store"):
        small.send("Hi again")
    assert len(posts(standin)) == n
    _nothing_written(store, small, 2, 1)


def test_budget_values_are_validated(store: Store) -> None:
    bad: Any
    for bad in (0, -1, "5", True):
        with pytest.raises(InvalidInput):
            store.create(SONNET, budget_usd=bad)
        with pytest.raises(InvalidInput):
            store.set_budget(bad)
    with pytest.raises(InvalidInput):
        store.create(SONNET, max_input_tokens=0)


# -- cache breakpoints ---------------------------------------------------------------------


def test_default_requests_carry_top_level_cache_control(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, system="Be brief.")
    conv.send("Hello")
    conv.stream("Again").until_done()
    for req in posts(standin):
        assert req["body"]["cache_control"] == {"type": "ephemeral"}
        assert breakpoints(req["body"]) == 1


def test_one_hour_cache_adds_ttl(store: Store, standin: StandIn) -> None:
    conv = store.create(SONNET, cache="1h")
    conv.send("Hello")
    assert posts(standin)[-1]["body"]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    conv.send("Again", cache="5m")
    assert posts(standin)[-1]["body"]["cache_control"] == {"type": "ephemeral"}


def test_cache_off_omits_cache_control(store: Store, standin: StandIn) -> None:
    off = store.create(SONNET, cache="off", system=SYSTEM)
    off.send("Hello")
    body = posts(standin)[-1]["body"]
    assert "cache_control" not in body and breakpoints(body) == 0
    (call,) = off.calls()
    assert call["cache_creation_input_tokens"] == 0 and call["cache_read_input_tokens"] == 0
    assert call["input_tokens"] == prompt_tokens(body)

    on = store.create(SONNET)
    on.send("Hello", cache=None)
    assert "cache_control" not in posts(standin)[-1]["body"]
    on.send("Again", cache="off")
    assert "cache_control" not in posts(standin)[-1]["body"]
    on.send("Once more")
    assert posts(standin)[-1]["body"]["cache_control"] == {"type": "ephemeral"}


def test_invalid_cache_setting_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInput):
        store.create(SONNET, cache="10m")


def test_no_cache_control_is_ever_stored_in_turns(store: Store, standin: StandIn) -> None:
    conv = store.create("claude-3-5-haiku-20241022", system="Be brief.")
    conv.send("Hello")
    conv.send("Pick one.", prefill="The answer is (", max_tokens=5)
    conv.stream("Stream this").until_done()
    conv.add_user("A note")
    conv.add_assistant("A synthetic answer")
    conv.send("And now?")
    with pytest.raises(ContentError):
        conv.send([{"type": "text", "text": "Mark me", "cache_control": {"type": "ephemeral"}}])
    for t in store.storage.turns(conv.id):
        assert "cache_control" not in json.dumps(t.content), t
    for req in posts(standin):
        body = req["body"]
        assert all("cache_control" not in b for m in body["messages"] for b in _blocks(m["content"]))
        assert breakpoints(body) <= 4


def test_never_more_than_four_breakpoints(store: Store, standin: StandIn) -> None:
    """Markers the caller put on system blocks and tools, plus convo's automatic one, must not
    add up to more than the API's four: convo refuses up front or stays within the limit."""
    marked = {"type": "ephemeral"}
    system = [{"type": "text", "text": f"Part {i} of the rules.", "cache_control": marked}
              for i in range(3)]
    tools = [{"name": f"tool_{i}", "description": "A tool",
              "input_schema": {"type": "object", "properties": {}},
              "cache_control": marked} for i in range(2)]
    try:
        conv = store.create(SONNET, system=system, tools=tools)
        conv.send("Hello")
    except InvalidInput:
        assert posts(standin) == []
        return
    for req in posts(standin):
        assert breakpoints(req["body"]) <= 4


# -- end to end: a 30-turn thread with and without the cache -------------------------------


def _thread(store: Store, standin: StandIn, cache: str) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
    conv = store.create(SONNET, system=SYSTEM, cache=cache, max_tokens=200)
    replies = []
    first = len(posts(standin))
    for i in range(30):
        replies.append(conv.send(f"Question {i}: what is the next step of the plan, in one line?"))
    bodies = [r["body"] for r in posts(standin)[first:]]
    calls = conv.calls()
    assert len(calls) == len(bodies) == 30
    assert [c["status"] for c in calls] == ["ok"] * 30
    totals = [prompt_tokens(b) for b in bodies]
    for call, reply, total in zip(calls, replies, totals, strict=True):
        assert billed_input(call) == total
        assert call["output_tokens"] == -(-len(reply.text) // 4)
        assert call["cost_usd"] == pytest.approx(sonnet_cost(call))
        for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                    "cache_read_input_tokens"):
            assert call[key] == getattr(reply.usage, key)
    # audit totals == the ledger == what the stand-in reported in each reply
    report = store.usage(conversation=conv.id)
    for field in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                  "cache_read_input_tokens"):
        assert getattr(report.total, field) == sum(c[field] for c in calls) == sum(
            getattr(r.usage, field) for r in replies
        ), field
    assert report.total.cost_usd == pytest.approx(sum(r.cost_usd or 0.0 for r in replies))
    assert report.total.calls == 30
    return calls, replies, totals


def _equivalent(calls: list[dict[str, Any]]) -> float:
    return sum(c["input_tokens"] + 1.25 * c["cache_creation_input_tokens"]
               + 0.1 * c["cache_read_input_tokens"] for c in calls)


def test_thirty_turn_thread_caching_pays(db_url: str, sleeps: list[float]) -> None:
    assert len(SYSTEM) > 5500
    with StandIn(min_cacheable_tokens=1024) as standin, \
            Client(KEY, standin.base_url, sleep=sleeps.append) as client, \
            Store(db_url, client=client, sleep=sleeps.append) as store:
        cached, _, totals = _thread(store, standin, "5m")
        # every request reads the whole previous request from the cache and writes only what
        # was added since: history is replayed byte for byte
        assert cached[0]["cache_read_input_tokens"] == 0
        assert cached[0]["cache_creation_input_tokens"] == totals[0] > 1024
        for n in range(1, 30):
            assert cached[n]["cache_read_input_tokens"] == totals[n - 1], n
            assert cached[n]["cache_creation_input_tokens"] == totals[n] - totals[n - 1], n
            assert cached[n]["input_tokens"] == 0, n

        uncached, _, utotals = _thread(store, standin, "off")
        for c, t in zip(uncached, utotals, strict=True):
            assert c["cache_read_input_tokens"] == c["cache_creation_input_tokens"] == 0
            assert c["input_tokens"] == t

        ratio = _equivalent(cached) / _equivalent(uncached)
        cost_cached = sum(c["cost_usd"] for c in cached)
        cost_uncached = sum(c["cost_usd"] for c in uncached)
        print(
            f"\n30-turn thread ({db_url.split(':')[0]}): billed-input equivalent "
            f"{_equivalent(cached):,.0f} cached vs {_equivalent(uncached):,.0f} uncached tokens "
            f"= {ratio:.3f}; cost ${cost_cached:.4f} vs ${cost_uncached:.4f} "
            f"= {cost_cached / cost_uncached:.3f}"
        )
        assert ratio < 0.5
        assert cost_cached < cost_uncached
        # uncached_cost_usd of the cached thread is what the same tokens cost without caching
        saved = sum(c["uncached_cost_usd"] - c["cost_usd"] for c in cached)
        assert saved > 0
        assert sleeps == []


def test_a_call_in_the_last_microsecond_of_a_day_is_counted_in_that_day(store: Store) -> None:
    """Grouping by day, and `until`, agree on where a day ends, on both engines (SQLite keeps
    integer microseconds; a rounded conversion would put 23:59:59.9995 in the next day)."""
    conv = store.create("claude-sonnet-4-5")
    turn = conv.add_user("timed")
    edge = datetime(2024, 5, 1, 23, 59, 59, 999_999, tzinfo=UTC)
    for started in (edge, edge + timedelta(microseconds=1), edge - timedelta(hours=1)):
        call = store.storage.start_call(
            conv_id=conv.id, branch="main", turn_id=turn, model="claude-sonnet-4-5", attempt=0,
            streamed=False, started_at=started,
        )
        store.storage.finish_call(call, started_at=started, status="ok", input_tokens=1)
    assert {r.key: r.calls for r in store.usage(conversation=conv.id, by="day").rows} == {
        "2024-05-01": 2, "2024-05-02": 1
    }
    assert store.usage(conversation=conv.id, until=datetime(2024, 5, 2, tzinfo=UTC)).total.calls == 2
    assert [c["started_at"] for c in conv.calls()] == [
        edge - timedelta(hours=1), edge, edge + timedelta(microseconds=1)
    ]

"""Edit, branch and regenerate without losing anything, in O(1) writes (SQLite and PostgreSQL).

A conversation is a tree of immutable turns and a branch is a name pointing at one of them, so:
- fork / edit / regenerate add a branch row (and at most one turn), whatever the depth;
- the branch they start from is untouched: its request is byte-identical before and after;
- nothing is ever lost: an edited reply's call stays in the audit, a deleted branch's spend too.

The concurrency tests run real processes against one branch through a stand-in server in this
process, and check that the branch lease serializes them (no interleaved user turns).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

import convo
from convo import Conversation, Store
from convo.client import Client
from convo.errors import Conflict, ContentError, HistoryError, InvalidInput, NotFound
from convo.history import build_request
from convo.models import Base
from convo.standin import LABEL, StandIn
from convo.store import NewTurn
from convo.types import text_of

REPO = Path(__file__).resolve().parent.parent
TOOL_USE = {"type": "tool_use", "id": "toolu_0001", "name": "get_weather", "input": {"city": "Paris"}}


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
def store(db_url: str, standin: StandIn) -> Iterator[Store]:
    with Client(api_key="test-key", base_url=standin.base_url) as client, Store(
        db_url, client=client
    ) as s:
        yield s


@pytest.fixture
def conv(store: Store) -> Conversation:
    return store.create()


def row_counts(store: Store) -> dict[str, int]:
    """Rows of every convo table."""
    with store.storage.engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in Base.metadata.sorted_tables
        }


def diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


class WriteCounter:
    """INSERT / UPDATE / DELETE statements and the rows they touched, on one engine."""

    def __init__(self, store: Store) -> None:
        self.engine = store.storage.engine
        self.statements = 0
        self.rows = 0

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb in ("INSERT", "UPDATE", "DELETE"):
            self.statements += 1
            self.rows += max(cursor.rowcount, 0)

    def __enter__(self) -> Self:
        event.listen(self.engine, "after_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "after_cursor_execute", self._seen)


def tid(reply: convo.Reply) -> str:
    """The stored reply's turn id (a reply with content is always stored)."""
    assert reply.turn_id is not None
    return reply.turn_id


def texts(conv: Conversation, branch: str | None = None) -> list[tuple[str, str]]:
    return [(t.role, text_of(t.content)) for t in conv.turns(branch)]


def branch_names(conv: Conversation) -> list[str]:
    return [b.name for b in conv.branches()]


def exchange(conv: Conversation, n: int) -> list[int]:
    """n user/assistant pairs added without requests; returns the turn ids."""
    ids = []
    for i in range(n):
        ids.append(conv.add_user(f"question {i}"))
        ids.append(conv.add_assistant(f"answer {i}"))
    return ids


# -- fork ------------------------------------------------------------------------------------


def test_fork_makes_a_checked_out_branch_and_leaves_the_original_alone(conv: Conversation) -> None:
    ids = exchange(conv, 3)
    before = conv.request("next question")
    name = conv.fork(ids[1])
    assert name == "fork-1"
    assert conv.branch == "fork-1"
    assert [t.id for t in conv.turns()] == ids[:2]
    assert conv.turns("main")[-1].id == ids[-1]
    # The fork's head is the forked turn; the next turn hangs under it.
    new = conv.add_user("a different second question")
    assert conv.turn(new).parent_id == ids[1]
    assert [t.id for t in conv.turns()] == [*ids[:2], new]
    conv.checkout("main")
    assert conv.request("next question") == before
    assert [t.id for t in conv.turns()] == ids


def test_fork_accepts_an_id_as_typed(conv: Conversation) -> None:
    ids = exchange(conv, 2)
    conv.fork(str(ids[2]), "by-text")
    assert conv.turns()[-1].id == ids[2]
    with pytest.raises(NotFound):
        conv.fork("zzzzzzzzzzzzzzzzzzzz", "nowhere")
    with pytest.raises(NotFound):
        conv.fork(max(ids) + 1000, "nowhere")
    assert [b.name for b in conv.branches()] == ["main", "by-text"]


def test_generated_names_are_readable_and_unique(conv: Conversation) -> None:
    ids = exchange(conv, 2)
    assert conv.fork(ids[0]) == "fork-1"
    assert conv.fork(ids[1]) == "fork-2"
    assert conv.fork(ids[1], checkout=False) == "fork-3"
    assert conv.branch == "fork-2"
    assert conv.turn(conv.edit(ids[0], "edited")).parent_id is None
    assert conv.branch == "edit-1"
    conv.edit(ids[2], "edited again")
    assert conv.branch == "edit-2"
    names = branch_names(conv)
    assert names == ["main", "fork-1", "fork-2", "fork-3", "edit-1", "edit-2"]
    assert len(set(names)) == len(names)


def test_duplicate_branch_name_is_refused_and_nothing_written(store: Store, conv: Conversation) -> None:
    ids = exchange(conv, 2)
    conv.fork(ids[1], "idea")
    before = row_counts(store)
    for attempt in (
        lambda: conv.fork(ids[0], "idea"),
        lambda: conv.fork(ids[0], "main"),
        lambda: conv.edit(ids[0], "x", name="idea"),
        lambda: conv.regenerate(ids[0], name="main"),
    ):
        with pytest.raises(InvalidInput, match="already exists"):
            attempt()
    assert row_counts(store) == before
    assert conv.branch == "idea"


def test_a_name_is_taken_per_conversation_and_by_deleted_branches_with_spend(
    store: Store, conv: Conversation
) -> None:
    """The name check read with the turn looks at this conversation's branches and at its
    ledger: another conversation's branch of that name does not block it, a deleted branch
    that was billed does."""
    other = store.create()
    other_ids = exchange(other, 1)
    other.fork(other_ids[0], "shared-name")
    ids = exchange(conv, 1)
    assert conv.fork(ids[1], "shared-name") == "shared-name"
    conv.send("billed on this branch")
    conv.checkout("main")
    conv.delete_branch("shared-name")
    before = row_counts(store)
    with pytest.raises(InvalidInput, match="already exists"):
        conv.fork(ids[1], "shared-name")
    with pytest.raises(InvalidInput, match="already exists"):
        conv.edit(ids[0], "again", name="shared-name")
    assert row_counts(store) == before
    assert other.fork(other_ids[1], "fresh") == "fresh"


def test_fork_at_a_tool_use_without_its_result_is_refused(store: Store, conv: Conversation) -> None:
    conv.add_user("What's the weather in Paris?")
    asked = conv.add_assistant([TOOL_USE])
    conv.add_tool_result("toolu_0001", "18 C")
    before = row_counts(store)
    with pytest.raises(HistoryError, match="toolu_0001"):
        conv.fork(asked)
    assert row_counts(store) == before
    assert conv.branch == "main"


# -- edit ------------------------------------------------------------------------------------


def test_edit_a_user_turn_makes_a_sibling_on_a_new_branch(store: Store, conv: Conversation) -> None:
    ids = exchange(conv, 3)
    main_request = conv.request("more")
    new = conv.edit(ids[2], "question 1, rephrased")
    assert conv.branch == "edit-1"
    old_row, new_row = conv.turn(ids[2]), conv.turn(new)
    assert (new_row.parent_id, new_row.role) == (old_row.parent_id, old_row.role)
    assert new_row.source_id == ids[2]
    assert texts(conv) == [
        ("user", "question 0"), ("assistant", "answer 0"), ("user", "question 1, rephrased"),
    ]
    # Continue the edited branch through the stand-in.
    reply = conv.send()
    assert reply.text.startswith(LABEL) and "question 1, rephrased" in reply.text
    assert [t.id for t in conv.turns()][-2:] == [new, reply.turn_id]
    conv.checkout("main")
    assert conv.request("more") == main_request


def test_edit_an_assistant_reply_keeps_the_original_call_in_the_audit(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    reply = conv.send("Hello there")
    assert reply.turn_id is not None
    calls_before = conv.calls()
    assert [c["reply_id"] for c in calls_before] == [reply.turn_id]
    spent = store.usage(conversation=conv.id).total

    edited = conv.edit(reply.turn_id, "A reply I wrote myself")
    row = conv.turn(edited)
    assert (row.role, row.kind, row.source_id) == ("assistant", "synthetic", reply.turn_id)
    assert row.parent_id == conv.turn(reply.turn_id).parent_id
    assert conv.branch == "edit-1"

    # The audit still has the original reply's call, untouched.
    assert conv.calls() == calls_before
    assert store.usage(conversation=conv.id).total == spent

    # Replay sends the edited text, not the original reply.
    standin.clear_requests()
    conv.send("And then?")
    sent = standin.requests[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": [{"type": "text", "text": "A reply I wrote myself"}]}
    assert reply.text not in str(sent)
    assert len(conv.calls()) == 2
    # The original branch still replays the original reply.
    assert conv.turns("main")[-1].id == reply.turn_id
    assert text_of(conv.turns("main")[-1].content) == reply.text


def test_edit_the_root_turn(store: Store, conv: Conversation) -> None:
    ids = exchange(conv, 2)
    new = conv.edit(ids[0], "a whole new start")
    row = conv.turn(new)
    assert row.parent_id is None and row.depth == 0
    assert texts(conv) == [("user", "a whole new start")]
    assert conv.request()["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a whole new start"}]}
    ]
    assert [t.id for t in conv.turns("main")] == ids


def test_edit_refuses_bad_content_and_writes_nothing(store: Store, conv: Conversation) -> None:
    ids = exchange(conv, 1)
    before = row_counts(store)
    with pytest.raises(ContentError):
        conv.edit(ids[0], "   ")
    with pytest.raises(ContentError):
        conv.edit(ids[1], [{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}])
    with pytest.raises(NotFound):
        conv.edit("zzzzzzzzzzzz", "text")
    assert row_counts(store) == before
    assert conv.branch == "main"


def test_an_edit_carrying_an_image_stores_the_image_with_its_turn_or_neither(
    store: Store, conv: Conversation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a fork or an edit runs no transaction: its one write statement carries
    the edited turn's media too. Made to fail at that statement (the branch name's own check
    skipped, so the write meets a taken name), it leaves neither the image nor the turn."""
    import base64

    from test_content import make_png

    from convo.store import Branching

    ids = exchange(conv, 2)
    data = base64.b64encode(make_png(3, 3)).decode()
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "look at this"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
    ]
    before = row_counts(store)
    monkeypatch.setattr(Branching, "name_taken", lambda self, name: False)
    # (PostgreSQL, where another writer can take a name between the check and the write,
    # says so; on SQLite only this test's skipped check can get there.)
    postgres = store.storage.dialect == "postgresql"
    with pytest.raises(InvalidInput if postgres else convo.StoreError,
                       match="already exists" if postgres else "refused a value"):
        conv.edit(ids[2], blocks, name="main")
    assert row_counts(store) == before
    monkeypatch.undo()
    new = conv.edit(ids[2], blocks, name="with-image")
    after = row_counts(store)
    assert (after["blobs"], after["turns"]) == (before["blobs"] + 1, before["turns"] + 1)
    assert conv.branch == "with-image" and conv.turns()[-1].id == new
    sent = conv.request("and?")["messages"][-1]["content"]
    assert sent[:2] == blocks and conv.info.has_media


def test_edit_a_tool_result_into_plain_text_is_refused(store: Store, conv: Conversation) -> None:
    conv.add_user("What's the weather in Paris?")
    conv.add_assistant([TOOL_USE])
    result = conv.add_tool_result("toolu_0001", "18 C")
    before = row_counts(store)
    with pytest.raises(HistoryError, match="toolu_0001"):
        conv.edit(result, [{"type": "text", "text": "it is sunny"}])
    with pytest.raises(HistoryError, match="toolu_9999"):
        conv.edit(result, [{"type": "tool_result", "tool_use_id": "toolu_9999", "content": "x"}])
    assert row_counts(store) == before
    assert conv.branch == "main"


# -- regenerate ------------------------------------------------------------------------------


def test_regenerate_answers_the_same_user_turn_on_a_new_branch(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    first = conv.send("Hello there")
    user_turn = conv.turn(tid(first)).parent_id
    main_request = conv.request("next")

    again = conv.regenerate()
    assert conv.branch == "regen-1"
    assert again.turn_id not in (None, first.turn_id)
    assert conv.turn(again.turn_id).parent_id == user_turn
    assert [t.id for t in conv.turns()] == [user_turn, again.turn_id]
    # Exactly the same history was sent again.
    assert standin.requests[-1]["body"]["messages"] == standin.requests[0]["body"]["messages"]
    # The old reply stays on the old branch.
    assert [t.id for t in conv.turns("main")] == [user_turn, first.turn_id]
    conv.checkout("main")
    assert conv.request("next") == main_request
    assert [c["reply_id"] for c in conv.calls()] == [first.turn_id, again.turn_id]


def test_regenerate_answers_on_its_new_branch_whatever_is_checked_out_meanwhile(
    db_url: str, store: Store, conv: Conversation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply went to whatever branch was checked out when it was sent: another process
    checking out `main` between the new branch and the request made the regenerate answer
    there ("nothing to retry"), leaving its new branch with no reply."""
    from contextlib import contextmanager

    from convo.store import Storage

    conv.send("Hello")
    main_turns = [t.id for t in conv.turns()]
    other = Store(db_url)
    original = Storage.branching

    @contextmanager
    def then_another_checks_out_main(self: Storage, conv_id: str) -> Any:
        with original(self, conv_id) as tx:
            yield tx
        other.get(conv_id).checkout("main")

    monkeypatch.setattr(Storage, "branching", then_another_checks_out_main)
    try:
        reply = conv.regenerate()
    finally:
        other.close()
    regen = conv.turns("regen-1")
    assert [t.kind for t in regen] == ["user", "reply"] and regen[-1].id == reply.turn_id
    assert [t.id for t in conv.turns("main")] == main_turns
    assert conv.branch == "main"  # what the other process checked out stays


def test_regenerate_a_named_reply_or_user_turn(store: Store, conv: Conversation) -> None:
    r1 = conv.send("First question")
    r2 = conv.send("Second question")
    u1 = conv.turn(tid(r1)).parent_id
    u2 = conv.turn(tid(r2)).parent_id

    by_reply = conv.regenerate(r1.turn_id)
    assert conv.branch == "regen-1"
    assert [t.id for t in conv.turns()] == [u1, by_reply.turn_id]

    conv.checkout("main")
    by_user = conv.regenerate(turn=u2, name="second-try")
    assert conv.branch == "second-try"
    assert [t.id for t in conv.turns()] == [u1, r1.turn_id, u2, by_user.turn_id]
    assert [t.id for t in conv.turns("main")] == [u1, r1.turn_id, u2, r2.turn_id]
    assert len(conv.calls()) == 4


def test_regenerate_with_nothing_to_regenerate(store: Store, conv: Conversation) -> None:
    before = row_counts(store)
    with pytest.raises(InvalidInput):
        conv.regenerate()
    assert row_counts(store) == before


def test_regenerate_answers_an_unanswered_last_turn_on_its_branch(
    store: Store, conv: Conversation
) -> None:
    # After an edit the branch ends with a question nothing answered: that is what to generate.
    conv.add_user("hi")
    reply = conv.regenerate()
    assert conv.branch == "main" and [b.name for b in conv.branches()] == ["main"]
    assert [t.role for t in conv.turns()] == ["user", "assistant"]
    assert conv.turns()[-1].id == reply.turn_id


# -- branches, checkout, delete --------------------------------------------------------------


def test_branches_checkout_and_delete(store: Store, conv: Conversation) -> None:
    ids = exchange(conv, 2)
    conv.fork(ids[1], "side")
    side_turn = conv.add_user("only on side")
    rows = {b.name: b for b in conv.branches()}
    assert set(rows) == {"main", "side"}
    assert rows["main"].head_id == ids[-1] and rows["side"].head_id == side_turn

    conv.checkout("main")
    assert conv.branch == "main"
    with pytest.raises(NotFound):
        conv.checkout("nope")
    assert conv.branch == "main"

    conv.checkout("side")
    with pytest.raises(InvalidInput, match="checked out"):
        conv.delete_branch("side")
    assert "side" in branch_names(conv)
    conv.checkout("main")
    with pytest.raises(NotFound):
        conv.delete_branch("nope")
    conv.delete_branch("side")
    assert branch_names(conv) == ["main"]
    # The turns stay (a fork at them still works), the branch name is free again.
    assert conv.turn(side_turn).content == [{"type": "text", "text": "only on side"}]
    conv.fork(side_turn, "side")
    assert [t.id for t in conv.turns()] == [*ids[:2], side_turn]


def test_deleting_a_branch_keeps_its_calls_in_usage(store: Store, conv: Conversation) -> None:
    conv.send("Hello there")
    conv.fork(conv.turns()[0].id, "side")
    side = conv.send("Hello from the side branch")
    conv.checkout("main")
    report = store.usage(conversation=conv.id, by="branch")
    assert {r.key: r.calls for r in report.rows} == {"main": 1, "side": 1}
    total = report.total

    conv.delete_branch("side")
    after = store.usage(conversation=conv.id, by="branch")
    assert after.total == total
    assert {r.key: r.calls for r in after.rows} == {"main": 1, "side": 1}
    assert side.turn_id in [c["reply_id"] for c in conv.calls()]
    assert conv.turn(tid(side)).kind == "reply"


def test_deleting_a_branch_with_a_send_in_flight_loses_nothing(
    store: Store, conv: Conversation, standin: StandIn
) -> None:
    """Deleting the branch a send is waiting on must either be refused (the branch is leased)
    or leave the call's usage in the ledger: a billed call never stays 'pending' at 0 tokens."""
    first = conv.send("Hello there")
    conv.fork(tid(first), "side")
    standin.delay_next(1.0)
    outcome: dict[str, Any] = {}

    def send_on_side() -> None:
        try:
            outcome["reply"] = conv.send("A question on the side branch")
        except convo.ConvoError as e:
            outcome["error"] = e

    worker = threading.Thread(target=send_on_side)
    worker.start()
    deadline = time.monotonic() + 10
    while len(standin.requests) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conv.checkout("main")
    try:
        conv.delete_branch("side")
        refused = None
    except convo.ConvoError as e:
        refused = e
    worker.join(10)
    side_calls = [c for c in conv.calls() if c["branch"] == "side"]
    assert len(side_calls) == 1
    assert side_calls[0]["status"] != "pending", "the call was billed but never completed"
    assert side_calls[0]["output_tokens"] > 0
    if refused is not None:
        assert isinstance(refused, Conflict) and "side" in str(refused)
        assert outcome["reply"].turn_id == conv.turns("side")[-1].id


# -- O(1) writes -----------------------------------------------------------------------------


def deep_conversation(store: Store, depth: int) -> tuple[Conversation, list[str]]:
    """A conversation whose main branch is `depth` turns deep, built in a few appends."""
    conv = store.create()
    ids: list[str] = []
    head = None
    batch = 500
    for start in range(0, depth, batch):
        new = [
            NewTurn("user", "user", [{"type": "text", "text": f"question {i}"}])
            if i % 2 == 0
            else NewTurn("assistant", "reply", [{"type": "text", "text": f"answer {i}"}], stop_reason="end_turn")
            for i in range(start, min(depth, start + batch))
        ]
        ids += store.storage.append(conv.id, "main", head, new)
        head = ids[-1]
    return conv, ids


def cost_of(store: Store, action: Any) -> tuple[dict[str, int], int, int]:
    before = row_counts(store)
    with WriteCounter(store) as w:
        action()
    return diff(before, row_counts(store)), w.statements, w.rows


def branch_operation_costs(store: Store, depth: int) -> dict[str, tuple[dict[str, int], int, int]]:
    conv, ids = deep_conversation(store, depth)
    assert len(conv.turns()) == depth
    costs = {
        "fork-head": cost_of(store, lambda: conv.fork(ids[-1])),
        "fork-middle": cost_of(store, lambda: conv.fork(ids[len(ids) // 2])),
        "checkout": cost_of(store, lambda: conv.checkout("main")),
        "edit-user": cost_of(store, lambda: conv.edit(ids[-2], "edited question")),
        "edit-reply": cost_of(store, lambda: conv.edit(ids[-1], "edited answer")),
        "checkout-back": cost_of(store, lambda: conv.checkout("fork-1")),
        "delete": cost_of(store, lambda: conv.delete_branch("edit-1")),
    }
    assert costs["fork-head"][0] == {"branches": 1}
    assert costs["edit-user"][0] == {"branches": 1, "turns": 1}
    assert costs["edit-reply"][0] == {"branches": 1, "turns": 1}
    assert costs["checkout"][0] == {}
    assert costs["delete"][0] == {"branches": -1}
    # The edited branch is as deep as the original, and nothing was copied.
    assert len(conv.turns("edit-2")) == depth
    assert conv.info.turn_count == depth + 2
    return costs


def test_fork_edit_checkout_write_a_constant_number_of_rows(store: Store) -> None:
    """Same rows and statements at depth 10 and 2,000 (turns are never copied)."""
    assert branch_operation_costs(store, 10) == branch_operation_costs(store, 2000)


# -- a model of the tree, and random operations -----------------------------------------------


class Model:
    """What convo should hold: turns with parents, branch heads, the checked-out branch."""

    def __init__(self) -> None:
        self.turns: dict[int, tuple[int | None, str, str, list[dict[str, Any]]]] = {}
        self.order: list[int] = []
        self.branches: dict[str, int | None] = {"main": None}
        self.current = "main"
        # Names with calls in the ledger: never given to a new branch, even once deleted, so
        # an audit by branch never merges two branches' spend.
        self.billed: set[str] = set()

    def taken(self, name: str) -> bool:
        return name in self.branches or name in self.billed

    def add(self, tid: int, parent: int | None, role: str, kind: str, content: list[dict[str, Any]]) -> None:
        self.turns[tid] = (parent, role, kind, content)
        self.order.append(tid)

    def path(self, branch: str) -> list[int]:
        out = []
        cur = self.branches[branch]
        while cur is not None:
            out.append(cur)
            cur = self.turns[cur][0]
        return out[::-1]

    def messages(self, branch: str) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        for tid in self.path(branch):
            _, role, _, content = self.turns[tid]
            if msgs and msgs[-1]["role"] == role:
                msgs[-1]["content"].extend(content)
            else:
                msgs.append({"role": role, "content": list(content)})
        return msgs

    def generated(self, prefix: str) -> str:
        n = 1
        while self.taken(f"{prefix}-{n}"):
            n += 1
        return f"{prefix}-{n}"


WORDS = st.text(alphabet="ab Z", max_size=6).map(str.strip)
NAMES = st.one_of(st.none(), st.sampled_from(["main", "idea", "fork-1", "edit-1", "x y"]))
OPS = st.one_of(
    st.tuples(st.just("add_user"), WORDS),
    st.tuples(st.just("add_assistant"), WORDS),
    st.tuples(st.just("send"), WORDS),
    st.tuples(st.just("fork"), st.integers(0, 10_000), NAMES, st.booleans()),
    st.tuples(st.just("edit"), st.integers(0, 10_000), WORDS, NAMES),
    st.tuples(st.just("checkout"), st.integers(0, 10_000)),
    st.tuples(st.just("delete"), st.integers(0, 10_000)),
)


def apply(conv: Conversation, model: Model, op: tuple[Any, ...]) -> None:
    """Run one operation on convo and on the model; an invalid one must fail in convo too."""
    kind = op[0]
    cur = model.current
    head = model.branches[cur]
    if kind in ("add_user", "add_assistant", "send"):
        content = [{"type": "text", "text": op[1]}]
        role = "assistant" if kind == "add_assistant" else "user"
        if kind == "add_assistant" and head is None:
            return  # an assistant turn first: see test_add_assistant_first_is_refused
        if not op[1]:
            with pytest.raises(ContentError):
                getattr(conv, kind)(op[1])
            return
        if kind == "send":
            reply = conv.send(op[1])
            assert reply.turn_id is not None
            user = conv.turn(reply.turn_id).parent_id
            assert user is not None
            model.add(user, head, "user", "user", content)
            model.add(reply.turn_id, user, "assistant", "reply", reply.content)
            model.branches[cur] = reply.turn_id
            model.billed.add(cur)
            return
        tid = getattr(conv, kind)(op[1])
        model.add(tid, head, role, "user" if role == "user" else "synthetic", content)
        model.branches[cur] = tid
        return
    if kind in ("fork", "edit"):
        if not model.order:
            with pytest.raises(NotFound):
                conv.fork(1) if kind == "fork" else conv.edit(1, "x")
            return
        target = model.order[op[1] % len(model.order)]
        if kind == "fork":
            ref: int | str = str(target) if op[1] % 3 == 0 else target
            name, checkout = op[2], op[3]
            if name is not None and (model.taken(name) or name != name.strip()):
                with pytest.raises(InvalidInput):
                    conv.fork(ref, name, checkout=checkout)
                return
            got = conv.fork(ref, name, checkout=checkout)
            assert got == (name or model.generated("fork"))
            model.branches[got] = target
            if checkout:
                model.current = got
            return
        parent, role, _, _ = model.turns[target]
        name = op[3]
        if not op[2] or (name is not None and model.taken(name)):
            with pytest.raises(InvalidInput):
                conv.edit(target, op[2], name=name)
            return
        tid = conv.edit(target, op[2], name=name)
        got = name or model.generated("edit")
        model.add(tid, parent, role, "user" if role == "user" else "synthetic", [{"type": "text", "text": op[2]}])
        model.branches[got] = tid
        model.current = got
        return
    names = list(model.branches)
    if kind == "checkout":
        if op[1] % 7 == 0:
            with pytest.raises(NotFound):
                conv.checkout("no-such-branch")
            return
        name = names[op[1] % len(names)]
        conv.checkout(name)
        model.current = name
        return
    if kind == "delete":
        if op[1] % 7 == 0:
            with pytest.raises(NotFound):
                conv.delete_branch("no-such-branch")
            return
        name = names[op[1] % len(names)]
        if name == model.current:
            with pytest.raises(InvalidInput):
                conv.delete_branch(name)
            return
        conv.delete_branch(name)
        del model.branches[name]
        return
    raise AssertionError(kind)


def check_against(conv: Conversation, model: Model) -> None:
    assert conv.branch == model.current
    assert sorted(branch_names(conv)) == sorted(model.branches)
    settings_ = conv.settings()
    for name in model.branches:
        path = model.path(name)
        got = conv.turns(name)
        assert [t.id for t in got] == path, name
        assert [t.role for t in got] == [model.turns[t][1] for t in path]
        assert [t.kind for t in got] == [model.turns[t][2] for t in path]
        assert [t.content for t in got] == [model.turns[t][3] for t in path]
        if path:
            assert build_request(got, settings_)["messages"] == model.messages(name)
    conv.checkout(model.current)
    if model.branches[model.current] is not None:
        assert conv.request()["messages"] == model.messages(model.current)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, max_size=25))
def test_random_operations_match_a_model_of_the_tree(store: Store, ops: list[tuple[Any, ...]]) -> None:
    conv = store.create()
    model = Model()
    for op in ops:
        apply(conv, model, op)
    check_against(conv, model)
    assert store.storage.integrity_problems() == []


def test_add_assistant_first_is_refused(store: Store, conv: Conversation) -> None:
    """A branch that starts with an assistant turn can never be sent (the API needs a user
    turn first) and, turns being immutable, never repaired: refuse it like fork and edit do."""
    before = row_counts(store)
    with pytest.raises(HistoryError):
        conv.add_assistant("I speak first")
    assert row_counts(store) == before


# -- two writers on one branch ----------------------------------------------------------------

WORKER = r"""
import json, sys, time
from pathlib import Path
import convo
from convo.client import Client

# One command per line: wait for the go file, send once on the branch, print the outcome.
for line in sys.stdin:
    cmd = json.loads(line)
    with Client(api_key="test-key", base_url=cmd["base_url"]) as client:
        store = convo.Store(cmd["url"], client=client, wait_for_branch=cmd["wait"])
        try:
            conv = store.get(cmd["cid"])
            Path(cmd["sync"], "ready-" + cmd["tag"]).touch()
            while not Path(cmd["sync"], "go").exists():
                time.sleep(0.005)
            try:
                result = ["OK", conv.send("Message from process " + cmd["tag"]).turn_id]
            except convo.Conflict as e:
                result = ["CONFLICT", str(e)]
        except Exception as e:
            result = ["ERROR", f"{type(e).__name__}: {e}"]
        finally:
            store.close()
    print(json.dumps(result), flush=True)
"""


def child_env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CONVO_"))},
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def writers() -> Iterator[list[subprocess.Popen[str]]]:
    """Four long-lived writer processes (started once: importing convo is the slow part)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER], env=child_env(), cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    yield procs
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()


def run_writers(
    writers: list[subprocess.Popen[str]],
    db_url: str,
    standin: StandIn,
    conv: Conversation,
    n: int,
    wait: float,
    sync: Path,
) -> tuple[list[tuple[str, str]], float]:
    """n processes send on the conversation's branch at the same moment."""
    sync.mkdir()
    for i, p in enumerate(writers[:n]):
        assert p.poll() is None and p.stdin is not None
        cmd = {"url": db_url, "base_url": standin.base_url, "cid": conv.id, "tag": str(i),
               "wait": wait, "sync": str(sync)}
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()
    deadline = time.monotonic() + 60
    try:
        while len(list(sync.glob("ready-*"))) < n:
            assert time.monotonic() < deadline, "writers did not get ready"
            assert all(p.poll() is None for p in writers[:n])
            time.sleep(0.01)
    finally:
        (sync / "go").touch()  # never leave a writer waiting
    started = time.monotonic()
    results = []
    for p in writers[:n]:
        assert p.stdout is not None
        status, detail = json.loads(p.stdout.readline())
        results.append((status, detail))
    return results, time.monotonic() - started


def assert_serialized(store: Store, conv: Conversation, results: list[tuple[str, str]]) -> None:
    assert all(status in ("OK", "CONFLICT") for status, _ in results), results
    for status, detail in results:
        if status == "CONFLICT":
            assert "branch 'main'" in detail and ("busy" in detail or "moved" in detail), detail
    successes = sum(status == "OK" for status, _ in results)
    path = conv.turns("main")
    roles = [t.role for t in path]
    assert roles == ["user", "assistant"] * (len(path) // 2), roles
    assert len(path) == 2 * successes
    # Each reply answers its own process's message, which is right before it.
    for user, reply in zip(path[::2], path[1::2], strict=True):
        assert reply.kind == "reply"
        assert text_of(user.content) in text_of(reply.content)
    replies = {t.id for t in path[1::2]}
    assert {detail for status, detail in results if status == "OK"} == replies
    calls = conv.calls()
    assert [c["status"] for c in calls] == ["ok"] * successes
    assert all(b.lease_owner is None for b in conv.branches())
    assert store.storage.integrity_problems() == []


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_senders_on_one_branch_are_serialized(
    writers: list[subprocess.Popen[str]], db_url: str, standin: StandIn, store: Store,
    tmp_path: Path, n: int,
) -> None:
    conv = store.create()
    standin.delay_next(0.4, times=n)
    results, elapsed = run_writers(writers, db_url, standin, conv, n, 120.0, tmp_path / "sync")
    assert [s for s, _ in results] == ["OK"] * n, results
    # They all started together, yet each request waited for the one before it.
    assert elapsed >= 0.4 * n
    assert_serialized(store, conv, results)
    assert len(standin.requests) == n


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_impatient_concurrent_senders_get_conflict(
    writers: list[subprocess.Popen[str]], db_url: str, standin: StandIn, store: Store,
    tmp_path: Path, n: int,
) -> None:
    conv = store.create()
    standin.delay_next(1.5, times=n)
    results, _ = run_writers(writers, db_url, standin, conv, n, 0.3, tmp_path / "sync")
    assert [s for s, _ in results].count("OK") >= 1, results
    assert "CONFLICT" in [s for s, _ in results], results
    assert_serialized(store, conv, results)


@pytest.mark.slow
def test_a_dead_writer_does_not_hold_the_branch(
    db_url: str, standin: StandIn, store: Store, tmp_path: Path
) -> None:
    """A process killed mid-send leaves its user turn (and lease) behind; the next writer on
    this host sees the holder is dead and goes on at once instead of waiting out the lease."""
    conv = store.create()
    standin.delay_next(30)
    env = {**child_env(), "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": standin.base_url}
    code = "import sys, convo; convo.Store(sys.argv[1]).get(sys.argv[2]).send('Doomed message')"
    proc = subprocess.Popen([sys.executable, "-c", code, db_url, conv.id], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not (conv.turns() and standin.requests):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        assert conv.branches()[0].lease_owner is not None
    finally:
        proc.kill()
        proc.wait()
    standin.reset_faults()
    started = time.monotonic()
    reply = conv.send("Anyone there?")
    assert time.monotonic() - started < 10
    assert [t.role for t in conv.turns()] == ["user", "user", "assistant"]
    assert "Doomed message" in str(standin.requests[-1]["body"]["messages"])
    assert reply.turn_id == conv.turns()[-1].id
    # The dead process's call will never finish: the ledger says so instead of "pending".
    doomed, ok = conv.calls()
    assert (doomed["status"], doomed["error_type"]) == ("abandoned", "abandoned")
    assert doomed["error_message"] == "the sending process died before the call finished"
    assert (ok["status"], ok["reply_id"]) == ("ok", reply.turn_id)

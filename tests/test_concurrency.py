"""Concurrent writers in separate processes lose nothing and never interleave a history.

Eight `python -c` children use the library at once against one stand-in, on SQLite (WAL, busy
timeout, BEGIN IMMEDIATE) and PostgreSQL. Each one sends 5 messages to a conversation of its
own and 5 to a conversation all eight share, alternating, so both "8 processes, 8 threads" and
"8 processes, ONE thread" run at the same time. A child exits 0; a send may only fail with a
clear `convo.Conflict` (counted), never with "database is locked" or any other crash.

Migrations run by two processes at once are covered by
tests/test_migrations.py::test_two_processes_upgrading_at_once (both engines), not repeated here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from helpers.kit import KEY, ROOT, make_store, message_bodies

from convo.standin import StandIn
from convo.types import text_of

CHILDREN = 8
SENDS = 5

CHILD = """
import json, sys, time
from convo import Conflict, Store
from convo.client import Client

url, base, key, start, tag, own, shared, n = sys.argv[1:]
store = Store(url, client=Client(api_key=key, base_url=base))
while time.time() < float(start):
    time.sleep(0.005)
result = {"own": 0, "shared": 0, "conflicts": 0, "sent": []}
for i in range(int(n)):
    for where, cid in (("own", own), ("shared", shared)):
        text = f"{tag} {where} {i}"
        try:
            store.get(cid).send(text)
        except Conflict as e:
            result["conflicts"] += 1
            print(f"conflict: {e}", file=sys.stderr)
            continue
        result[where] += 1
        result["sent"].append(text)
store.close()
print(json.dumps(result))
"""


def _check_thread(store: Any, conv_id: str, expected: list[str]) -> list[Any]:
    """A linear history alternating user / assistant, each reply the child of its user turn,
    every expected user text exactly once; returns the turns."""
    conv = store.get(conv_id)
    all_turns = store.storage.turns(conv_id)
    path = conv.turns()
    assert len(all_turns) == len(path) == conv.info.turn_count == 2 * len(expected)
    assert [t.role for t in path] == ["user", "assistant"] * len(expected)
    assert all(t.kind == "reply" for t in path[1::2])
    by_id = {t.id: t for t in all_turns}
    for user, reply in zip(path[::2], path[1::2], strict=True):
        assert by_id[reply.id].parent_id == user.id
    users = [text_of(t.content) for t in path[::2]]
    assert Counter(users) == Counter(expected)
    calls = store.storage.calls(conv_id)
    assert [c["status"] for c in calls] == ["ok"] * len(expected)
    assert sorted(c["reply_id"] for c in calls) == sorted(t.id for t in path[1::2])
    assert all(b.lease_owner is None for b in conv.branches())
    return path


@pytest.mark.slow
def test_eight_processes_on_eight_threads_and_on_one_thread(
    db_url: str, standin: StandIn
) -> None:
    with make_store(db_url, standin.base_url) as store:
        own = [store.create(title=f"own {k}").id for k in range(CHILDREN)]
        shared = store.create(title="shared").id
    start = time.time() + 2.5  # every interpreter is up and waiting by then
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                db_url,
                standin.base_url,
                KEY,
                repr(start),
                f"p{k}",
                own[k],
                shared,
                str(SENDS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for k in range(CHILDREN)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        text = err.decode()
        assert p.returncode == 0, text
        assert "database is locked" not in text and "Traceback" not in text, text
        results.append(json.loads(out))
    conflicts = sum(r["conflicts"] for r in results)
    assert (
        sum(r["own"] + r["shared"] for r in results) + conflicts == 2 * CHILDREN * SENDS
    )
    # No writer was ever given up on: waiting for a busy branch beats failing.
    assert conflicts == 0
    with make_store(db_url, standin.base_url) as store:
        for k, r in enumerate(results):
            mine = [t for t in r["sent"] if " own " in t]
            assert len(mine) == r["own"]
            path = _check_thread(store, own[k], mine)
            assert [text_of(t.content) for t in path[::2]] == mine  # in the order sent
        everyone = [t for r in results for t in r["sent"] if " shared " in t]
        path = _check_thread(store, shared, everyone)
        order = [text_of(t.content) for t in path[::2]]
        for k in range(CHILDREN):  # each writer's turns keep their order
            mine = [t for t in order if t.startswith(f"p{k} ")]
            assert mine == [t for t in results[k]["sent"] if " shared " in t]
        # Every request replayed the shared history as it was then: a prefix of the final one.
        final = store.get(shared).request("probe")["messages"][:-1]
        sent = [
            b["messages"]
            for b in message_bodies(standin)
            if " shared " in b["messages"][-1]["content"][0]["text"]
        ]
        assert len(sent) == len(everyone)
        for messages in sent:
            assert messages == final[: len(messages)]
        assert store.storage.integrity_problems() == []


ID_CHILD = """
import json, sys, time
from convo import Store
from convo.client import Client

url, start, tag, source = sys.argv[1:]
store = Store(url, client=Client(api_key="unused", base_url="http://127.0.0.1:9"))
export = store.export(source)
while time.time() < float(start):
    time.sleep(0.005)
made = []
for i in range(6):
    # An import numbers a whole tree itself (ids taken ahead of the insert); an add_user lets
    # the database number one turn: both kinds of id allocation race the other processes.
    copy = store.import_(export)
    made.append(copy.id)
    copy.add_user(f"{tag} {i}")
store.close()
print(json.dumps(made))
"""


@pytest.mark.slow
def test_turn_ids_are_never_handed_out_twice_under_concurrent_writers(db_url: str) -> None:
    """Six processes import multi-turn trees (ids allocated ahead, inside the write
    transaction) and append single turns (ids from the database) at once: every turn gets its
    own id, every copy replays exactly like its source, and the tree stays consistent."""
    with make_store(db_url, "http://127.0.0.1:9") as store:
        src = store.create(title="source")
        first = src.add_user("one")
        src.add_assistant("two")
        src.add_user("three")
        src.edit(first, "one, edited")
        src.add_assistant("four")
        source_id = src.id
        want = {b.name: [t.content for t in src.turns(b.name)] for b in src.branches()}
    start = time.time() + 2.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ID_CHILD, db_url, repr(start), f"w{k}", source_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )
        for k in range(6)
    ]
    copies: list[str] = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
        copies += json.loads(out)
    assert len(copies) == 36
    with make_store(db_url, "http://127.0.0.1:9") as store:
        seen: set[int] = set()
        for cid in copies:
            turns = store.storage.turns(cid)
            ids = {t.id for t in turns}
            assert len(ids) == len(turns) == 6 and not ids & seen
            seen |= ids
            conv = store.get(cid)
            for name, contents in want.items():
                got = [t.content for t in conv.turns(name)]
                # the added user turn sits on the branch that was checked out (edit-1)
                assert got[: len(contents)] == contents
        assert store.storage.integrity_problems() == []


# -- branch names chosen at once -------------------------------------------------------------------


def test_forks_edits_and_regenerates_at_once_each_get_a_branch(db_url: str, standin: StandIn) -> None:
    """On PostgreSQL a fork runs no transaction, so two forks could choose the same free name
    and the second one's write failed on the unique name (a StoreError for 5 of 8 edits at
    once). A name convo chose now moves on to the next free one; a name the caller gave that
    another writer took first is InvalidInput, as a name already taken always was."""
    import threading

    from convo.errors import ConvoError, InvalidInput

    with make_store(db_url, standin.base_url) as store:
        conv = store.create()
        conv.send("hello")
        first, reply = (t.id for t in conv.turns())
    outcomes: list[Any] = []

    def work(i: int, how: str) -> None:
        with make_store(db_url, standin.base_url) as own:
            c = own.get(conv.id)
            try:
                if how == "edit":
                    outcomes.append(("edit", c.edit(first, f"edit {i}")))
                elif how == "fork":
                    outcomes.append(("fork", c.fork(reply, checkout=False)))
                elif how == "regen":
                    outcomes.append(("regen", c.regenerate(first).text))
                else:
                    outcomes.append(("same", c.fork(reply, "same", checkout=False)))
            except ConvoError as e:
                outcomes.append((how, e))

    threads = [
        threading.Thread(target=work, args=(i, how))
        for how in ("edit", "fork", "regen", "same") for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [(how, r) for how, r in outcomes if isinstance(r, ConvoError)]
    assert len(outcomes) == 16
    assert all(how == "same" and isinstance(e, InvalidInput) and "already exists" in str(e) for how, e in errors)
    assert len(errors) == 3  # one "same" fork won
    with make_store(db_url, standin.base_url) as store:
        names = sorted(b.name for b in store.get(conv.id).branches())
        assert names == sorted(
            ["main", "same"] + [f"{p}-{n}" for p in ("edit", "fork", "regen") for n in range(1, 5)]
        )
        # each regenerate's reply is on its own branch, answering the first turn
        for n in range(1, 5):
            turns = store.get(conv.id).turns(f"regen-{n}")
            assert [t.kind for t in turns] == ["user", "reply"] and turns[0].id == first
        assert store.storage.integrity_problems() == []

"""`convo demo`: a guided tour of convo that needs no API key.

Every reply comes from convo's LOCAL STAND-IN of the Messages API (`convo.standin`), started on
loopback for the tour, never from Claude; the database is a throwaway SQLite file. A real
ANTHROPIC_API_KEY in the environment is ignored: the tour's client, and the child process it
starts, use a dummy key and the stand-in's address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from convo import render
from convo.errors import PrefillNotSupported

DEMO_KEY = "standin-demo-key"
BANNER = "convo demo — replies come from convo's LOCAL STAND-IN of the Messages API, not from Claude"
PREFILL_MODEL = "claude-3-5-haiku-20241022"
NO_PREFILL_MODEL = "claude-sonnet-4-6"
TRIM = 70

_RULES = (
    "Answer the question that was asked before adding anything else.",
    "Prefer short sentences and concrete examples over abstractions.",
    "When a request is ambiguous, state the reading you chose in one line.",
    "Quote numbers with their units and say where they come from.",
    "Never invent a citation; say that you do not know instead.",
    "Keep code samples minimal, runnable and in the language the user used.",
    "When you list steps, number them and keep each to one action.",
    "Point out a risky command before showing it, not after.",
    "Summaries come last and are at most three sentences long.",
    "If the user corrects you, restate the corrected fact once and move on.",
)


def _system_prompt() -> str:
    """A long, fixed system prompt (about 6,000 characters, over the 1,024-token cache minimum)."""
    lines = ["You are the assistant of the convo demo. Follow these house rules."]
    n = 0
    while sum(len(x) + 1 for x in lines) < 6000:
        rule = _RULES[n % len(_RULES)]
        lines.append(f"Rule {n + 1} (section {n // len(_RULES) + 1}): {rule}")
        n += 1
    return "\n".join(lines)


def _trim(value: Any, limit: int = TRIM) -> Any:
    """A JSON value with every long string cut, for printing a request body."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}… ({len(value):,} chars)"
    if isinstance(value, list):
        return [_trim(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _trim(v, limit) for k, v in value.items()}
    return value


class _Tour:
    def __init__(self, store: Any, url: str, standin: Any, out: IO[str]) -> None:
        self.store = store
        self.url = url
        self.standin = standin
        self.out = out
        self.step = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heading(self, title: str) -> None:
        self.step += 1
        self.say()
        self.say(f"== {self.step}. {title} ==")

    def send(self, conv: Any, text: str | None, **kw: Any) -> Any:
        """One streamed send, printed as it arrives."""
        if text is not None:
            self.say(f"you> {text}")
        self.out.write("claude> " + (kw.get("prefill") or ""))
        stream = conv.stream(text, **kw)
        for chunk in stream:
            self.out.write(chunk)
            self.out.flush()
        self.say()
        reply = stream.reply
        if reply.stop_reason and reply.stop_reason != "end_turn":
            self.say(f"[stopped: {reply.stop_reason}]")
        return reply

    def run(self) -> None:
        self.say(BANNER)
        self.say(f"(stand-in at {self.standin.base_url}; throwaway database {self.url})")

        self.heading("A multi-turn conversation, streamed")
        self.say("convo stores every turn; each send replays the whole branch to the stateless API.")
        conv = self.store.create(system=_system_prompt(), title="demo: a growing thread")
        for text in (
            "Hello! What can convo do?",
            "How does it remember what I said?",
            "And what does a long thread cost?",
        ):
            self.send(conv, text)

        self.heading("A synthetic assistant turn, and the request that replays it")
        side = self.store.create(title="demo: synthetic turn")
        side.add_user("What is the capital of France?")
        side.add_assistant("Paris.")
        self.say("add_user('What is the capital of France?'); add_assistant('Paris.') — nothing sent.")
        self.say("The body the next send would POST (long strings trimmed):")
        self.say(render.to_json(_trim(side.request("And the capital of Italy?"))))

        self.heading(f"Prefill on a model that accepts it ({PREFILL_MODEL})")
        pre = self.store.create(PREFILL_MODEL, title="demo: prefill")
        self.say('send("Pick A, B or C.", prefill="The answer is (", max_tokens=5)')
        reply = self.send(pre, "Pick A, B or C.", prefill="The answer is (", max_tokens=5)
        self.say(f"stored reply text: {reply.text!r}")

        self.heading(f"Prefill on {NO_PREFILL_MODEL}")
        strict = self.store.create(NO_PREFILL_MODEL, title="demo: no prefill")
        before = len(self.standin.requests)
        try:
            strict.send("Pick A, B or C.", prefill="The answer is (")
        except PrefillNotSupported as e:
            self.say(f"PrefillNotSupported: {e}")
        sent = len(self.standin.requests) - before
        self.say(
            f"Nothing was sent (the stand-in saw {sent} requests) and nothing was written "
            f"(the conversation has {strict.info.turn_count} turns)."
        )

        self.heading("Resume in a new process")
        self.say(f"$ convo --db {self.url} show -C {conv.id}")
        self.say(self._show_in_child(conv.id))

        self.heading("Fork, edit and the tree")
        turns = conv.turns()
        first_reply, second_question = turns[1].id, turns[2].id
        name = conv.fork(first_reply, "tea")
        self.say(f"fork --at {first_reply} --name tea  -> branch {name}")
        self.send(conv, "Let's change the subject: tea or coffee?")
        conv.checkout("main")
        new_id = conv.edit(second_question, "Actually, explain prompt caching instead.")
        self.say(
            f"edit {second_question} 'Actually, ...'  -> new turn {new_id} "
            f"on branch {conv.branch}"
        )
        self.send(conv, None)
        self.say()
        self.say(render.tree(self.store.storage.turns(conv.id), conv.branches(), conv.branch))

        self.heading("Usage: prompt-cache writes and reads on a growing thread")
        self.say("Each call of the long-system-prompt conversation, in order:")
        self.say(render.calls_table(conv.calls()))
        report = conv.usage(by="branch")
        self.say()
        self.say(render.usage_table(report))
        self.say(render.cache_savings_line(report.total))

        self.say()
        self.say("That was the stand-in. With ANTHROPIC_API_KEY set, the same commands talk to Claude:")
        self.say('  convo new --title "first chat"  &&  convo send "Hello"  &&  convo show')

    def _show_in_child(self, conv_id: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CONVO_"))}
        env["ANTHROPIC_API_KEY"] = DEMO_KEY
        env["ANTHROPIC_BASE_URL"] = self.standin.base_url
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH")) if p
        )
        result = subprocess.run(
            [sys.executable, "-m", "convo", "--db", self.url, "show", "-C", conv_id],
            env=env,
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`convo show` in a new process failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )
        return result.stdout.rstrip("\n")


def run(*, keep: bool = False, out: IO[str] | None = None) -> int:
    """Run the tour; returns the exit code. `keep` leaves the database behind."""
    from convo.client import Client
    from convo.service import Store
    from convo.standin import StandIn

    out = out or sys.stdout
    tmp = Path(tempfile.mkdtemp(prefix="convo-demo-"))
    path = tmp / "demo.db"
    url = f"sqlite:///{path}"
    standin = StandIn().start()
    client = Client(api_key=DEMO_KEY, base_url=standin.base_url)
    try:
        with Store(url, client=client) as store:
            # The tour shows convo's built-in prefill rules, whatever CONVO_PREFILL_MODELS says.
            store.prefill_models = {}
            _Tour(store, url, standin, out).run()
    finally:
        client.close()
        standin.stop()
        if keep:
            out.write(f"\ndemo database kept: {path}\n  try: convo --db {url} tree\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0

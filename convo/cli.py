"""The `convo` command: parse, call the service, print. Rendering lives in `convo.render`.

Exit codes: 0 ok; 1 an API or runtime failure (a `ConvoError` whose `exit_code` is 1); 2 bad
usage or bad input (argparse errors and `InvalidInput`); 130 interrupted (Ctrl-C). Every error
is one line on stderr, `convo: error: <message>`, with the API key scrubbed out; a `ConvoError`
never prints a traceback (set CONVO_DEBUG=1 to see one for an unexpected exception).

Per-conversation commands take `-C/--conversation ID` (an id or a unique prefix) and default
to the most recently used conversation.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NoReturn

from convo import config, render
from convo.entry import EXIT_INTERRUPTED, PROG
from convo.errors import APIError, ConvoError, InvalidInput, MissingApiKey, NotFound
from convo.ids import is_text

INTERRUPTED_SAVED = "[interrupted: your turn is saved; {retry} asks again]"
RETRY_HINT = "your turn is saved; `convo retry` asks again"
DEFAULT_LIST_LIMIT = 50
# The largest integer an option takes: what JSON encoders and a PostgreSQL bigint carry.
MAX_INT = 2**63 - 1
# Python's json parser recurses once per level: past its limit a file is refused as not JSON.
TOO_DEEP = "nested too deeply"
# `--usd off` / `--max-input-tokens off` remove a limit.
_OFF = "off"
# Request settings `convo set --unset` removes (max_tokens is needed by every request; tools and
# cache have their own options).
_UNSETTABLE = ("temperature", "top_p", "top_k", "stop_sequences", "metadata", "tool_choice", "thinking")


class _UsageError(Exception):
    """An argparse error, reported on one line with exit code 2."""


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


class _CommandParser(_Parser):
    """A command's parser: options may come between its positionals (`edit 55 --name x TEXT`).
    Plain argparse fills every positional at the first run of them, and TEXT after an option
    was then an unrecognized argument. After `--` it parses plainly: intermixed parsing drops
    the `--` (Python 3.11), and `send -- -x` must send "-x"."""

    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._intermixing:  # parse_known_intermixed_args's own passes
            return super().parse_known_args(args, namespace)
        if args is not None and "--" in args:
            ns, extras = super().parse_known_args(args, namespace)
            if "--" in extras:
                # `edit TURN --name N -- -TEXT`: plain argparse filled TURN alone at the first
                # run of positionals; what follows `--` fills the optional ones still empty.
                cut = extras.index("--")
                after = extras[cut + 1 :]
                for action in self._get_positional_actions():
                    if after and action.nargs == "?" and getattr(ns, action.dest, None) is None:
                        setattr(ns, action.dest, after.pop(0))
                extras = extras[:cut] + after
            return ns, extras
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


# -- output helpers ----------------------------------------------------------------------------


def _scrub(text: str) -> str:
    """Never let the API key reach the terminal, whatever a lower layer put in a message."""
    key = (os.environ.get(config.API_KEY_ENV) or "").strip()  # as the client reads it
    if len(key) >= 4:
        text = text.replace(key, "[api key]")
    return text


def _one_line(text: str) -> str:
    return " ".join(_scrub(str(text)).split()) or "error"


def _on_terminal(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):  # closed
        return False


def _shown(stream: IO[str], text: str) -> str:
    """`text` as written to `stream`: on a terminal, without the control characters that would
    drive it (render.terminal_safe); to a pipe or a file, exactly."""
    return render.terminal_safe(text) if _on_terminal(stream) else text


def _err(message: str) -> None:
    if sys.stderr is None:  # started with stderr closed (`2>&-`): nowhere to say it
        return
    try:
        print(_shown(sys.stderr, _scrub(message)), file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone (the terminal closed: a SIGHUP); nothing is left to tell


def _error_line(message: str) -> None:
    _err(f"{PROG}: error: {_one_line(message)}")


def _out(text: str = "") -> None:
    sys.stdout.write(_shown(sys.stdout, text) + "\n")
    sys.stdout.flush()


# -- reading input -----------------------------------------------------------------------------


def _utf8(value: str | None, what: str) -> str | None:
    """Command-line text that is valid UTF-8 (a stray byte arrives as a lone surrogate)."""
    if value is None:
        return None
    if not is_text(value):
        raise InvalidInput(f"{what} is not valid UTF-8")
    return value


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("stdin is not valid UTF-8") from None


def _text(value: str | None, what: str = "TEXT") -> str | None:
    """TEXT as given, or stdin for `-`."""
    if value == "-":
        return _read_stdin()
    return _utf8(value, what)


def _run_editor(argv: list[str]) -> int:
    """Run the editor and wait for it, with Ctrl-C left to it (as git does): the terminal sends
    SIGINT to both, and an editor that handles it (ed, nano) would otherwise lose the edit when
    convo stopped at once. The editor itself starts with the default handling."""
    proc = subprocess.Popen(argv)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _edit_in_editor(initial: str) -> str:
    """Open $VISUAL, else $EDITOR (as git and less choose), else vi, on `initial`; the saved
    text, trailing whitespace removed."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    fd, name = tempfile.mkstemp(prefix="convo-edit-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(initial)
        try:
            status = _run_editor([*shlex.split(editor), name])
        except ValueError as e:  # shlex: an unclosed quote
            raise InvalidInput(f"cannot read the editor command {editor!r}: {e}") from None
        except OSError as e:
            raise InvalidInput(f"cannot run editor {editor!r}: {e.strerror or e}") from None
        if status == -signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C stopped an editor that leaves it to the default
        if status != 0:
            raise InvalidInput(f"editor {editor!r} exited with status {status}: edit aborted")
        try:
            text = Path(name).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("the edited text is not valid UTF-8: edit aborted") from None
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    text = text.rstrip()
    if not text:
        raise InvalidInput("empty text: edit aborted")
    return text


# -- the store and the conversation ------------------------------------------------------------


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[Any]:
    from convo.service import Store

    store = Store(args.db)
    try:
        yield store
    finally:
        _close_holding_signals(store)


def _close_holding_signals(store: Any) -> None:
    """Close the store with Ctrl-C, SIGTERM and SIGHUP held until it is done: one that lands
    in the middle of a driver's close made SQLAlchemy log the interrupted close's traceback.
    Held, it is handled (and reported) as soon as the close is over, by the handler it would
    have met. (Held by swapping handlers, not by the signal mask, which another thread would
    get round: Python runs every handler in the main thread.)"""
    if threading.current_thread() is not threading.main_thread():
        store.close()
        return
    held: list[int] = []
    before: dict[int, Any] = {}
    for sig in [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]:
        handler = signal.getsignal(sig)
        if handler is not None and handler != signal.SIG_IGN:  # (None: set outside Python)
            before[sig] = signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        store.close()
    finally:
        _deliver_held(before, held)


def _deliver_held(before: dict[int, Any], held: list[int]) -> None:
    """Put the handlers back, every one even if a signal arrives meanwhile, then hand the
    first held signal to its own (SIG_DFL: end the process as it would have)."""
    raised: BaseException | None = None
    for sig, handler in before.items():
        try:
            signal.signal(sig, handler)
        except BaseException as e:  # a signal handled as this one was put back
            raised = raised or e
    if raised is not None:
        raise raised
    if held:
        handler = before[held[0]]
        if callable(handler):
            handler(held[0], sys._getframe())  # raises: KeyboardInterrupt, or _Terminated
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held[0])


def _conversation(store: Any, ref: str | None) -> Any:
    if ref:
        return store.get(ref)
    conv = store.latest()
    if conv is None:
        raise InvalidInput("no conversation yet: run `convo new`")
    return conv


def _branch_head(conv: Any) -> str | None:
    return conv.store.storage.branch(conv.id, conv.branch).head_id


def _continuation_lead(conv: Any) -> str:
    """The text a reply continues when the branch ends with a prefill (or a turn a person
    wrote); not after a pause_turn, whose text was printed with its own reply."""
    from convo.history import is_continued

    turns = conv.turns()
    if turns and is_continued(turns[-1]):
        from convo.types import text_of

        return text_of(turns[-1].content)
    return ""


# -- sending and printing a reply --------------------------------------------------------------


class _ReplyPrinter:
    """Streams a reply to stdout: an optional prefix, the prefill, then chunks as they come."""

    def __init__(self, out: IO[str], prefix: str = "", lead: str = "") -> None:
        self.out = out
        self.safe = render.terminal_safe if _on_terminal(out) else None
        self._cr = ""  # a CR held back on a terminal (see _write)
        self.prefix = prefix
        self.lead = lead
        self.started = False  # something of the current attempt is on screen
        self.any_output = False

    def _write(self, text: str) -> None:
        if self.safe is None:
            self.out.write(text)
            return
        # On a terminal a CR LF is a line end: a CR that ends a chunk waits for the next one.
        text = self._cr + text
        self._cr = "\r" if text.endswith("\r") else ""
        self.out.write(self.safe(text[:-1] if self._cr else text))

    def _start(self) -> None:
        if not self.started:
            self._write(self.prefix + self.lead)
            self.started = True
            self.any_output = True

    def chunk(self, text: str) -> None:
        self._start()
        self._write(text)
        self.out.flush()

    def retry(self, notice: Any) -> None:
        self._cr = ""  # (before the line end written below, a CR is part of it)
        if self.started:
            # The next attempt starts the reply again from the beginning.
            self.out.write("\n")
            self.out.flush()
            self.started = False
        _err(f"[retrying after {_one_line(str(notice.error))} in {notice.delay:.1f}s]")

    def finish(self) -> None:
        self._cr = ""
        if not (self.started or self.prefix or self.lead):
            return  # nothing but tool uses: no empty line
        self._start()
        self.out.write("\n")
        self.out.flush()

    def abandon(self) -> None:
        self._cr = ""
        if self.started:
            self.out.write("\n")
            self.out.flush()
            self.started = False


def _print_reply_tail(reply: Any) -> None:
    for use in reply.tool_uses:
        _out(render.tool_use_line(use))
    if reply.stop_reason and reply.stop_reason != "end_turn":
        _out(f"[stopped: {reply.stop_reason}]")
    if reply.turn_id is None:
        _err("[the reply was empty: nothing was stored; the branch still ends with your turn]")
    if reply.stop_reason == "refusal":
        # The API's advice: going on from a refusal gets more refusals.
        _err(
            "[Claude declined. Do not go on from here: `convo edit TURN` your message "
            "(or `convo fork --at TURN` before it) and send from the new branch]"
        )


def _stream_line(conv: Any, text: str, on_retry: Any) -> Any:
    """A chat line's streamed reply (bound with functools.partial, one per line)."""
    return conv.stream(text, on_retry=on_retry)


def _deliver(
    conv: Any,
    start: Callable[[Callable[[Any], None] | None], Any],
    *,
    stream: bool,
    lead: str | Callable[[], str],
    continuing: bool,
    prefix: str = "",
    retry: str = "`convo retry`",
) -> Any:
    """Run one send (`start(on_retry)` returns a ReplyStream, or a Reply when not streaming),
    print the reply, and turn a failure into a clear message about what was kept (`retry`: what
    asks again, which in chat is /retry)."""
    head_before = _branch_head(conv)
    printer = _ReplyPrinter(sys.stdout, prefix, lead if isinstance(lead, str) else "")
    try:
        if stream:
            replies = start(printer.retry)
            if not isinstance(lead, str):
                printer.lead = lead()
            for chunk in replies:
                printer.chunk(chunk)
            reply = replies.reply
            printer.finish()
        else:
            reply = start(printer.retry)  # notices go to stderr; nothing is on stdout yet
            if prefix or reply.text:
                _out(prefix + reply.text)
    except KeyboardInterrupt as e:
        with suppress(OSError):  # (a closed terminal cannot take the line)
            printer.abandon()
        _err(_interrupted_note(conv, head_before, continuing, retry))
        if isinstance(e, _Terminated):
            raise  # (stops the program, chat included, with the signal's status)
        raise _Exit(EXIT_INTERRUPTED) from None
    except ConvoError as e:
        printer.abandon()
        if isinstance(e, APIError | MissingApiKey) and _turn_kept(conv, head_before, continuing):
            e.convo_hint = RETRY_HINT  # type: ignore[union-attr]
        raise
    _print_reply_tail(reply)
    return reply


def _head_state(conv: Any, head_before: str | None) -> tuple[bool, str | None]:
    """(whether the branch head moved, the kind of the head turn now)."""
    head = _branch_head(conv)
    if head is None:
        return head != head_before, None
    return head != head_before, conv.store.storage.turn(head).kind


def _turn_kept(conv: Any, head_before: str | None, continuing: bool) -> bool:
    try:
        moved, kind = _head_state(conv, head_before)
    except ConvoError:
        return False
    return (moved or continuing) and kind not in (None, "reply")


def _interrupted_note(conv: Any, head_before: str | None, continuing: bool, retry: str) -> str:
    try:
        moved, kind = _head_state(conv, head_before)
    except ConvoError:
        return "[interrupted]"
    if kind == "reply" and moved:
        return "[interrupted: the reply had already been stored]"
    if (moved or continuing) and kind is not None:
        return INTERRUPTED_SAVED.format(retry=retry)
    return "[interrupted: nothing was saved]"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "model", None):
        out["model"] = args.model
    if getattr(args, "max_tokens", None) is not None:
        out["max_tokens"] = args.max_tokens
    return out


# -- commands ----------------------------------------------------------------------------------


def cmd_new(args: argparse.Namespace) -> int:
    from convo.service import DEFAULT_MAX_TOKENS, DEFAULT_MODEL

    tools = _load_tools(args.tools) if args.tools else None
    params: dict[str, Any] = {}
    if args.temperature is not None:
        params["temperature"] = args.temperature
    with _store(args) as store:
        conv = store.create(
            _utf8(args.model, "--model") or DEFAULT_MODEL,
            system=_text(args.system, "--system"),
            max_tokens=args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS,
            title=_utf8(args.title, "--title"),
            cache=None if args.no_cache else args.cache_ttl,
            budget_usd=args.budget,
            max_input_tokens=args.max_input_tokens,
            tools=tools,
            **params,
        )
        _out(conv.id)
    return 0


def _load_tools(path: str) -> list[Any]:
    import json

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read tools file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"tools file {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput(f"tools file {path} is not valid JSON: {TOO_DEEP}") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise InvalidInput(f"tools file {path}: expected a list of tool definitions (objects)")
    return data


def cmd_send(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        text = _text(args.text)
        prefill = _utf8(args.prefill, "--prefill")
        images = args.image or []
        overrides = _overrides(args)
        continuing = text is None and prefill is None and not images
        lead = prefill or ""
        if continuing:
            lead = _continuation_lead(conv)
        if args.no_stream:
            start: Callable[[Any], Any] = lambda cb: conv.send(  # noqa: E731
                text, prefill=prefill, images=images, on_retry=cb, **overrides
            )
        else:
            start = lambda cb: conv.stream(  # noqa: E731
                text, prefill=prefill, images=images, on_retry=cb, **overrides
            )
        _deliver(conv, start, stream=not args.no_stream, lead=lead, continuing=continuing)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        lead = _continuation_lead(conv)
        stream = not args.no_stream
        _deliver(
            conv, lambda cb: conv.retry(stream=stream, on_retry=cb),
            stream=stream, lead=lead, continuing=True,
        )
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        name = _utf8(args.name, "--name")
        stream = not args.no_stream

        before = conv.branch

        def start(cb: Callable[[Any], None] | None) -> Any:
            replies = conv.regenerate(args.turn, name=name, stream=stream, on_retry=cb)
            now_on = conv.branch
            _err(f"[on new branch {now_on}]" if now_on != before else f"[on branch {now_on}]")
            return replies

        # The lead (a prefill the new reply continues) is known once the branch is made.
        _deliver(conv, start, stream=stream, lead=lambda: _continuation_lead(conv), continuing=True)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        text = _text(args.text)
        assert text is not None
        if args.role == "user":
            turn_id = conv.add_user(text, images=args.image or [])
        else:
            if args.image:
                raise InvalidInput("--image applies to user turns only")
            turn_id = conv.add_assistant(text)
        _out(str(turn_id))
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        body = conv.request(
            _text(args.text),
            prefill=_utf8(args.prefill, "--prefill"),
            images=args.image or [],
            **_overrides(args),
        )
        _out(render.to_json(body))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        info = conv.info
        branch = args.branch or info.current_branch
        turns = conv.turns(branch)
        replies = [int(t.id) for t in turns if t.kind == "reply"]
        calls = store.storage.reply_calls(conv.id, replies)
        if args.json:
            _out(render.to_json(render.transcript_json(info, branch, turns, calls)))
        else:
            _out(render.transcript(info, branch, turns, calls))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        summaries = store.list(args.limit or None)
        previews = {s.id: s.preview for s in summaries if s.preview}
        if args.json:
            _out(render.to_json(render.conversations_json(summaries, previews)))
        else:
            _out(render.conversations_table(summaries, previews))
    return 0


def _day(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        d = datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise InvalidInput(f"{flag} must be a date YYYY-MM-DD, not {value!r}") from None
    return d.replace(tzinfo=UTC)


def cmd_usage(args: argparse.Namespace) -> int:
    by = args.by or ("branch" if args.conversation else "conversation")
    since = _day(args.since, "--since")
    until = _day(args.until, "--until")
    if since is not None and until is not None and since > until:
        raise InvalidInput(f"--since {args.since} is after --until {args.until}")
    if until is not None:
        try:
            until += timedelta(days=1)  # --until is inclusive: the whole day counts
        except OverflowError:  # (--until 9999-12-31: no end at all)
            until = None
    with _store(args) as store:
        report = store.usage(
            conversation=args.conversation, since=since, until=until, by=by
        )
    if report.unpriced_calls:
        _err(
            f"{PROG}: warning: {report.unpriced_calls} calls have no known price (models: "
            f"{', '.join(report.models_without_price) or '?'}); their cost is not counted"
        )
    if args.json:
        _out(render.to_json(render.usage_json(report)))
    elif args.csv:
        _out(render.usage_csv(report))
    else:
        _out(render.usage_table(report))
        if report.rows:
            _out(render.cache_savings_line(report.total))
    return 0


def cmd_fork(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        _out(conv.fork(args.at, _utf8(args.name, "--name"), checkout=not args.no_checkout))
    return 0


def _editable_text(turn: Any) -> str:
    parts: list[str] = []
    for b in turn.content:
        if b.get("type") == "text":
            parts.append(b["text"])
        elif b.get("type") == "tool_result":
            inner = b.get("content")
            if isinstance(inner, str):
                parts.append(inner)
            elif isinstance(inner, list):
                parts.extend(x.get("text", "") for x in inner if x.get("type") == "text")
    return "".join(parts)


def cmd_edit(args: argparse.Namespace) -> int:
    if args.editor and args.text is not None:
        raise _UsageError("give TEXT or --editor, not both (see `convo edit --help`)")
    if not args.editor and args.text is None:
        raise _UsageError("give the new TEXT (or - for stdin), or --editor (see `convo edit --help`)")
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        text: str | None
        if args.editor:
            old = _editable_text(conv.turn(args.turn))
            text = _edit_in_editor(old)
            if text == old.rstrip():  # quitting the editor is not an edit
                raise InvalidInput("the text is unchanged: edit aborted")
        else:
            text = _text(args.text)
        assert text is not None
        new_id = conv.edit(args.turn, text, name=_utf8(args.name, "--name"))
        _out(str(new_id))
        _err(f"[on new branch {conv.branch}]")
    return 0


def cmd_branches(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        _out(_branches_table(conv))
    return 0


def _branches_table(conv: Any) -> str:
    branches = conv.branches()
    depths = {b.head_id: b.head_depth for b in branches if b.head_id}
    return render.branches_table(branches, conv.branch, depths)


def cmd_branch(args: argparse.Namespace) -> int:
    if not args.delete:
        return cmd_branches(args)
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        conv.delete_branch(args.delete)
        _out(f"deleted branch {args.delete} (its turns stay in the tree)")
    return 0


def cmd_checkout(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        conv.checkout(args.name)
        _out(f"on branch {args.name}")
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        turns = store.storage.turns(conv.id)
        _out(render.tree(turns, conv.branches(), conv.branch))
    return 0


def cmd_tool_result(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        text = _text(args.text)
        assert text is not None
        _out(str(conv.add_tool_result(args.tool_use_id, text, is_error=args.error)))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from convo import db

    database = db.Database(config.database_url(args.db))
    try:
        if args.db_command == "upgrade":
            db.upgrade_schema(database.engine)
            _out(f"schema at revision {db.schema_revision(database)} (head)")
        else:
            rev = db.schema_revision(database)
            if rev == db.HEAD:
                _out(f"{rev} (head)")
            elif rev is not None and rev not in db.KNOWN_REVISIONS:
                _out(f"{rev} (newer than this convo's head, {db.HEAD}: upgrade convo)")
            elif database.name == "sqlite":  # (upgraded by the first command that opens it)
                _out(f"{rev or 'none'} (this convo's head is {db.HEAD}: the next command upgrades it)")
            else:
                _out(f"{rev or 'none'} (this convo's head is {db.HEAD}: {db.upgrade_hint(str(database.url))})")
    finally:
        database.close()
    return 0


def _number_or_off(what: str, ok: Callable[[float], bool]) -> Callable[[str], float | str]:
    """An argument type: a number `ok` accepts, or 'off' (or 'none') to remove the setting."""

    def parse(value: str) -> float | str:
        if value.strip().lower() in (_OFF, "none"):
            return _OFF
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number or 'off': {value!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what} or 'off': {value!r}")
        return x

    return parse


_temperature_value = _number_or_off("a number from 0 to 1", lambda x: 0 <= x <= 1)
_budget_value = _number_or_off("a positive amount of USD", lambda x: 0 < x < float("inf"))


def _given(what: str) -> Callable[[str], str]:
    """An argparse type for a value that names something: given empty, it would quietly mean
    the default (the latest conversation, the default model) instead of what was meant."""

    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"empty {what}")
        return value.strip()

    return check


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535: {value!r}")
    return n


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {value!r}")
    if n > MAX_INT:
        raise argparse.ArgumentTypeError(f"too large (at most {MAX_INT}): {value!r}")
    return n


def _positive_usd(value: str) -> float:
    x = _budget_value(value)
    if x == _OFF:
        raise argparse.ArgumentTypeError(f"must be a positive amount of USD: {value!r}")
    return float(x)


def _cap_value(value: str) -> int | str:
    if value.strip().lower() in (_OFF, "none"):
        return _OFF
    return _positive_int(value)


def cmd_budget(args: argparse.Namespace) -> int:
    with _store(args) as store:
        if args.store:
            if args.max_input_tokens is not None:
                raise InvalidInput("--max-input-tokens applies to a conversation, not the store")
            if args.usd is not None:
                store.set_budget(None if args.usd == _OFF else args.usd)
            limit = store.budget
            total = store.usage(by="conversation").total
            shown = render.fmt_usd(limit) if limit is not None else "none"
            _out(f"store budget {shown} (spent {render.fmt_cost(total.cost_usd, total.unpriced_calls)})")
            return 0
        conv = _conversation(store, args.conversation)
        changes = {
            key: None if value == _OFF else value
            for key, value in (("budget_usd", args.usd), ("max_input_tokens", args.max_input_tokens))
            if value is not None
        }
        if changes:
            conv.set_limits(**changes)
        limits = conv.limits
        total = conv.usage(by="conversation").total
        budget, cap = limits["budget_usd"], limits["max_input_tokens"]
        _out(
            f"conversation {conv.id}: budget "
            f"{render.fmt_usd(budget) if budget is not None else 'none'} "
            f"(spent {render.fmt_cost(total.cost_usd, total.unpriced_calls)}), max input tokens "
            f"{render.fmt_int(cap) if cap is not None else 'none'}"
        )
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.model is not None:
        changes["model"] = _utf8(args.model, "--model")
    if args.no_system:
        changes["system"] = None
    elif args.system is not None:
        changes["system"] = _text(args.system, "--system")
    if args.no_title:
        changes["title"] = None
    elif args.title is not None:
        changes["title"] = _utf8(args.title, "--title")
    if args.max_tokens is not None:
        changes["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        changes["temperature"] = None if args.temperature == _OFF else args.temperature
    if args.no_cache:
        changes["cache"] = "off"
    elif args.cache_ttl is not None:
        changes["cache"] = args.cache_ttl
    if args.no_tools:
        changes["tools"] = None
    elif args.tools is not None:
        changes["tools"] = _load_tools(args.tools)
    for key in args.unset or []:
        changes[key] = None
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        if changes:
            conv.configure(**changes)
        info = conv.info
        p = info.params
        tools = p.get("tools") or []
        _out(render.settings_line(conv.id, info.title, info.model, info.system, p, len(tools)))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = store.get(args.id)
        if not args.yes and _on_terminal(sys.stdin):
            store.storage.refuse_if_busy(conv.id)  # (before the question, not after the answer)
            if not _confirm_delete(conv):
                _err(f"{PROG}: nothing deleted")
                return 1
        gone = store.delete(conv.id)
    counts = [
        render.count(gone.turns, "turn"), render.count(gone.branches, "branch", "branches"),
        render.count(gone.calls, "call") + " in the ledger",
    ] + ([render.count(gone.blobs, "image or document", "images or documents")] if gone.blobs else [])
    _out(f"deleted conversation {gone.id}: {', '.join(counts)}")
    return 0


def _confirm_delete(conv: Any) -> bool:
    """Asked when stdin is a terminal (a script deletes what it names): a deletion cannot be
    undone, and a unique prefix may name another conversation than the one meant. The question
    goes to whichever of stderr and stdout is a terminal (with neither, nobody would see it:
    no question)."""
    screen = next((s for s in (sys.stderr, sys.stdout) if _on_terminal(s)), None)
    if screen is None:
        return True
    info = conv.info
    title = f' "{render.one_line(info.title)}"' if info.title else ""
    calls = conv.usage().total.calls
    screen.write(render.terminal_safe(
        f"delete conversation {conv.id}{title}: {render.count(info.turn_count, 'turn')}, "
        f"{render.count(calls, 'call')} of spend in the ledger? [y/N] "
    ))
    screen.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        screen.write("\n")  # (the interrupt's own line below the question)
        raise
    if not answer.endswith("\n"):  # Ctrl-D
        screen.write("\n")
    return answer.strip().lower() in ("y", "yes")


def cmd_export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        text = render.to_json(store.export(conv.id))
    if args.output:
        _write_private(args.output, text + "\n")
    else:
        _out(text)
    return 0


def _write_private(path: str, text: str) -> None:
    """Write a file only its owner can read, as the database is: an export holds every turn.
    A path that cannot be written is bad input; a disk that fills up is not."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode):
                # An existing file too, before it holds anything (not a pipe or a terminal);
                # one another user owns keeps the mode its owner gave it.
                if info.st_uid == os.geteuid():
                    os.fchmod(fd, 0o600)
                os.ftruncate(fd, 0)
            f.write(text)
    except OSError as e:
        message = f"cannot write {path}: {e.strerror or e}"
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
            raise ConvoError(message) from None
        raise InvalidInput(message) from None


def cmd_import(args: argparse.Namespace) -> int:
    if args.file == "-":
        raw = _read_stdin()
    else:
        try:
            raw = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidInput(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{args.file} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise InvalidInput(f"{args.file} is not JSON: {TOO_DEEP}") from None
    with _store(args) as store:
        _out(store.import_(data).id)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass
    with _store(args) as store:
        conv = _conversation(store, args.conversation)
        store.client.require_key()  # before the first prompt, not after the first message
        info = conv.info
        _err(
            f"chatting in {conv.id} on branch {info.current_branch} ({info.model}); "
            "/quit or Ctrl-D leaves, /retry asks again, /branches lists branches"
        )
        # 1 while the last message has no reply because its send failed (the API, a budget, a
        # busy branch): a script feeding the chat learns that. A refused command (bad input)
        # leaves it as it was; a reply makes it 0.
        status = 0
        while True:
            try:
                line = input("you> ")
            except EOFError:
                _out()
                return status
            command = line.strip()
            if not command:
                continue
            if command in ("/quit", "/exit", "/q"):
                return status
            try:
                if command == "/branches":
                    _out(_branches_table(conv))
                    continue
                if command == "/retry":
                    lead, continuing = _continuation_lead(conv), True
                    start: Callable[[Any], Any] = lambda cb: conv.retry(  # noqa: E731
                        stream=True, on_retry=cb
                    )
                elif command.startswith("/"):
                    _err(f"unknown command {command}: /quit, /retry, /branches")
                    continue
                else:
                    lead, continuing = "", False
                    start = functools.partial(_stream_line, conv, line)
                _deliver(
                    conv, start, stream=True, lead=lead, continuing=continuing, prefix="claude> ",
                    retry="/retry",
                )
                status = 0
            except _Exit:
                continue  # Ctrl-C stopped the reply; the note is printed; back to the prompt
            except ConvoError as e:
                if getattr(e, "convo_hint", None) == RETRY_HINT:
                    e.convo_hint = "your turn is saved; /retry asks again"  # type: ignore[attr-defined]
                _report(e)
                if isinstance(e, NotFound) and _deleted(conv):
                    return 1  # deleted by another process: nothing left to chat in
                if not isinstance(e, InvalidInput):
                    status = 1


def _deleted(conv: Any) -> bool:
    try:
        return conv.info is None
    except NotFound:
        return True


def cmd_standin(args: argparse.Namespace) -> int:
    from convo import standin

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.quiet:
        argv.append("--quiet")
    standin.main(argv)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from convo import demo

    return demo.run(keep=args.keep)


# -- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="A stateful conversation manager over Anthropic's stateless Messages API.",
        epilog="Exit codes: 0 ok, 1 API or runtime failure, 2 bad usage or input, 130 interrupted.",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="database URL (default: $CONVO_DATABASE_URL, else SQLite in the user data dir)",
    )
    # Accepted after the command too (`convo show --db URL`); SUPPRESS keeps the global value.
    # (Parents of command parsers, so of their class.)
    common = _CommandParser(add_help=False)
    common.add_argument("--db", metavar="URL", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    per_conv = _CommandParser(add_help=False, parents=[common])
    per_conv.add_argument(
        "-C",
        "--conversation",
        type=_given("conversation id"),
        metavar="ID",
        help="conversation id or unique prefix (default: the most recently used)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, *, conv: bool = True
    ) -> argparse.ArgumentParser:
        parent = per_conv if conv else common
        p = sub.add_parser(name, help=help, description=help, parents=[parent])
        p.set_defaults(func=func)
        return p

    p = command("new", cmd_new, "start a conversation; prints its id", conv=False)
    p.add_argument("--model", type=_given("model id"), help="model id (default: claude-sonnet-4-5)")
    p.add_argument("--system", metavar="S", help="system prompt (- reads stdin)")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N", help="default max_tokens (1024)")
    p.add_argument("--title", metavar="T")
    p.add_argument("--temperature", type=float, metavar="X")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", action="store_true", help="no prompt caching")
    cache.add_argument(
        "--cache-ttl", choices=("5m", "1h"), default="5m", help="prompt cache lifetime (5m)"
    )
    p.add_argument("--budget", type=_positive_usd, metavar="USD", help="spending cap in USD")
    p.add_argument("--max-input-tokens", type=_positive_int, metavar="N", help="input cap per request")
    p.add_argument("--tools", metavar="FILE.json", help="tool definitions (a JSON list)")

    p = command("send", cmd_send, "send TEXT and print the reply (streamed)")
    p.add_argument(
        "text", nargs="?", metavar="TEXT",
        help="the message (- reads stdin; none continues the branch)",
    )
    p.add_argument("--prefill", metavar="P", help="start Claude's reply with P (models that accept it)")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole reply")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N")
    p.add_argument("--model", type=_given("model id"), metavar="M")
    p.add_argument("--image", action="append", metavar="PATH", help="attach an image (repeatable)")

    p = command("retry", cmd_retry, "ask again for the reply a failed or interrupted send did not get")
    p.add_argument("--no-stream", action="store_true")

    p = command("add", cmd_add, "append a turn without sending anything; prints its id")
    p.add_argument("--role", required=True, choices=("user", "assistant"))
    p.add_argument("text", metavar="TEXT", help="the turn's text (- reads stdin)")
    p.add_argument("--image", action="append", metavar="PATH", help="attach an image to a user turn")

    p = command("request", cmd_request, "print the JSON body the next send would POST; sends nothing")
    p.add_argument("text", nargs="?", metavar="TEXT", help="a new user turn to include (- reads stdin)")
    p.add_argument("--prefill", metavar="P")
    p.add_argument("--image", action="append", metavar="PATH")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N")
    p.add_argument("--model", type=_given("model id"), metavar="M")

    p = command(
        "show",
        cmd_show,
        "print a branch's transcript with each reply's usage and cost",
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON: {conversation, branch, turns: [...]}"
    )
    p.add_argument(
        "--branch", type=_given("branch name"), metavar="B", help="branch to show (default: the current one)"
    )

    p = command("list", cmd_list, "list conversations, most recently used first", conv=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=_positive_int, default=DEFAULT_LIST_LIMIT, metavar="N",
                   help=f"at most N conversations (default {DEFAULT_LIST_LIMIT})")

    p = command("usage", cmd_usage, "tokens and spend, grouped; all conversations unless -C")
    p.add_argument("--by", choices=("conversation", "branch", "model", "day"),
                   help="grouping (default: conversation; branch with -C)")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="calls from this UTC day on")
    p.add_argument("--until", metavar="YYYY-MM-DD", help="calls up to and including this UTC day")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")

    p = command("fork", cmd_fork, "start a branch at a turn; prints the branch name")
    p.add_argument("--at", required=True, metavar="TURN", help="turn id, as `show` prints it")
    p.add_argument("--name", metavar="N")
    p.add_argument(
        "--no-checkout", action="store_true", help="create the branch but stay where you are"
    )

    p = command("edit", cmd_edit, "a new branch with TURN rewritten; prints the new turn id")
    p.add_argument("turn", metavar="TURN")
    p.add_argument("text", nargs="?", metavar="TEXT", help="the new text (- reads stdin)")
    p.add_argument("--editor", action="store_true", help="edit the old text in $EDITOR")
    p.add_argument("--name", metavar="N", help="name of the new branch")

    p = command("regenerate", cmd_regenerate, "another reply on a new branch; the old one stays")
    p.add_argument("turn", nargs="?", metavar="TURN", help="reply to redo (default: the last one)")
    p.add_argument("--name", metavar="N", help="name of the new branch")
    p.add_argument("--no-stream", action="store_true")

    command("branches", cmd_branches, "list branches; * marks the current one")

    p = command("branch", cmd_branch, "list branches, or delete one with -d")
    p.add_argument(
        "-d", "--delete", type=_given("branch name"), metavar="NAME", help="delete branch NAME (its turns stay)"
    )

    p = command("checkout", cmd_checkout, "switch the current branch")
    p.add_argument("name", metavar="NAME")

    command("tree", cmd_tree, "the whole conversation as a tree, branches at their heads")

    p = command(
        "tool-result", cmd_tool_result, "answer a tool_use of the last reply; prints the turn id"
    )
    p.add_argument("tool_use_id", metavar="TOOL_USE_ID")
    p.add_argument("text", metavar="TEXT", help="the result (- reads stdin)")
    p.add_argument("--error", action="store_true", help="the tool failed (is_error)")

    p = command("db", cmd_db, "database schema: upgrade, or show the current revision", conv=False)
    p.add_argument("db_command", choices=("upgrade", "current"), metavar="upgrade|current")

    p = command("budget", cmd_budget, "show or set spending caps (a conversation's, or --store)")
    p.add_argument("--usd", type=_budget_value, metavar="X", help="budget in USD ('off' removes it)")
    p.add_argument(
        "--max-input-tokens", type=_cap_value, metavar="N",
        help="input cap per request ('off' removes it)",
    )
    p.add_argument("--store", action="store_true", help="the whole store's budget instead")

    p = command("set", cmd_set, "show or change a conversation's settings for later requests")
    p.add_argument("--model", type=_given("model id"), metavar="M")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system", metavar="S", help="system prompt (- reads stdin)")
    system.add_argument("--no-system", action="store_true", help="no system prompt")
    title = p.add_mutually_exclusive_group()
    title.add_argument("--title", metavar="T")
    title.add_argument("--no-title", action="store_true")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N")
    p.add_argument("--temperature", type=_temperature_value, metavar="X", help="0 to 1 ('off' removes it)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--no-cache", action="store_true", help="no prompt caching")
    cache.add_argument("--cache-ttl", choices=("5m", "1h"), help="prompt cache lifetime")
    tools = p.add_mutually_exclusive_group()
    tools.add_argument("--tools", metavar="FILE.json", help="tool definitions (a JSON list)")
    tools.add_argument("--no-tools", action="store_true", help="no tools")
    p.add_argument(
        "--unset", action="append", metavar="SETTING", choices=_UNSETTABLE,
        help=f"remove a request setting (repeatable): {', '.join(_UNSETTABLE)}",
    )

    p = command(
        "delete", cmd_delete,
        "delete a conversation: its turns, branches and ledger rows (export it first to keep it)",
        conv=False,
    )
    p.add_argument("id", type=_given("conversation id"), metavar="ID", help="conversation id or unique prefix")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask first (convo asks only at a terminal)")

    command("chat", cmd_chat, "an interactive chat in a conversation")

    p = command("export", cmd_export, "write a conversation's whole tree, branches and ledger as JSON")
    p.add_argument("-o", "--output", type=_given("file name"), metavar="FILE", help="write to FILE (default: stdout)")

    p = command(
        "import", cmd_import, "import a conversation exported by `convo export`; prints its new id",
        conv=False,
    )
    p.add_argument("file", metavar="FILE", help="the export (- reads stdin)")

    p = command(
        "standin", cmd_standin, "run the local stand-in of the Messages API (not Claude)",
        conv=False,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8765, help="0 to 65535 (0: any free port)")
    p.add_argument("--quiet", action="store_true")

    p = command(
        "demo", cmd_demo, "a guided tour against the local stand-in; no API key needed",
        conv=False,
    )
    p.add_argument("--keep", action="store_true", help="keep the demo database and print its path")
    return parser


# -- entry point -------------------------------------------------------------------------------


def _report(e: ConvoError) -> None:
    hint = getattr(e, "convo_hint", None)
    _error_line(f"{e} ({hint})" if hint else str(e))


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so a send under way records what it was
    billed and keeps the user's turn, as it does for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: Any) -> None:
    raise _Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (`convo new >&-`): nowhere to say anything
        _error_line("standard output is closed: give it somewhere to go (>/dev/null to discard it)")
        return 2
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):
                pass
    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Only where the signal would kill the process: one ignored (`nohup`) stays ignored,
        # and a program that calls main() with its own handler keeps it.
        previous = {
            sig: signal.signal(sig, _terminate) for sig in handled if signal.getsignal(sig) is signal.SIG_DFL
        }
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            raise _UsageError("a command is required (see `convo --help`)")
        code: int = args.func(args)
        sys.stdout.flush()  # (here, so a full disk is reported like any other failure)
        return code
    except _UsageError as e:
        _error_line(str(e))
        return 2
    except _Exit as e:
        return e.code
    except ConvoError as e:
        _report(e)
        return e.exit_code
    except _Terminated as e:
        _err(f"{PROG}: terminated by signal {e.signum}")
        return 128 + e.signum
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`convo show | head`): stop quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 1
    except OSError as e:  # the system refused (stdout on a full disk, say): not a bug
        where = f": {e.filename}" if e.filename else ""
        _error_line(f"{e.strerror or e}{where}")
        return 1
    except Exception as e:  # a bug: one line, unless CONVO_DEBUG asks for the traceback
        if os.environ.get("CONVO_DEBUG"):
            raise
        _error_line(f"unexpected {type(e).__name__}: {e} (set CONVO_DEBUG=1 for a traceback)")
        return 1

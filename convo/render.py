"""Text for people and JSON for scripts, from the service layer's plain data. Pure functions.

Nothing here touches the database, the network or a terminal: every function takes rows (turns,
summaries, usage reports, call records) and returns a string or a JSON-ready dict, so the CLI
only prints and the tests only compare strings.

The JSON shapes (`transcript_json`, `conversations_json`, `usage_json`) are a documented, stable
interface: keys are only ever added, never renamed or removed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

from convo.ids import without_controls
from convo.types import ToolUse

__all__ = [
    "block_text",
    "branches_table",
    "cache_savings_line",
    "calls_table",
    "content_text",
    "conversations_json",
    "conversations_table",
    "fmt_int",
    "fmt_size",
    "fmt_usd",
    "id_width",
    "local_minute",
    "one_line",
    "short",
    "table",
    "to_json",
    "tool_use_line",
    "transcript",
    "transcript_json",
    "tree",
    "turn_label",
    "usage_csv",
    "usage_json",
    "usage_line",
    "usage_table",
]

PREVIEW_CHARS = 40
USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


# -- small formats -----------------------------------------------------------------------------


def short(turn_id: int | str | None, width: int = 0) -> str:
    """A turn id as shown (and typed back): its number, padded to `width` to keep columns."""
    return ("-" if turn_id is None else str(turn_id)).ljust(width)


def id_width(ids: Iterable[int | str | None], minimum: int = 1) -> int:
    """The width of the widest id shown, so ids line up in a column."""
    return max((len(str(i)) for i in ids if i is not None), default=minimum)


def fmt_int(n: int | None) -> str:
    return f"{int(n or 0):,}"


def count(n: int, one: str, many: str | None = None) -> str:
    """`n` things, singular or plural: "1 turn", "2 turns"."""
    return f"{fmt_int(n)} {one if n == 1 else many or one + 's'}"


def fmt_usd(x: float | None) -> str:
    """Dollars to 4 decimals (a call often costs a fraction of a cent); None is unknown."""
    return "$?" if x is None else f"${x:,.4f}"


def fmt_size(n: int | None) -> str:
    if n is None:
        return "? B"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


# Control characters but the tab and the line feed: C0, DEL and C1 (ESC and CSI start the
# terminal's escape sequences; a carriage return would overwrite a line already printed).
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Text for a terminal, each control character but the tab and the line feed shown as
    U+FFFD (a CR LF is a line end): a reply, or a turn imported from elsewhere, may hold an
    escape sequence that would retitle the window, rewrite what is on screen or set the
    clipboard."""
    return _TERMINAL_CONTROLS.sub("\ufffd", text.replace("\r\n", "\n"))


def one_line(text: str, width: int = PREVIEW_CHARS) -> str:
    """Whitespace collapsed to single spaces, any other control character shown as U+FFFD (an
    escape sequence in a title or a turn must not reach the terminal), cut to `width`
    characters with an ellipsis."""
    flat = without_controls(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def settings_line(
    conv_id: str, title: str | None, model: str, system: Any, params: Mapping[str, Any], tools: int
) -> str:
    """A conversation's settings for later requests, one per line (`convo set`)."""
    if system is None:
        shown = "none"
    else:
        text = system if isinstance(system, str) else " ".join(b.get("text", "") for b in system)
        shown = one_line(text)
    lines = [
        f"conversation {conv_id}",
        f"  title:       {one_line(title, len(title)) if title is not None else 'none'}",
        f"  model:       {model}",
        f"  system:      {shown}",
        f"  max_tokens:  {fmt_int(params.get('max_tokens'))}",
        f"  cache:       {params.get('cache') or 'off'}",
        f"  tools:       {tools if tools else 'none'}",
    ]
    others = {k: v for k, v in params.items() if k not in ("max_tokens", "cache", "tools")}
    lines += [f"  {key + ':':<12} {_compact(value)}" for key, value in sorted(others.items())]
    return "\n".join(lines)


def local_minute(ts: datetime | None, tz: tzinfo | None = None) -> str:
    """A timestamp in local time (or `tz`), to the minute."""
    if ts is None:
        return "-"
    return ts.astimezone(tz).strftime("%Y-%m-%d %H:%M")


def turn_label(role: str, kind: str) -> str:
    """`user`, `assistant/reply`, `assistant/prefill`, `user/tool_result`, ..."""
    return role if kind == role else f"{role}/{kind}"


# What json.dumps leaves raw with ensure_ascii=False: DEL and the C1 controls (it escapes C0).
_JSON_RAW_CONTROLS = re.compile("[\x7f-\x9f]")


def to_json(data: Any) -> str:
    """JSON with every control character escaped, so it is exact on a terminal as in a file."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)
    return _JSON_RAW_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# -- content -----------------------------------------------------------------------------------


def _media(block: Mapping[str, Any]) -> str:
    source = block.get("source") or {}
    kind = block.get("type")
    stype = source.get("type")
    if stype == "url":
        return f"[{kind} {source.get('url')}]"
    media_type = source.get("media_type") or "?"
    size = source.get("size")
    if size is None and stype == "base64" and isinstance(source.get("data"), str):
        size = len(source["data"]) * 3 // 4
    if stype in ("text", "content"):
        return f"[{kind} text]"
    return f"[{kind} {media_type} {fmt_size(size)}]"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), sort_keys=True)


def block_text(block: Mapping[str, Any]) -> str:
    """One content block as a person reads it."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind in ("image", "document"):
        return _media(block)
    if kind == "tool_use":
        return f"[tool_use {block.get('id')}] {block.get('name')} {_compact(block.get('input') or {})}"
    if kind == "tool_result":
        head = f"[tool_result for {block.get('tool_use_id')}]"
        if block.get("is_error"):
            head += " [error]"
        inner = block.get("content")
        if isinstance(inner, list):
            body = " ".join(block_text(b) for b in inner)
        else:
            body = inner or ""
        return f"{head} {body}".rstrip()
    if kind == "thinking":
        return f"[thinking] {block.get('thinking', '')}"
    if kind == "redacted_thinking":
        return "[redacted thinking]"
    return f"[{kind}]"


def content_text(blocks: Sequence[Mapping[str, Any]]) -> str:
    """A block list as text: text blocks joined as they are, other blocks on their own lines."""
    parts: list[str] = []
    prev_text = False
    for b in blocks:
        piece = block_text(b)
        is_text = b.get("type") == "text"
        if parts and not (is_text and prev_text):
            parts.append("\n")
        parts.append(piece)
        prev_text = is_text
    return "".join(parts)


def tool_use_line(use: ToolUse) -> str:
    """`[tool_use <id>] name(<json input>)`, for a reply that asks for tools."""
    return f"[tool_use {use.id}] {use.name}({_compact(use.input)})"


def usage_line(call: Mapping[str, Any] | None) -> str:
    """`in 1,234 (+cache write 0, read 1,100) out 56 · $0.0012` for one call record."""
    if not call:
        return ""
    return (
        f"in {fmt_int(call.get('input_tokens'))} "
        f"(+cache write {fmt_int(call.get('cache_creation_input_tokens'))}, "
        f"read {fmt_int(call.get('cache_read_input_tokens'))}) "
        f"out {fmt_int(call.get('output_tokens'))} · {fmt_usd(call.get('cost_usd'))}"
    )


# -- tables ------------------------------------------------------------------------------------


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[int] = (),
    footer: Sequence[Any] | None = None,
) -> str:
    """An aligned plain-text table; columns in `right` are right-aligned (numbers)."""
    body = [[str(c) for c in r] for r in rows]
    foot = [str(c) for c in footer] if footer is not None else None
    all_rows = [list(headers), *body, *([foot] if foot else [])]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in right_set else c.ljust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    lines = [line(headers)]
    lines += [line(r) for r in body]
    if foot:
        lines.append("  ".join("-" * w for w in widths))
        lines.append(line(foot))
    return "\n".join(lines)


def conversations_table(
    summaries: Sequence[Any],
    previews: Mapping[str, str] | None = None,
    tz: tzinfo | None = None,
) -> str:
    """`convo list`: one row per conversation, most recently used first."""
    if not summaries:
        return "no conversations yet: run `convo new`"
    previews = previews or {}
    rows = [
        (
            s.id,
            one_line(s.title or previews.get(s.id) or "(empty)", PREVIEW_CHARS),
            s.model,
            s.current_branch,
            fmt_int(s.turn_count),
            fmt_int(s.input_tokens),
            fmt_int(s.output_tokens),
            fmt_cost(s.cost_usd, s.unpriced_calls),
            local_minute(s.updated_at, tz),
        )
        for s in summaries
    ]
    return table(
        ("id", "title", "model", "branch", "turns", "in", "out", "cost", "last used"),
        rows,
        right=(4, 5, 6, 7),
    )


def conversations_json(
    summaries: Sequence[Any], previews: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """`convo list --json`: a list of objects (see the CLI's help for the keys)."""
    previews = previews or {}
    return [
        {
            "id": s.id,
            "title": s.title,
            "preview": previews.get(s.id),
            "model": s.model,
            "current_branch": s.current_branch,
            "turn_count": s.turn_count,
            "calls": s.calls,
            "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
            "cost_usd": s.cost_usd,
            "unpriced_calls": s.unpriced_calls,
            "created_at": s.created_at.isoformat(),
            "updated_at": s.updated_at.isoformat(),
        }
        for s in summaries
    ]


def branches_table(
    branches: Sequence[Any],
    current: str,
    depths: Mapping[int, int] | None = None,
) -> str:
    """`convo branches`: `*` marks the checked-out branch; `turns` is the head's path length."""
    depths = depths or {}
    width = id_width(b.head_id for b in branches)
    rows = [
        (
            "*" if b.name == current else " ",
            b.name,
            short(b.head_id, width),
            fmt_int(depths[b.head_id] + 1) if b.head_id in depths else "0",
        )
        for b in branches
    ]
    return table(("", "branch", "head", "turns"), rows, right=(3,))


# -- usage -------------------------------------------------------------------------------------


def fmt_cost(usd: float, unpriced_calls: int = 0) -> str:
    """A cost, "+?" after it when calls with no known price are left out of it: a bare sum
    would read as their cost being nothing."""
    return fmt_usd(usd) + ("+?" if unpriced_calls else "")


def _usage_cells(row: Any, key: str | None = None) -> tuple[str, ...]:
    return (
        key if key is not None else row.key,
        fmt_int(row.calls),
        fmt_int(row.input_tokens),
        fmt_int(row.cache_creation_input_tokens),
        fmt_int(row.cache_read_input_tokens),
        fmt_int(row.output_tokens),
        fmt_cost(row.cost_usd, row.unpriced_calls),
    )


def usage_table(report: Any) -> str:
    """`convo usage`: one row per group and a totals row. `in` is input not read from or
    written to the cache; billed input is in + cache write + cache read."""
    headers = (report.by, "calls", "in", "cache write", "cache read", "out", "cost")
    if not report.rows:
        return f"no API calls recorded\n{table(headers, [])}"
    return table(
        headers,
        [_usage_cells(r) for r in report.rows],
        right=range(1, 7),
        footer=_usage_cells(report.total, "total"),
    )


def cache_savings_line(total: Any) -> str:
    """What prompt caching saved (or cost) against the same calls billed without it."""
    uncached = float(total.uncached_cost_usd or 0.0)
    saved = uncached - float(total.cost_usd or 0.0)
    if uncached <= 0:
        return "prompt cache saved $0.0000 (no priced calls)"
    pct = saved / uncached * 100
    if saved >= 0:
        return (
            f"prompt cache saved {fmt_usd(saved)} ({pct:.0f}% of what these calls would have "
            "cost without it)"
        )
    return (
        f"prompt cache cost {fmt_usd(-saved)} more ({-pct:.0f}% over what these calls would have "
        "cost without it: cache writes outweighed reads)"
    )


def _usage_row_json(row: Any) -> dict[str, Any]:
    return {
        "key": row.key,
        "calls": row.calls,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cache_creation_input_tokens": row.cache_creation_input_tokens,
        "cache_read_input_tokens": row.cache_read_input_tokens,
        "cost_usd": row.cost_usd,
        "uncached_cost_usd": row.uncached_cost_usd,
        "unpriced_calls": row.unpriced_calls,
    }


def usage_json(report: Any) -> dict[str, Any]:
    """`convo usage --json`: {by, rows: [...], total: {...}, cache_saved_usd, unpriced_calls,
    models_without_price}; each row has the keys of `USAGE_CSV_COLUMNS`."""
    return {
        "by": report.by,
        "rows": [_usage_row_json(r) for r in report.rows],
        "total": _usage_row_json(report.total),
        "cache_saved_usd": report.total.uncached_cost_usd - report.total.cost_usd,
        "unpriced_calls": report.unpriced_calls,
        "models_without_price": list(report.models_without_price),
    }


USAGE_CSV_COLUMNS = (
    "key",
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "uncached_cost_usd",
    "unpriced_calls",
)


def usage_csv(report: Any) -> str:
    """`convo usage --csv`: a header row, one row per group, then a row whose key is `total`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_CSV_COLUMNS)
    for row in [*report.rows, report.total]:
        data = _usage_row_json(row)
        writer.writerow([data[c] for c in USAGE_CSV_COLUMNS])
    return out.getvalue().rstrip("\n")


def calls_table(calls: Sequence[Mapping[str, Any]]) -> str:
    """The calls ledger of a conversation, one row per API attempt."""
    rows = [
        (
            str(i + 1),
            c.get("branch") or "",
            c.get("status") or "",
            fmt_int(c.get("input_tokens")),
            fmt_int(c.get("cache_creation_input_tokens")),
            fmt_int(c.get("cache_read_input_tokens")),
            fmt_int(c.get("output_tokens")),
            fmt_usd(c.get("cost_usd")),
        )
        for i, c in enumerate(calls)
    ]
    return table(
        ("call", "branch", "status", "in", "cache write", "cache read", "out", "cost"),
        rows,
        right=(0, 3, 4, 5, 6, 7),
    )


# -- transcripts -------------------------------------------------------------------------------


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line if line else prefix.rstrip() for line in text.split("\n"))


def _conversation_json(info: Any) -> dict[str, Any]:
    return {
        "id": info.id,
        "title": info.title,
        "model": info.model,
        "system": info.system,
        "params": info.params,
        "current_branch": info.current_branch,
        "turn_count": info.turn_count,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


def transcript(
    info: Any,
    branch: str,
    turns: Sequence[Any],
    calls: Mapping[int, Mapping[str, Any]] | None = None,
) -> str:
    """`convo show`: a header, then each turn of the branch with its usage when it is a reply.

    `turns` are the branch path's records (id, role, kind, content, stop_reason), root first;
    `calls` maps a reply turn id to the call that produced it.
    """
    calls = calls or {}
    title = f' "{one_line(info.title, len(info.title))}"' if info.title else ""
    lines = [f"conversation {info.id}{title} · {info.model} · branch {branch}"]
    if info.system:
        system = info.system if isinstance(info.system, str) else content_text(info.system)
        lines.append(f"system: {one_line(system, 100)}")
    if not turns:
        lines.append("(no turns yet)")
    width = id_width(t.id for t in turns)
    for t in turns:
        head = f"{short(t.id, width)} {turn_label(t.role, t.kind)}"
        if t.kind == "reply" and t.stop_reason and t.stop_reason != "end_turn":
            head += f"  [stopped: {t.stop_reason}]"
        lines.append("")
        lines.append(head)
        lines.append(_indent(content_text(t.content)))
        if t.id in calls:
            lines.append(_indent(usage_line(calls[t.id])))
    return "\n".join(lines)


def _call_usage(call: Mapping[str, Any] | None) -> dict[str, int] | None:
    if not call:
        return None
    return {k: int(call.get(k) or 0) for k in USAGE_FIELDS}


def transcript_json(
    info: Any,
    branch: str,
    turns: Sequence[Any],
    calls: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """`convo show --json`:

    {"conversation": {id, title, model, system, params, current_branch, turn_count, created_at,
    updated_at}, "branch": name, "turns": [{id, parent_id, role, kind, content, stop_reason,
    usage: {input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens}
    or null, cost_usd}]}. `content` is the stored block list (images as blob references with
    media_type, size and sha256, never base64); usage and cost are those of the call that
    produced a reply, null for other turns.
    """
    calls = calls or {}
    out = []
    parent: str | None = None
    for t in turns:
        call = calls.get(t.id)
        out.append(
            {
                "id": t.id,
                "parent_id": parent,
                "role": t.role,
                "kind": t.kind,
                "content": t.content,
                "stop_reason": t.stop_reason,
                "usage": _call_usage(call),
                "cost_usd": call.get("cost_usd") if call else None,
            }
        )
        parent = t.id
    return {"conversation": _conversation_json(info), "branch": branch, "turns": out}


# -- the tree ----------------------------------------------------------------------------------


def tree(turns: Sequence[Any], branches: Sequence[Any], current: str) -> str:
    """The whole conversation as a tree, like `git log --graph`, root at the top.

    `turns` are every turn of the conversation (id, parent_id, role, kind, content), parents
    before children. A chain stays in one column; where a turn has several children each one
    opens with `├─` or `└─`. Branch names sit in brackets at their heads, `*` on the current one.
    """
    if not turns:
        return "(no turns yet)"
    children: dict[str | None, list[Any]] = {}
    for t in turns:
        children.setdefault(t.parent_id, []).append(t)
    heads: dict[str, list[str]] = {}
    for b in branches:
        if b.head_id:
            heads.setdefault(b.head_id, []).append(("*" if b.name == current else "") + b.name)
    labels = {t.id: turn_label(t.role, t.kind) for t in turns}
    width = id_width(t.id for t in turns)
    label_width = max(len(v) for v in labels.values())

    lines: list[str] = []
    # (turn, prefix for its line, connector) processed depth first without recursion, so a
    # thread of thousands of turns never hits the interpreter's recursion limit.
    stack: list[tuple[Any, str, str]] = []
    roots = children.get(None, [])
    for i, root in reversed(list(enumerate(roots))):
        if len(roots) == 1:
            stack.append((root, "", ""))
        else:
            stack.append((root, "", "└─ " if i == len(roots) - 1 else "├─ "))
    while stack:
        t, prefix, connector = stack.pop()
        text = one_line(content_text(t.content), PREVIEW_CHARS)
        line = f"{prefix}{connector}{short(t.id, width)} {labels[t.id].ljust(label_width)}  {text}"
        if t.id in heads:
            line += f"  [{', '.join(heads[t.id])}]"
        lines.append(line)
        below = prefix + {"": "", "├─ ": "│  ", "└─ ": "   "}[connector]
        kids = children.get(t.id, [])
        if len(kids) == 1:
            stack.append((kids[0], below, ""))
        else:
            for i, kid in reversed(list(enumerate(kids))):
                stack.append((kid, below, "└─ " if i == len(kids) - 1 else "├─ "))
    return "\n".join(lines)

"""Tool use as a loop, and structured output through a forced tool call.

Every step is persisted as it happens (the reply with its tool_use, then each tool_result), so a
run that crashes resumes from the last stored turn: tool uses that already have a result are
never run again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from convo.errors import HistoryError, InvalidInput, OutputInvalid
from convo.history import manual_thinking
from convo.tools import Tool, json_schema_for
from convo.types import Block, ToolUse

if TYPE_CHECKING:
    from convo.service import Conversation, Reply

DEFAULT_MAX_STEPS = 8
JSON_TOOL_NAME = "record_output"


def run(
    conv: Conversation,
    content: str | list[Block] | None = None,
    *,
    tools: Sequence[Tool],
    max_steps: int = DEFAULT_MAX_STEPS,
    **overrides: Any,
) -> Reply:
    """Send, run the tools Claude asks for, send the results, until it stops asking.

    Returns the last reply; when `max_steps` replies have asked for tools, that reply (with
    stop_reason "tool_use") is returned and its tool uses stay unanswered on the branch.
    A tool that raises becomes an `is_error` result carrying its message.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InvalidInput("max_steps must be an integer of at least 1")
    runnable = _runnable(tools)
    by_name = {t.name: t for t in runnable}
    overrides = {"tools": [t.definition() for t in runnable], **overrides}
    # What the first send writes (images, a prefill) is written once; later sends continue.
    first = {k: overrides.pop(k) for k in ("images", "prefill") if k in overrides}
    if content is None:
        pending = conv.pending_tool_uses()
        if not pending and not first:
            done = conv._stored_reply()
            if done is not None and done.stop_reason not in ("tool_use", "pause_turn"):
                return done  # the run had finished before it was resumed: nothing to send
        _answer(conv, pending, by_name)  # resume a run cut short
    reply = conv.send(content, **first, **overrides)
    for _ in range(max_steps - 1):
        if reply.stop_reason == "pause_turn":
            reply = conv.send(**overrides)
            continue
        pending = conv.pending_tool_uses() if reply.tool_uses else []
        if not pending:
            return reply
        _answer(conv, pending, by_name)
        reply = conv.send(**overrides)
    return reply


def _runnable(tools: Any) -> list[Tool]:
    """Tools that `run` can call: Tool objects, and plain functions made into them (as
    `create(tools=...)` takes them). A dict is a definition only: nothing to call."""
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidInput("tools must be a list of Tool objects or functions")
    out = []
    for t in tools:
        if isinstance(t, Tool):
            out.append(t)
        elif callable(t):
            out.append(Tool.from_function(t))
        else:
            name = t.get("name") if isinstance(t, Mapping) else None
            raise InvalidInput(
                f"run() calls its tools: {name or type(t).__name__!r} is a definition with no "
                "function (give a Tool or a function, or send with tools= and answer it yourself)"
            )
        if out[-1].is_async:
            # (Found out at the first call, each use would be an error the API is paid to read.)
            raise InvalidInput(
                f"tool {out[-1].name!r} is async: run() calls tools synchronously; await "
                "tool.acall(use.input) yourself and answer with add_tool_result"
            )
    return out


def _answer(conv: Conversation, uses: Sequence[ToolUse], by_name: Mapping[str, Tool]) -> None:
    for use in uses:
        tool = by_name.get(use.name)
        if tool is None:
            _result(conv, use.id, f"unknown tool {use.name!r}", is_error=True)
            continue
        try:
            result = tool.call(use.input)
        except Exception as e:  # the model sees the failure and can correct itself
            _result(conv, use.id, f"{type(e).__name__}: {e}", is_error=True)
        else:
            _result(conv, use.id, result if result != "" else "(empty result)")


def _result(conv: Conversation, use_id: str, result: Any, *, is_error: bool = False) -> None:
    """Store a tool's result; one the store refuses (an empty block, a lone surrogate, a
    cache marker) is stored as an error saying why. The tool has run: a resumed run must
    find its answer, not run it again and fail the same way."""
    if is_error:
        result = _storable(result)
    try:
        conv.add_tool_result(use_id, result, is_error=is_error)
    except HistoryError:
        raise  # not the result: the branch moved on
    except InvalidInput as e:
        conv.add_tool_result(use_id, _storable(f"the tool's result could not be stored: {e}"), is_error=True)


def _storable(text: str) -> str:
    """Text any store and the API take: lone surrogates (an OS error's undecodable file name,
    say) escaped, never empty."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if text.strip() else "error"


def send_json(
    conv: Conversation,
    content: str | list[Block],
    schema: type[BaseModel] | Mapping[str, Any],
    *,
    name: str = JSON_TOOL_NAME,
    description: str = "Record the requested output. Always call this tool.",
    **overrides: Any,
) -> Any:
    """Structured output: a forced tool call whose input is the object, validated.

    Returns a model instance for a pydantic schema, a dict for a JSON schema. The stored reply is
    the tool_use turn; a tool_result is stored after it so the thread can go on. Output that
    does not validate raises OutputInvalid (its tool_result is stored as an error).
    """
    for key in ("tools", "tool_choice"):
        if key in overrides:
            raise InvalidInput(f"send_json sets {key} itself: it cannot be given")
    json_schema = json_schema_for(schema)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        _check_json_schema(json_schema)  # before the request is paid for
    definition = {"name": name, "description": description, "input_schema": json_schema}
    thinking = overrides["thinking"] if "thinking" in overrides else conv.settings().get("thinking")
    # The API refuses a forced tool call with extended thinking on: then the model is asked
    # (the tool's description says to always call it), and a reply without the call is
    # OutputInvalid as any other.
    choice = {"type": "auto"} if manual_thinking({"thinking": thinking}) else {"type": "tool", "name": name}
    reply = conv.send(content, tools=[definition], tool_choice=choice, **overrides)
    uses = [u for u in reply.tool_uses if u.name == name]
    if not uses:
        for u in reply.tool_uses:
            conv.add_tool_result(u.id, "not the requested tool", is_error=True)
        raise OutputInvalid(
            f"the reply did not call {name} (stop_reason {reply.stop_reason})",
            errors=["no tool call"],
            output=reply.text,
        )
    use = uses[0]
    for other in reply.tool_uses:
        if other.id != use.id:
            conv.add_tool_result(other.id, "ignored", is_error=True)
    try:
        errors, value = _validate(use.input, schema, json_schema)
    except Exception as e:  # a schema the checks above let through (a $ref inside): answered
        conv.add_tool_result(use.id, "the schema could not be applied", is_error=True)
        raise InvalidInput(f"the schema could not be applied: {type(e).__name__}: {e}".splitlines()[0]) from None
    if errors:
        conv.add_tool_result(use.id, "invalid: " + "; ".join(errors), is_error=True)
        raise OutputInvalid(
            f"structured output does not match the schema: {errors[0]}"
            + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""),
            errors=errors,
            output=use.input,
        )
    conv.add_tool_result(use.id, "Recorded.")
    return value


def _check_json_schema(json_schema: dict[str, Any]) -> None:
    """A JSON schema the validator can apply: valid against its metaschema (a bad type, a
    pattern that is not a regular expression) and able to check an object (references that
    resolve at its top level)."""
    import jsonschema  # type: ignore[import-untyped]

    try:
        jsonschema.Draft202012Validator.check_schema(json_schema)
        for _ in jsonschema.Draft202012Validator(json_schema).iter_errors({}):
            pass
    except jsonschema.SchemaError as e:
        raise InvalidInput(f"not a usable JSON schema: {e.message}".splitlines()[0]) from None
    except Exception as e:  # an unresolvable $ref, a pattern the engine cannot compile
        raise InvalidInput(f"not a usable JSON schema: {type(e).__name__}: {e}".splitlines()[0]) from None


def _validate(
    data: dict[str, Any], schema: Any, json_schema: dict[str, Any]
) -> tuple[list[str], Any]:
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        try:
            return [], schema.model_validate(data)
        except ValidationError as e:
            return [
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in e.errors()
            ], None
    import jsonschema  # type: ignore[import-untyped]

    validator = jsonschema.Draft202012Validator(json_schema)
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    ]
    return errors, (None if errors else data)

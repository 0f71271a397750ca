"""Tools as plain Python functions: schema from the signature, validation by pydantic.

A tool definition the model sees and the function that runs must agree on every parameter; if
they are written separately they drift. :func:`tool` derives the JSON schema from the function's
type hints and docstring, and :meth:`Tool.call` validates the model's input against the same
pydantic model before calling the function, so a malformed ``tool_use`` becomes a clear error for
the model rather than a ``TypeError`` deep inside the tool.

This module is pure: it does not run a tool loop or talk to the API.
"""

from __future__ import annotations

import copy
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, overload

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from convo.content import check_json
from convo.errors import InvalidInput

__all__ = [
    "TOOL_NAME_PATTERN",
    "Tool",
    "ToolResult",
    "json_schema_for",
    "to_tool_result",
    "tool",
    "tool_definition",
]

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ToolResult = str | list[dict[str, Any]]
# Block types a tool_result may contain; a list of these is passed through as content blocks.
_RESULT_BLOCK_TYPES = frozenset({"text", "image", "document", "search_result"})


@dataclass(frozen=True)
class _Param:
    field: str  # the pydantic field name (internal, never clashes with BaseModel attributes)
    name: str  # the Python parameter name, which is also the schema property name
    positional_only: bool


@dataclass(frozen=True, eq=False)
class Tool:
    """A function the model can call, with the definition the API needs to offer it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    fn: Callable[..., Any] = field(repr=False)
    input_model: type[BaseModel] = field(repr=False)
    _params: tuple[_Param, ...] = field(repr=False, default=())

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
    ) -> Tool:
        """Build a Tool from ``fn``; InvalidInput if its name or signature cannot be a tool."""
        tool_name = name if name is not None else getattr(fn, "__name__", "")
        _check_name(tool_name)
        summary, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:  # unresolvable forward references and the like
            raise InvalidInput(
                f"tool {tool_name!r}: cannot read type hints: {_line(exc)}"
            ) from None
        fields_: dict[str, Any] = {}
        params: list[_Param] = []
        for i, p in enumerate(inspect.signature(fn).parameters.values()):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise InvalidInput(f"tool {tool_name!r}: *args / **kwargs cannot be described")
            annotation = hints.get(p.name, Any)
            default = ... if p.default is p.empty else p.default
            extra: dict[str, Any] = {}
            if p.name in arg_docs and not _has_description(annotation):
                extra["description"] = arg_docs[p.name]  # Annotated's own description wins
            fields_[f"p{i}"] = (annotation, Field(default, alias=p.name, **extra))
            params.append(_Param(f"p{i}", p.name, p.kind is p.POSITIONAL_ONLY))
        try:
            model = create_model(
                f"{tool_name}_input", __config__=ConfigDict(extra="forbid"), **fields_
            )
            schema = model.model_json_schema(by_alias=True)
        except Exception as exc:  # a type pydantic cannot validate or describe
            raise InvalidInput(
                f"tool {tool_name!r}: unsupported parameter type: {_line(exc)}"
            ) from None
        schema.pop("title", None)  # the internal model name means nothing to the model
        return cls(
            name=tool_name,
            description=description if description is not None else summary,
            input_schema=schema,
            fn=fn,
            input_model=model,
            _params=tuple(params),
        )

    def definition(self) -> dict[str, Any]:
        """The API's tool definition; ``description`` is left out when empty (it is optional)."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["input_schema"] = copy.deepcopy(self.input_schema)
        return out

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def call(self, input: Mapping[str, Any]) -> ToolResult:
        """Validate ``input`` (a ``tool_use`` block's input) and run the function.

        Raises InvalidInput when the input does not match the schema (report it to the model as
        an ``is_error`` tool_result); exceptions from the function itself propagate unchanged.
        """
        if self.is_async:
            raise InvalidInput(f"tool {self.name!r} is async: use acall()")
        args, kwargs = self._arguments(input)
        return to_tool_result(self.fn(*args, **kwargs))

    async def acall(self, input: Mapping[str, Any]) -> ToolResult:
        """:meth:`call` for both async and sync functions (sync ones run inline)."""
        args, kwargs = self._arguments(input)
        result = self.fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return to_tool_result(result)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function stays directly callable."""
        return self.fn(*args, **kwargs)

    def _arguments(self, input: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        if not isinstance(input, Mapping):
            raise InvalidInput(f"tool {self.name!r}: input must be an object, got {input!r}")
        try:
            validated = self.input_model.model_validate(dict(input))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidInput(f"tool {self.name!r}: invalid input: {problems}") from None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p in self._params:
            value = getattr(validated, p.field)
            if p.positional_only:
                args.append(value)
            else:
                kwargs[p.name] = value
        return args, kwargs


def to_tool_result(value: Any) -> ToolResult:
    """A function's return value as ``tool_result`` content.

    Strings pass through; a list of content blocks (text, image, document, search_result) is
    passed through as blocks; anything else is JSON (pydantic models, dataclasses and dates
    included, other objects by ``str``).
    """
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(b, dict) and b.get("type") in _RESULT_BLOCK_TYPES for b in value)
    ):
        return list(value)
    return pydantic_core.to_json(value, fallback=str).decode("utf-8")


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a function into a :class:`Tool`: ``@tool`` or ``@tool(name=..., description=...)``.

    The description defaults to the docstring's first paragraph; parameter descriptions come
    from ``Annotated[T, Field(description=...)]`` or a Google-style ``Args:`` section.
    Parameters without defaults are required.
    """
    if fn is not None:
        return Tool.from_function(fn, name=name, description=description)

    def decorate(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description)

    return decorate


def tool_definition(obj: Tool | Mapping[str, Any] | Callable[..., Any]) -> dict[str, Any]:
    """The API definition of a Tool, a plain function, or a dict definition (checked, copied).

    Dicts with a ``type`` other than ``custom`` (server tools such as ``web_search_20250305``,
    Anthropic-defined client tools such as ``bash_20250124``) have no ``input_schema``; only
    their name is checked. Raises InvalidInput for anything the API would reject as malformed.
    """
    if isinstance(obj, Tool):
        return obj.definition()
    if isinstance(obj, Mapping):
        check_json(dict(obj), "tool definition")  # (before copying: it bounds the nesting)
        definition = copy.deepcopy(dict(obj))
        _check_name(definition.get("name"))
        if definition.get("type") not in (None, "custom"):
            return definition
        description = definition.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidInput(f"tool {definition['name']!r}: description must be a string")
        _check_object_schema(definition.get("input_schema"), f"tool {definition['name']!r}")
        return definition
    if callable(obj):
        return Tool.from_function(obj).definition()
    raise InvalidInput(f"not a tool: expected a Tool, a function or a dict, got {obj!r}")


def json_schema_for(schema: type[BaseModel] | Mapping[str, Any] | Any) -> dict[str, Any]:
    """A JSON object schema (for structured output) from a pydantic model class or a dict.

    Other types pydantic understands (dataclasses, TypedDicts) work too. The result must
    describe an object; anything else raises InvalidInput.
    """
    if isinstance(schema, Mapping):
        result = copy.deepcopy(dict(schema))
    elif isinstance(schema, type) and issubclass(schema, BaseModel):
        result = schema.model_json_schema()
    else:
        try:
            result = TypeAdapter(schema).json_schema()
        except Exception as exc:
            raise InvalidInput(
                f"cannot build a JSON schema from {schema!r}: {_line(exc)}"
            ) from None
    _check_object_schema(result, "schema")
    return result


def _line(exc: Exception) -> str:
    """The first line of an exception's message: convo's errors are one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
        raise InvalidInput(
            f"invalid tool name {name!r}: use 1-64 letters, digits, '_' or '-'"
        )


def _check_object_schema(schema: Any, what: str) -> None:
    if not isinstance(schema, Mapping):
        raise InvalidInput(f"{what}: input_schema must be a JSON schema object, got {schema!r}")
    if schema.get("type") != "object":
        raise InvalidInput(f"{what}: schema must have \"type\": \"object\"")
    properties = schema.get("properties")
    if properties is not None and not isinstance(properties, Mapping):
        raise InvalidInput(f"{what}: schema \"properties\" must be an object")
    required = schema.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        raise InvalidInput(f"{what}: schema \"required\" must be a list of names")


def _has_description(annotation: Any) -> bool:
    if typing.get_origin(annotation) is not Annotated:
        return False
    return any(isinstance(m, FieldInfo) and m.description for m in annotation.__metadata__)


_ARGS_HEADERS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
_SECTION = re.compile(r"^([A-Za-z][A-Za-z ]{1,30}):\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, and parameter descriptions from a Google-style ``Args:`` section."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    in_args = False
    current: str | None = None
    item_indent: int | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 0 and stripped:
            header = _SECTION.match(stripped)
            in_args = header is not None and header[1].strip().lower() in _ARGS_HEADERS
            current, item_indent = None, None
            continue
        if not in_args or not stripped:
            continue
        if item_indent is None:
            item_indent = indent
        match = _ARG_LINE.match(stripped)
        if indent <= item_indent and match:
            current = match[1]
            args[current] = match[2].strip()
        elif current is not None:
            args[current] = f"{args[current]} {stripped}".strip()
    return " ".join(summary), args

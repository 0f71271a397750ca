# No `from __future__ import annotations` here on purpose: some tools below are defined inside
# test functions with local types, which only string-free annotations can resolve.
import asyncio
import dataclasses
import json
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from convo.errors import InvalidInput
from convo.tools import Tool, json_schema_for, tool, tool_definition


class Address(BaseModel):
    city: str
    zip: str | None = None


@tool
def get_weather(location: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather
    in a given location.

    This second paragraph is not part of the description.

    Args:
        location (str): The city and state,
            e.g. San Francisco, CA.
        unit: Temperature unit.

    Returns:
        A short report.
    """
    return f"{location}: 20 degrees {unit}"


def test_bare_decorator_builds_a_tool() -> None:
    assert isinstance(get_weather, Tool)
    assert get_weather.name == "get_weather"
    assert get_weather.description == "Get the current weather in a given location."
    assert get_weather.definition() == {
        "name": "get_weather",
        "description": "Get the current weather in a given location.",
        "input_schema": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "location": {
                    "type": "string",
                    "title": "Location",
                    "description": "The city and state, e.g. San Francisco, CA.",
                },
                "unit": {
                    "type": "string",
                    "title": "Unit",
                    "enum": ["celsius", "fahrenheit"],
                    "default": "celsius",
                    "description": "Temperature unit.",
                },
            },
            "required": ["location"],
        },
    }


def test_decorated_function_stays_callable() -> None:
    assert get_weather("Paris") == "Paris: 20 degrees celsius"


def test_decorator_with_arguments() -> None:
    @tool(name="weather-v2", description="Custom description.")
    def fn(city: str) -> str:
        """Ignored docstring."""
        return city

    assert fn.definition()["name"] == "weather-v2"
    assert fn.definition()["description"] == "Custom description."
    assert tool()(fn.fn).name == "fn"


def test_schema_from_type_hints() -> None:
    @tool
    def search(
        query: str,
        limit: int = 10,
        threshold: float = 0.5,
        exact: bool = False,
        tags: list[str] = [],  # noqa: B006 - pydantic copies defaults
        mode: Literal["fast", "deep"] = "fast",
        since: str | None = None,
        address: Address | None = None,
        note: Annotated[str, Field(description="From Annotated.")] = "",
    ) -> list[str]:
        """Search.

        Args:
            note: From the docstring, overridden by Annotated.
        """
        return []

    schema = search.input_schema
    props = schema["properties"]
    assert schema["required"] == ["query"]
    assert props["limit"]["type"] == "integer" and props["limit"]["default"] == 10
    assert props["threshold"]["type"] == "number"
    assert props["exact"]["type"] == "boolean"
    assert props["tags"] == {
        "type": "array",
        "items": {"type": "string"},
        "default": [],
        "title": "Tags",
    }
    assert props["mode"]["enum"] == ["fast", "deep"]
    assert {"type": "null"} in props["since"]["anyOf"]
    assert schema["$defs"]["Address"]["required"] == ["city"]
    assert props["note"]["description"] == "From Annotated."
    assert "title" not in schema
    json.dumps(schema)  # serialisable


def test_parameter_names_that_shadow_basemodel_attributes() -> None:
    @tool
    def odd(json: str, schema: int, model_config: bool, p0: str, copy: str = "c") -> str:
        """Odd names."""
        return f"{json}{schema}{model_config}{p0}{copy}"

    assert set(odd.input_schema["properties"]) == {"json", "schema", "model_config", "p0", "copy"}
    assert odd.call({"json": "j", "schema": 1, "model_config": True, "p0": "x"}) == "j1Truexc"


def test_call_validates_and_returns_str() -> None:
    result = get_weather.call({"location": "Oslo", "unit": "fahrenheit"})
    assert result == "Oslo: 20 degrees fahrenheit"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({}, "location: Field required"),
        ({"location": "x", "unit": "kelvin"}, "unit:"),
        ({"location": "x", "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"location": 5}, "location: Input should be a valid string"),
    ],
)
def test_call_rejects_bad_input(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        get_weather.call(bad)
    assert message in str(info.value)
    assert "get_weather" in str(info.value)
    assert "\n" not in str(info.value)


def test_call_rejects_non_object_input() -> None:
    with pytest.raises(InvalidInput, match="must be an object"):
        get_weather.call(["Paris"])  # type: ignore[arg-type]


def test_call_passes_pydantic_models_and_encodes_results() -> None:
    @tool
    def ship(address: Address, count: int = 1) -> dict[str, Any]:
        """Ship."""
        assert isinstance(address, Address)
        return {"city": address.city, "count": count, "ok": True}

    result = ship.call({"address": {"city": "Rome"}, "count": "3"})
    assert json.loads(result) == {"city": "Rome", "count": 3, "ok": True}  # type: ignore[arg-type]


@dataclasses.dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "42"),
        (None, "null"),
        ([1, 2], "[1,2]"),
        (Point(1, 2), '{"x":1,"y":2}'),
        (Address(city="Nice"), '{"city":"Nice","zip":null}'),
        ("plain", "plain"),
        ({"é": "ü"}, '{"é":"ü"}'),
    ],
)
def test_non_str_results_are_json(value: Any, expected: str) -> None:
    @tool
    def fn() -> Any:
        """Return a value."""
        return value

    assert fn.call({}) == expected


def test_block_results_pass_through() -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "see image"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
    ]

    @tool
    def fn() -> list[dict[str, Any]]:
        """Blocks."""
        return blocks

    assert fn.call({}) == blocks
    # A list of records that merely has a "type" key is data, not content blocks.

    @tool
    def records() -> list[dict[str, Any]]:
        """Records."""
        return [{"type": "user", "name": "a"}]

    assert records.call({}) == '[{"type":"user","name":"a"}]'


def test_tool_exceptions_propagate() -> None:
    @tool
    def boom() -> str:
        """Fails."""
        raise RuntimeError("kaput")

    with pytest.raises(RuntimeError, match="kaput"):
        boom.call({})


def test_positional_only_parameters() -> None:
    @tool
    def pos(a: int, /, b: int) -> int:
        """Subtract."""
        return a - b

    assert pos.call({"a": 5, "b": 2}) == "3"


def test_async_tools() -> None:
    @tool
    async def fetch(url: str) -> str:
        """Fetch a URL."""
        return f"got {url}"

    assert fetch.is_async
    assert asyncio.run(fetch.acall({"url": "u"})) == "got u"
    assert asyncio.run(get_weather.acall({"location": "Lima"})) == "Lima: 20 degrees celsius"
    with pytest.raises(InvalidInput, match="acall"):
        fetch.call({"url": "u"})


def test_missing_docstring_and_hints() -> None:
    @tool
    def bare(x, y=2):  # type: ignore[no-untyped-def]
        return x

    assert bare.description == ""
    assert "description" not in bare.definition()
    assert bare.input_schema["required"] == ["x"]
    assert bare.call({"x": [1]}) == "[1]"


def test_docstring_starting_with_args_has_no_description() -> None:
    @tool
    def f(a: int) -> int:
        """Args:
        a: The number.
        """
        return a

    assert f.description == ""


@pytest.mark.parametrize("name", ["has space", "", "x" * 65, "dot.name"])
def test_invalid_tool_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid tool name"):
        tool(name=name)(lambda: None)


def test_lambda_without_name_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="invalid tool name"):
        tool(lambda: None)


def test_var_args_are_rejected() -> None:
    def f(*args: int) -> None:
        """Varargs."""

    with pytest.raises(InvalidInput, match=r"\*args"):
        tool(f)


def test_unsupported_parameter_type() -> None:
    class Opaque:
        pass

    def f(x: Opaque) -> None:
        """Opaque."""

    with pytest.raises(InvalidInput, match="unsupported parameter type") as info:
        tool(f)
    assert "\n" not in str(info.value)


def test_definition_is_a_copy() -> None:
    d = get_weather.definition()
    d["input_schema"]["properties"].clear()
    assert get_weather.definition()["input_schema"]["properties"]


# tool_definition


def test_tool_definition_accepts_tools_functions_and_dicts() -> None:
    assert tool_definition(get_weather) == get_weather.definition()

    def plain(a: int) -> int:
        """Plain function."""
        return a

    assert tool_definition(plain)["description"] == "Plain function."
    raw: dict[str, Any] = {
        "name": "calc",
        "description": "Calculate.",
        "input_schema": {
            "type": "object",
            "properties": {"x": {"type": "number"}},
            "required": ["x"],
        },
        "cache_control": {"type": "ephemeral"},
    }
    out = tool_definition(raw)
    assert out == raw and out is not raw
    out["input_schema"]["properties"].clear()
    assert raw["input_schema"]["properties"]  # deep copy


def test_tool_definition_passes_server_tools() -> None:
    server = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    assert tool_definition(server) == server


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"input_schema": {"type": "object"}}, "invalid tool name"),
        ({"name": "bad name", "input_schema": {"type": "object"}}, "invalid tool name"),
        ({"name": "x" * 65, "input_schema": {"type": "object"}}, "invalid tool name"),
        ({"name": "t"}, "input_schema must be a JSON schema object"),
        ({"name": "t", "input_schema": {"type": "string"}}, '"type": "object"'),
        ({"name": "t", "input_schema": {"type": "object", "properties": []}}, "properties"),
        ({"name": "t", "input_schema": {"type": "object", "required": "x"}}, "required"),
        ({"name": "t", "description": 3, "input_schema": {"type": "object"}}, "description"),
        ({"type": "custom", "name": "t", "input_schema": None}, "input_schema"),
    ],
)
def test_tool_definition_rejects_bad_dicts(definition: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        tool_definition(definition)


def test_tool_definition_rejects_other_objects() -> None:
    with pytest.raises(InvalidInput, match="not a tool"):
        tool_definition(42)  # type: ignore[arg-type]


# json_schema_for


class Answer(BaseModel):
    answer: str
    confidence: float = Field(ge=0, le=1)


class Movie(TypedDict):
    title: str
    year: int


def test_json_schema_for_models_dicts_and_typeddicts() -> None:
    schema = json_schema_for(Answer)
    assert schema["type"] == "object"
    assert schema["required"] == ["answer", "confidence"]
    raw = {"type": "object", "properties": {"a": {"type": "string"}}}
    out = json_schema_for(raw)
    assert out == raw and out is not raw
    assert json_schema_for(Movie)["required"] == ["title", "year"]


@pytest.mark.parametrize("bad", [{"type": "array"}, {}, int, list[str]])
def test_json_schema_for_requires_an_object(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        json_schema_for(bad)


def test_json_schema_for_unknown_type() -> None:
    class Opaque:
        pass

    with pytest.raises(InvalidInput, match="cannot build a JSON schema"):
        json_schema_for(Opaque)

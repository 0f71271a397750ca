from __future__ import annotations

import json
from pathlib import Path

import pytest

from convo.errors import ConfigError
from convo.pricing import DEFAULT_PRICES, Price, PriceTable, load_prices
from convo.types import Usage


@pytest.fixture
def table() -> PriceTable:
    return PriceTable.default()


def test_price_defaults_follow_input_price() -> None:
    p = Price(input=3, output=15)
    assert (p.cache_write_5m, p.cache_write_1h, p.cache_read) == pytest.approx((3.75, 6.0, 0.3))
    explicit = Price(input=3, output=15, cache_write_5m=4, cache_write_1h=7, cache_read=0.5)
    assert (explicit.cache_write_5m, explicit.cache_write_1h, explicit.cache_read) == (4, 7, 0.5)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "3", True])
def test_price_rejects_bad_numbers(bad: object) -> None:
    with pytest.raises(ConfigError):
        Price(input=bad, output=15)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "inp", "out"),
    [
        ("claude-opus-4-8", 5, 25),
        ("claude-opus-4-7", 5, 25),
        ("claude-opus-4-6", 5, 25),
        ("claude-opus-4-5-20251101", 5, 25),
        ("claude-opus-4-1-20250805", 15, 75),
        ("claude-opus-4-20250514", 15, 75),
        ("claude-opus-4-0", 15, 75),
        ("claude-sonnet-4-6", 3, 15),
        ("claude-sonnet-4-5-20250929", 3, 15),
        ("claude-sonnet-4-20250514", 3, 15),
        ("claude-3-7-sonnet-20250219", 3, 15),
        ("claude-3-7-sonnet-latest", 3, 15),
        ("claude-haiku-4-5", 1, 5),
        ("claude-haiku-4-5-20251001", 1, 5),
        ("claude-3-5-haiku-20241022", 0.80, 4),
        ("claude-3-5-haiku-latest", 0.80, 4),
        ("claude-3-haiku-20240307", 0.25, 1.25),
        # provider spellings
        ("anthropic.claude-3-5-haiku-20241022-v1:0", 0.80, 4),
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", 3, 15),
        ("claude-sonnet-4-5@20250929", 3, 15),
        ("anthropic/claude-sonnet-4.5", 3, 15),
        ("CLAUDE-SONNET-4-5", 3, 15),
    ],
)
def test_lookup_matches_model_spellings(
    table: PriceTable, model: str, inp: float, out: float
) -> None:
    price = table.lookup(model)
    assert price is not None, model
    assert (price.input, price.output) == (inp, out)


@pytest.mark.parametrize(
    "model", ["gpt-4o", "claude-opus-4-9", "claude-sonnet-5", "claude-3-opus-2024", "", "claude"]
)
def test_unknown_model_is_none_not_an_error(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None
    assert table.cost(model, Usage(input_tokens=10)) is None
    assert table.uncached_cost(model, Usage(input_tokens=10)) is None


def test_cost_hand_computed(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=1000,
        output_tokens=500,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=10000,
    )
    # 1000*3e-6 + 500*15e-6 + 2000*3.75e-6 + 10000*0.3e-6 = 0.003+0.0075+0.0075+0.003
    assert table.cost("claude-sonnet-4-5", usage) == pytest.approx(0.021)
    assert table.cost("claude-sonnet-4-5-20250929", usage) == pytest.approx(0.021)
    # Every cached token as plain input: 13000*3e-6 + 500*15e-6 = 0.039 + 0.0075
    assert table.uncached_cost("claude-sonnet-4-5", usage) == pytest.approx(0.0465)


def test_cost_uses_the_1h_split(table: PriceTable) -> None:
    usage = Usage(
        input_tokens=100,
        output_tokens=10,
        cache_creation_input_tokens=3000,
        cache_creation_5m_input_tokens=1000,
        cache_creation_1h_input_tokens=2000,
    )
    # opus 4.5: 100*5 + 10*25 + 1000*6.25 + 2000*10 = 500+250+6250+20000 = 27000 per 1e6
    assert table.cost("claude-opus-4-5", usage) == pytest.approx(0.027)


def test_cost_split_remainder_is_priced_as_5m(table: PriceTable) -> None:
    # Only the 1h count reported: the other 1000 writes are 5-minute ones.
    usage = Usage(cache_creation_input_tokens=3000, cache_creation_1h_input_tokens=2000)
    # haiku 4.5: 1000*1.25 + 2000*2 = 5250 per 1e6
    assert table.cost("claude-haiku-4-5", usage) == pytest.approx(0.00525)


def test_cost_from_api_usage(table: PriceTable) -> None:
    usage = Usage.from_api(
        {
            "input_tokens": 10,
            "output_tokens": 20,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100},
        }
    )
    # haiku 3: 10*0.25 + 20*1.25 + 100*0.5 + 1000*0.025 = 2.5+25+50+25 = 102.5 per 1e6
    assert table.cost("claude-3-haiku-20240307", usage) == pytest.approx(102.5e-6)


def test_cost_of_empty_usage_is_zero(table: PriceTable) -> None:
    assert table.cost("claude-haiku-4-5", Usage()) == 0.0


def test_cache_savings(table: PriceTable) -> None:
    usage = Usage(input_tokens=10, cache_read_input_tokens=100_000)
    cost = table.cost("claude-opus-4-6", usage)
    uncached = table.uncached_cost("claude-opus-4-6", usage)
    assert cost is not None and uncached is not None
    assert uncached - cost == pytest.approx(100_000 * 5e-6 * 0.9)


def test_with_overrides_returns_a_new_table(table: PriceTable) -> None:
    custom = table.with_overrides(
        {"claude-sonnet-4-5": {"input": 2, "output": 10}, "my-proxy": Price(1, 2)}
    )
    assert custom.lookup("claude-sonnet-4-5-20250929") == Price(2, 10)
    assert custom.lookup("my-proxy") == Price(1, 2)
    assert table.lookup("claude-sonnet-4-5") == Price(3, 15)
    assert table.lookup("my-proxy") is None


def test_dated_override_covers_only_that_snapshot(table: PriceTable) -> None:
    custom = table.with_overrides({"claude-sonnet-4-5-20250929": {"input": 9, "output": 9}})
    assert custom.lookup("claude-sonnet-4-5-20250929") == Price(9, 9)
    assert custom.lookup("claude-sonnet-4-5") == Price(3, 15)


@pytest.mark.parametrize("key", ["Claude-Sonnet-4-5", "claude-sonnet-4.5", " claude-sonnet-4-5 ",
                                 "anthropic/claude-sonnet-4.5"])
def test_an_override_in_another_spelling_replaces_the_default(table: PriceTable, key: str) -> None:
    """It was kept beside the default entry, which every lookup found first."""
    custom = table.with_overrides({key: {"input": 2, "output": 10}})
    assert custom.lookup(key) == Price(2, 10)  # the id as the override wrote it, too
    if "/" not in key:  # (a provider's own id prices that provider's spelling only)
        for model in ("claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "Claude-Sonnet-4.5"):
            assert custom.lookup(model) == Price(2, 10), model


def test_default_table_is_not_mutated() -> None:
    PriceTable.default().with_overrides({"x": {"input": 1, "output": 1}})
    assert "x" not in DEFAULT_PRICES
    assert "x" not in PriceTable.default().prices


def _write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(content, encoding="utf-8")
    return path


def test_load_prices_without_file_is_default() -> None:
    assert load_prices(env={}).prices == PriceTable.default().prices


def test_load_prices_from_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        json.dumps(
            {
                "claude-haiku-4-5": {"input": 2, "output": 8, "cache_read": 0.5},
                "local-model": {"input": 0, "output": 0},
            }
        ),
    )
    table = load_prices(path, env={})
    price = table.lookup("claude-haiku-4-5-20251001")
    assert price == Price(2, 8, cache_write_5m=2.5, cache_write_1h=4, cache_read=0.5)
    assert table.cost("local-model", Usage(input_tokens=10**6)) == 0.0
    assert table.lookup("claude-opus-4-5") == Price(5, 25)  # the rest stays


def test_load_prices_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, '{"claude-opus-4-5": {"input": 4, "output": 20}}')
    assert load_prices(env={"CONVO_PRICES": str(path)}).lookup("claude-opus-4-5") == Price(4, 20)
    monkeypatch.setenv("CONVO_PRICES", str(path))
    assert load_prices().lookup("claude-opus-4-5") == Price(4, 20)
    # An explicit path wins over the variable.
    other = tmp_path / "other.json"
    other.write_text('{"claude-opus-4-5": {"input": 1, "output": 2}}', encoding="utf-8")
    assert load_prices(other).lookup("claude-opus-4-5") == Price(1, 2)


def test_empty_env_variable_means_no_file() -> None:
    assert load_prices(env={"CONVO_PRICES": ""}).lookup("claude-opus-4-5") == Price(5, 25)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"m": 3}', "model 'm'"),
        ('{"m": {"input": 1}}', "missing price field(s) 'output'"),
        ('{"m": {"input": 1, "output": "x"}}', "output must be a number"),
        ('{"m": {"input": -1, "output": 1}}', "input must be a finite number >= 0"),
        ('{"m": {"input": 1, "output": 1, "cache_wrte_5m": 2}}', "unknown price field"),
    ],
)
def test_malformed_file_raises_config_error(tmp_path: Path, content: str, problem: str) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_prices(path, env={})
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert "\n" not in message


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_prices(env={"CONVO_PRICES": str(path)})
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)

"""What a call cost in USD, from one table of per-model prices that is easy to update.

Prices change more often than code ships, so the table is plain data (:data:`DEFAULT_PRICES`),
looked up by model family rather than by exact id (a new dated snapshot of a known model is
priced without a release), and overridable from a JSON file (:func:`load_prices`). A model
convo cannot price gets ``None``, never an exception and never a guess: a wrong cost is worse
than a missing one when a budget depends on it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from convo.capabilities import lookup_model
from convo.errors import ConfigError
from convo.types import Usage

__all__ = [
    "CACHE_READ_MULTIPLIER",
    "CACHE_WRITE_1H_MULTIPLIER",
    "CACHE_WRITE_5M_MULTIPLIER",
    "DEFAULT_PRICES",
    "PRICES_ENV",
    "Price",
    "PriceTable",
    "load_prices",
]

PRICES_ENV = "CONVO_PRICES"
CACHE_WRITE_5M_MULTIPLIER = 1.25
CACHE_WRITE_1H_MULTIPLIER = 2.0
CACHE_READ_MULTIPLIER = 0.1
_PER_TOKEN = 1e-6  # prices are quoted per million tokens


@dataclass(frozen=True)
class Price:
    """USD per million tokens. Cache prices left as None follow the input price.

    After construction every field is a float: 5-minute writes 1.25x input, 1-hour writes 2x,
    reads 0.1x (the multipliers the API has used for every model so far).
    """

    input: float
    output: float
    cache_write_5m: float | None = None
    cache_write_1h: float | None = None
    cache_read: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"price {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"price {f.name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        defaults = {
            "cache_write_5m": CACHE_WRITE_5M_MULTIPLIER,
            "cache_write_1h": CACHE_WRITE_1H_MULTIPLIER,
            "cache_read": CACHE_READ_MULTIPLIER,
        }
        for name, multiplier in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.input * multiplier)

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any]) -> Price:
        """Build from ``{"input": 3, "output": 15, "cache_read": 0.3, ...}``; ConfigError if bad."""
        if not isinstance(entry, Mapping):
            raise ConfigError(f"expected an object with input and output prices, got {entry!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ConfigError(
                f"unknown price field(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(f.name for f in fields(cls))}"
            )
        missing = [name for name in ("input", "output") if name not in entry]
        if missing:
            raise ConfigError(f"missing price field(s) {', '.join(map(repr, missing))}")
        return cls(**entry)


def _p(input: float, output: float) -> Price:
    return Price(input=input, output=output)


# USD per million tokens, standard (non-batch) API prices as of late 2026. Keys are undated ids;
# lookups also match dated snapshots, "-latest" aliases and provider spellings.
DEFAULT_PRICES: Mapping[str, Price] = {
    "claude-opus-4-8": _p(5, 25),
    "claude-opus-4-7": _p(5, 25),
    "claude-opus-4-6": _p(5, 25),
    "claude-opus-4-5": _p(5, 25),
    "claude-opus-4-1": _p(15, 75),
    "claude-opus-4": _p(15, 75),
    "claude-sonnet-4-6": _p(3, 15),
    "claude-sonnet-4-5": _p(3, 15),
    "claude-sonnet-4": _p(3, 15),
    "claude-3-7-sonnet": _p(3, 15),
    "claude-haiku-4-5": _p(1, 5),
    "claude-3-5-haiku": _p(0.80, 4),
    "claude-3-haiku": _p(0.25, 1.25),
}


class PriceTable:
    """Prices by model id. Immutable: :meth:`with_overrides` returns a new table."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices: dict[str, Price] = dict(prices)

    @classmethod
    def default(cls) -> PriceTable:
        return cls(DEFAULT_PRICES)

    @property
    def prices(self) -> Mapping[str, Price]:
        return dict(self._prices)

    def with_overrides(self, overrides: Mapping[str, Price | Mapping[str, Any]]) -> PriceTable:
        """A copy with ``overrides`` added; an entry replaces the one with the same id.

        Entries are :class:`Price` objects or mappings like ``{"input": 3, "output": 15}``. An
        override keyed by an undated id also covers its dated snapshots, while one keyed by a
        dated id covers that snapshot only.
        """
        merged = dict(self._prices)
        for model, entry in overrides.items():
            if not isinstance(model, str) or not model.strip():
                raise ConfigError(f"price override key must be a model id, got {model!r}")
            price = entry if isinstance(entry, Price) else Price.from_mapping(entry)
            # As written, and under the spelling the table uses (lowercase, "4-5" for "4.5"):
            # an override written "Claude-Sonnet-4.5" sat beside the default entry, which
            # lookups found first, and was silently ignored.
            merged[model.strip()] = price
            merged[re.sub(r"(?<=\d)\.(?=\d)", "-", model.strip().lower())] = price
        return PriceTable(merged)

    def lookup(self, model: str) -> Price | None:
        """The price of ``model``: exact id first, then its undated and alternate spellings."""
        return lookup_model(model, self._prices)

    def cost(self, model: str, usage: Usage) -> float | None:
        """USD billed for one call with ``usage``, or None if the model's price is unknown.

        Cache writes use the 5-minute / 1-hour split when the API reported one; any writes the
        split does not account for (or all of them, without a split) are priced as 5-minute ones.
        """
        price = self.lookup(model)
        if price is None:
            return None
        writes = usage.cache_creation_input_tokens
        w1h = usage.cache_creation_1h_input_tokens or 0
        w5m = max(writes - w1h, usage.cache_creation_5m_input_tokens or 0)
        total = (
            usage.input_tokens * price.input
            + usage.output_tokens * price.output
            + w5m * _f(price.cache_write_5m)
            + w1h * _f(price.cache_write_1h)
            + usage.cache_read_input_tokens * _f(price.cache_read)
        )
        return total * _PER_TOKEN

    def uncached_cost(self, model: str, usage: Usage) -> float | None:
        """What the same call would have cost with every cached token billed as plain input.

        ``uncached_cost - cost`` is what caching saved (negative when writes outweighed reads).
        """
        price = self.lookup(model)
        if price is None:
            return None
        return (usage.total_input_tokens * price.input + usage.output_tokens * price.output) * (
            _PER_TOKEN
        )


def _f(value: float | None) -> float:
    # Price.__post_init__ fills every None; this only narrows the type.
    return 0.0 if value is None else value


def load_prices(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> PriceTable:
    """The default table plus overrides from a JSON file, if one is named.

    The file is ``path`` or else the one named by ``$CONVO_PRICES``; its form is
    ``{"model-id": {"input": 3, "output": 15, "cache_write_5m": 3.75, ...}}`` in USD per million
    tokens. Any problem with the file raises :class:`ConfigError` with a one-line message naming
    the file, because a silently ignored price file would make every cost figure wrong.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(PRICES_ENV) or None
    table = PriceTable.default()
    if path is None:
        return table
    where = f"price file {str(path)!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where}: invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected an object of model ids to prices, got {type(data).__name__}"
        )
    overrides: dict[str, Price] = {}
    for model, entry in data.items():
        try:
            if not isinstance(entry, dict):
                raise ConfigError(f"expected an object, got {type(entry).__name__}")
            overrides[model] = Price.from_mapping(entry)
        except ConfigError as exc:
            raise ConfigError(f"{where}: model {model!r}: {exc}") from None
    return table.with_overrides(overrides)

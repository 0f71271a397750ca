"""What each model accepts, as small tables that callers can override.

The API does not tell a client up front which features a model supports; it answers with a 400
after the request is built and paid for in latency. convo asks these functions *before* sending,
so a history that ends in an assistant prefill can be refused locally with a clear message.

Model ids come in several spellings (``claude-sonnet-4-5``, ``claude-sonnet-4-5-20250929``,
``claude-3-5-haiku-latest``, ``anthropic.claude-3-5-sonnet-20241022-v2:0``,
``claude-sonnet-4-5@20250929``); :func:`parse_model` reduces them to family and version so the
rules below are written once. :mod:`convo.pricing` uses the same parser for its lookups.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from convo.errors import ConfigError

__all__ = [
    "DEFAULT_CONTEXT_WINDOW",
    "DEFAULT_MIN_CACHEABLE_TOKENS",
    "PREFILL_OVERRIDE_ENV",
    "ModelId",
    "context_window",
    "min_cacheable_tokens",
    "lookup_model",
    "model_candidates",
    "parse_model",
    "prefill_overrides_from_env",
    "supports_prefill",
]

PREFILL_OVERRIDE_ENV = "CONVO_PREFILL_MODELS"
DEFAULT_CONTEXT_WINDOW = 200_000
DEFAULT_MIN_CACHEABLE_TOKENS = 1024

_V = TypeVar("_V")

_KNOWN_FAMILIES = frozenset({"opus", "sonnet", "haiku"})
# Versions released before prefill was dropped (4.6). 4.2-4.4 never existed: a name claiming one
# is unknown, and unknown models are assumed to behave like the newest ones.
_PREFILL_VERSIONS_4 = frozenset({0, 1, 5})

_PROVIDER_PREFIX = re.compile(r"^(?:.*[./])?(?=claude)")  # "us.anthropic.", "anthropic/"
_PROVIDER_SUFFIX = re.compile(r"[@:].*$")  # Vertex "@20250929", Bedrock ":0", ":thinking"
_REVISION_SUFFIX = re.compile(r"-v\d+$")  # Bedrock "-v2"
_DATE_SUFFIX = re.compile(r"-(?:\d{8}|latest)$")
_NEW_STYLE = re.compile(r"^claude-([a-z]+)-(\d+)(?:-(\d{1,2}))?$")  # claude-sonnet-4-5
_OLD_STYLE = re.compile(r"^claude-(\d+)(?:-(\d{1,2}))?-([a-z]+)$")  # claude-3-5-haiku


@dataclass(frozen=True)
class ModelId:
    """A model id reduced to what the rules need. ``minor`` is 0 for "claude-opus-4"."""

    family: str
    major: int
    minor: int
    dated: str  # the normalised id, date or "-latest" kept: "claude-3-5-haiku-20241022"

    @property
    def version(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def known_family(self) -> bool:
        return self.family in _KNOWN_FAMILIES

    def names(self) -> list[str]:
        """The undated spellings of this model, current naming first, then Claude 3's."""
        ver = f"{self.major}-{self.minor}" if self.minor else f"{self.major}"
        return [f"claude-{self.family}-{ver}", f"claude-{ver}-{self.family}"]


def _normalise(model: str) -> str:
    name = model.strip().lower()
    name = _PROVIDER_PREFIX.sub("", name, count=1)
    name = _REVISION_SUFFIX.sub("", _PROVIDER_SUFFIX.sub("", name))
    return re.sub(r"(?<=\d)\.(?=\d)", "-", name)  # "claude-sonnet-4.5"


def parse_model(model: str) -> ModelId | None:
    """Family and version of a Claude model id in any common spelling; None if not recognisable."""
    dated = _normalise(model)
    base = _DATE_SUFFIX.sub("", dated)
    if m := _NEW_STYLE.match(base):
        return ModelId(m[1], int(m[2]), int(m[3] or 0), dated)
    if m := _OLD_STYLE.match(base):
        return ModelId(m[3], int(m[1]), int(m[2] or 0), dated)
    return None


def model_candidates(model: str) -> list[str]:
    """Keys to try, most specific first, when looking ``model`` up in a table keyed by id.

    The exact id wins (so a table can single out one snapshot), then the normalised id with its
    date, then the undated base, then both naming schemes of the family and version.
    """
    out = [model, model.strip().lower()]
    dated = _normalise(model)
    out += [dated, _DATE_SUFFIX.sub("", dated)]
    if parsed := parse_model(model):
        out += parsed.names()
    return list(dict.fromkeys(out))


def lookup_model(model: str, table: Mapping[str, _V] | None) -> _V | None:
    """The entry of ``table`` for ``model``, or None.

    Tries :func:`model_candidates` in order, comparing keys case-insensitively, so one table entry
    such as ``claude-sonnet-4-5`` covers its dated snapshots and provider spellings.
    """
    if table:
        if model in table:  # the usual case, before any candidate is worked out
            return table[model]
        lowered = {k.strip().lower(): v for k, v in table.items()}
        for key in model_candidates(model):
            if key in table:
                return table[key]
            if key in lowered:
                return lowered[key]
    return None


def supports_prefill(model: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """Whether ``model`` continues a final assistant message (prefill) instead of rejecting it.

    Claude 4.6 and every later model answer a prefill with a 400, so they get False; so does any
    name convo cannot place (a new model is far likelier to behave like the newest than the
    oldest). True only for names that look like Claude 3.x, or the 4, 4.1 and 4.5 releases of a
    known family. ``overrides`` (see :func:`prefill_overrides_from_env`) win over the rules.
    Extended thinking forbids prefill on every model; that is the caller's check, not this one.
    """
    found = lookup_model(model, overrides)
    if found is not None:
        return bool(found)
    parsed = parse_model(model)
    if parsed is None or not parsed.known_family:
        return False
    if parsed.major <= 3:
        return True
    return parsed.major == 4 and parsed.minor in _PREFILL_VERSIONS_4


_TRUE = frozenset({"1", "true", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "no", "n", "off"})


def prefill_overrides_from_env(env: Mapping[str, str] | None = None) -> dict[str, bool]:
    """Parse ``CONVO_PREFILL_MODELS="my-model=yes,other=no"`` into ``{"my-model": True, ...}``.

    The escape hatch for a model convo's rules get wrong (a proxy's custom name, a new release).
    Empty items are ignored; anything else that is not ``name=yes|no|true|false|1|0|on|off``
    raises :class:`ConfigError`, since silently ignoring a typo would send a doomed request.
    """
    env = os.environ if env is None else env
    raw = env.get(PREFILL_OVERRIDE_ENV, "")
    result: dict[str, bool] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not name:
            raise ConfigError(f"{PREFILL_OVERRIDE_ENV}: {item!r} is not of the form model=yes|no")
        if value in _TRUE:
            result[name] = True
        elif value in _FALSE:
            result[name] = False
        else:
            raise ConfigError(
                f"{PREFILL_OVERRIDE_ENV}: {item!r}: expected yes or no after '=', got {value!r}"
            )
    return result


def min_cacheable_tokens(model: str, overrides: Mapping[str, int] | None = None) -> int:
    """The shortest prefix the API will cache for ``model``; shorter ones are silently uncached.

    From the prompt-caching docs as read in 2026: 4096 for Opus 4.5 and later and for Haiku 4.5,
    2048 for Haiku 3 and 3.5, 1024 otherwise. These figures have moved between releases and
    third-party reports disagree for some models (2048 has been observed for Sonnet 4.6 and
    reported for Opus 4.7), so treat the value as a hint for diagnostics ("why no cache hit?"),
    never as a reason to refuse a request; pass ``overrides`` to correct it.
    """
    found = lookup_model(model, overrides)
    if found is not None:
        return int(found)
    parsed = parse_model(model)
    if parsed is None:
        return DEFAULT_MIN_CACHEABLE_TOKENS
    if parsed.family == "haiku":
        if parsed.major <= 3:
            return 2048
        if parsed.version >= (4, 5):
            return 4096
    if parsed.family == "opus" and parsed.version >= (4, 5):
        return 4096
    return DEFAULT_MIN_CACHEABLE_TOKENS


def context_window(model: str, overrides: Mapping[str, int] | None = None) -> int:
    """Input tokens ``model`` accepts: 200,000 for every current Claude model by default.

    Larger windows (1M-token betas) depend on account and headers, not the model name, so they
    come in through ``overrides`` rather than being guessed here.
    """
    found = lookup_model(model, overrides)
    if found is not None:
        return int(found)
    return DEFAULT_CONTEXT_WINDOW

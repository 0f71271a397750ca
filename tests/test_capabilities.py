from __future__ import annotations

import pytest

from convo.capabilities import (
    PREFILL_OVERRIDE_ENV,
    context_window,
    min_cacheable_tokens,
    model_candidates,
    parse_model,
    prefill_overrides_from_env,
    supports_prefill,
)
from convo.errors import ConfigError


@pytest.mark.parametrize(
    ("model", "family", "version"),
    [
        ("claude-sonnet-4-5-20250929", "sonnet", (4, 5)),
        ("claude-opus-4-20250514", "opus", (4, 0)),
        ("claude-opus-4-0", "opus", (4, 0)),
        ("claude-3-5-haiku-20241022", "haiku", (3, 5)),
        ("claude-3-haiku-20240307", "haiku", (3, 0)),
        ("claude-3-7-sonnet-latest", "sonnet", (3, 7)),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "sonnet", (3, 5)),
        ("claude-3-5-sonnet-v2@20241022", "sonnet", (3, 5)),
        ("anthropic/claude-opus-4.6", "opus", (4, 6)),
        ("claude-opus-5", "opus", (5, 0)),
    ],
)
def test_parse_model(model: str, family: str, version: tuple[int, int]) -> None:
    parsed = parse_model(model)
    assert parsed is not None
    assert (parsed.family, parsed.version) == (family, version)


@pytest.mark.parametrize("model", ["gpt-4o", "claude", "claude-2.1", "my-model", ""])
def test_parse_model_unrecognised(model: str) -> None:
    assert parse_model(model) is None


def test_candidates_go_from_exact_to_family() -> None:
    assert model_candidates("claude-3-5-haiku-20241022") == [
        "claude-3-5-haiku-20241022",
        "claude-3-5-haiku",
        "claude-haiku-3-5",
    ]


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-4-6",
        "claude-opus-4-7",
        "claude-opus-4-8",
        "claude-sonnet-4-6",
        "claude-sonnet-4-6-20260101",
        "claude-haiku-4-6",
        "claude-sonnet-4-10",
        "claude-opus-5",
        "claude-sonnet-5-1-20270101",
        "claude-6-opus",
        "anthropic.claude-opus-4-6-v1:0",
        # unknown names: assume the newest behaviour
        "my-model",
        "gpt-4o",
        "claude-newname-4-5",
        "claude-sonnet-4-3",
    ],
)
def test_prefill_rejected_by_new_and_unknown_models(model: str) -> None:
    assert supports_prefill(model) is False


@pytest.mark.parametrize(
    "model",
    [
        "claude-3-haiku-20240307",
        "claude-3-opus-20240229",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-haiku-latest",
        "claude-3-7-sonnet-20250219",
        "claude-opus-4-20250514",
        "claude-sonnet-4-0",
        "claude-opus-4-1",
        "claude-opus-4-1-20250805",
        "claude-opus-4-5",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5",
        "claude-haiku-4-5-20251001",
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
    ],
)
def test_prefill_accepted_by_older_models(model: str) -> None:
    assert supports_prefill(model) is True


def test_prefill_overrides_win() -> None:
    overrides = {"my-model": True, "claude-sonnet-4-5": False}
    assert supports_prefill("my-model", overrides) is True
    assert supports_prefill("claude-sonnet-4-5-20250929", overrides) is False
    assert supports_prefill("claude-opus-4-6", {"claude-opus-4-6": True}) is True
    assert supports_prefill("claude-opus-4-1", overrides) is True  # not overridden


def test_prefill_overrides_from_env() -> None:
    env = {PREFILL_OVERRIDE_ENV: " my-model=yes, other=NO,third=true,fourth=0,, "}
    assert prefill_overrides_from_env(env) == {
        "my-model": True,
        "other": False,
        "third": True,
        "fourth": False,
    }
    assert prefill_overrides_from_env({}) == {}
    assert prefill_overrides_from_env({PREFILL_OVERRIDE_ENV: ""}) == {}


def test_prefill_overrides_default_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFILL_OVERRIDE_ENV, "proxy-model=yes")
    assert prefill_overrides_from_env() == {"proxy-model": True}


@pytest.mark.parametrize("raw", ["my-model", "=yes", "my-model=maybe", "a=yes,b"])
def test_bad_prefill_override_entries(raw: str) -> None:
    with pytest.raises(ConfigError, match=PREFILL_OVERRIDE_ENV):
        prefill_overrides_from_env({PREFILL_OVERRIDE_ENV: raw})


@pytest.mark.parametrize(
    ("model", "tokens"),
    [
        ("claude-sonnet-4-5-20250929", 1024),
        ("claude-sonnet-4-6", 1024),
        ("claude-opus-4-1", 1024),
        ("claude-3-7-sonnet-latest", 1024),
        ("claude-3-haiku-20240307", 2048),
        ("claude-3-5-haiku-20241022", 2048),
        ("claude-haiku-4-5-20251001", 4096),
        ("claude-opus-4-5", 4096),
        ("claude-opus-4-8", 4096),
        ("something-else", 1024),
    ],
)
def test_min_cacheable_tokens(model: str, tokens: int) -> None:
    assert min_cacheable_tokens(model) == tokens


def test_min_cacheable_tokens_override() -> None:
    assert min_cacheable_tokens("claude-sonnet-4-6-20260101", {"claude-sonnet-4-6": 2048}) == 2048


def test_context_window() -> None:
    assert context_window("claude-sonnet-4-5") == 200_000
    assert context_window("anything") == 200_000
    assert context_window("claude-sonnet-4-5-20250929", {"claude-sonnet-4-5": 1_000_000}) == (
        1_000_000
    )

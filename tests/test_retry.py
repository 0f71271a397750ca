"""convo.retry: the SDK's retry contract, rule by rule, with a fake clock (nothing sleeps)."""

from __future__ import annotations

import email.utils
from collections.abc import Callable

import pytest

from convo.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    MissingApiKey,
    api_error_for,
)
from convo.retry import RetryPolicy, parse_retry_after, run_with_retries

POLICY = RetryPolicy()


def http_error(status: int, headers: dict[str, str] | None = None) -> APIStatusError:
    return api_error_for(status, None, "boom", headers=headers)


def stream_error(error_type: str) -> APIStatusError:
    return api_error_for(None, error_type, "boom")


def test_defaults_match_the_sdk() -> None:
    assert (POLICY.max_retries, POLICY.initial_delay, POLICY.max_delay) == (2, 0.5, 8.0)


# -- should_retry ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529, 599])
def test_retryable_statuses(status: int) -> None:
    assert POLICY.should_retry(http_error(status))


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 413, 422])
def test_other_statuses_are_not_retried(status: int) -> None:
    assert not POLICY.should_retry(http_error(status))


def test_x_should_retry_true_overrides_status() -> None:
    assert POLICY.should_retry(http_error(400, {"x-should-retry": "true"}))


def test_x_should_retry_false_overrides_status() -> None:
    assert not POLICY.should_retry(http_error(529, {"X-Should-Retry": "false"}))
    assert not POLICY.should_retry(http_error(429, {"x-should-retry": "false"}))


def test_x_should_retry_other_values_fall_back_to_status() -> None:
    assert POLICY.should_retry(http_error(503, {"x-should-retry": "maybe"}))
    assert not POLICY.should_retry(http_error(400, {"x-should-retry": ""}))


def test_connection_errors_and_timeouts_are_retried() -> None:
    assert POLICY.should_retry(APIConnectionError("reset"))
    assert POLICY.should_retry(APITimeoutError("slow"))


@pytest.mark.parametrize(
    "error_type", ["overloaded_error", "api_error", "rate_limit_error", "timeout_error"]
)
def test_transient_stream_errors_are_retried(error_type: str) -> None:
    error = stream_error(error_type)
    assert error.status_code is None
    assert POLICY.should_retry(error)


@pytest.mark.parametrize(
    "error_type", ["invalid_request_error", "authentication_error", "billing_error", "new_error"]
)
def test_other_stream_errors_are_not_retried(error_type: str) -> None:
    assert not POLICY.should_retry(api_error_for(None, error_type, "no"))


def test_plain_api_errors_are_not_retried() -> None:
    assert not POLICY.should_retry(APIError("malformed answer"))


# -- parse_retry_after -------------------------------------------------------------------


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5


def test_retry_after_seconds_integer_and_float() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"Retry-After": "0.25"}) == 0.25


def test_unparsable_retry_after_ms_falls_back_to_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0


def test_retry_after_http_date_is_relative_to_now() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == pytest.approx(-30.0)


def test_missing_or_garbage_retry_after_is_none() -> None:
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "whenever"}) is None
    assert parse_retry_after({"retry-after": ""}) is None


# -- delay -------------------------------------------------------------------------------


def test_server_wait_is_used_when_between_0_and_60_seconds() -> None:
    assert POLICY.delay(0, http_error(429, {"retry-after-ms": "1234"}), 0.9) == 1.234
    assert POLICY.delay(1, http_error(429, {"retry-after": "60"}), 0.9) == 60.0
    assert POLICY.delay(1, http_error(529, {"retry-after": "0.01"}), 0.0) == 0.01


@pytest.mark.parametrize("seconds", ["0", "-5", "61", "3600", "nan", "inf"])
def test_server_wait_out_of_range_falls_back_to_backoff(seconds: str) -> None:
    assert POLICY.delay(0, http_error(429, {"retry-after": seconds}), 0.0) == 0.5
    ms = str(float(seconds) * 1000)
    assert POLICY.delay(0, http_error(429, {"retry-after-ms": ms}), 0.0) == 0.5


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [POLICY.delay(n, None, 0.0) for n in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert POLICY.delay(10_000, None, 0.0) == 8.0


def test_jitter_takes_up_to_a_quarter_off() -> None:
    assert POLICY.delay(0, None, 0.5) == pytest.approx(0.5 * 0.875)
    assert POLICY.delay(2, None, 0.999) == pytest.approx(2 * (1 - 0.25 * 0.999))
    assert POLICY.delay(2, APIConnectionError("x"), 1.0) == 1.5


def test_custom_policy_bounds() -> None:
    policy = RetryPolicy(max_retries=5, initial_delay=1.0, max_delay=3.0)
    assert [policy.delay(n, None, 0.0) for n in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_policy_is_frozen() -> None:
    with pytest.raises(AttributeError):
        POLICY.max_retries = 9  # type: ignore[misc]


# -- run_with_retries --------------------------------------------------------------------


class Script:
    """An attempt function that raises the scripted errors, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.attempts: list[int] = []

    def __call__(self, n: int) -> str:
        self.attempts.append(n)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def run(script: Callable[[int], str], policy: RetryPolicy = POLICY) -> tuple[str, list[float]]:
    slept: list[float] = []
    return run_with_retries(script, policy, sleep=slept.append, rand=lambda: 0.0), slept


def test_success_first_time_never_sleeps() -> None:
    script = Script()
    assert run(script) == ("ok", [])
    assert script.attempts == [0]


def test_retries_then_succeeds_with_backoff() -> None:
    script = Script(http_error(529), APIConnectionError("reset"))
    assert run(script) == ("ok", [0.5, 1.0])
    assert script.attempts == [0, 1, 2]


def test_server_wait_is_slept() -> None:
    script = Script(
        http_error(429, {"retry-after": "7"}), http_error(429, {"retry-after-ms": "250"})
    )
    assert run(script) == ("ok", [7.0, 0.25])


def test_exhaustion_reraises_the_last_error() -> None:
    last = http_error(503)
    script = Script(http_error(529), http_error(500), last, http_error(500))
    slept: list[float] = []
    with pytest.raises(APIStatusError) as info:
        run_with_retries(script, POLICY, sleep=slept.append, rand=lambda: 0.0)
    assert info.value is last
    assert script.attempts == [0, 1, 2]
    assert slept == [0.5, 1.0]


def test_non_retryable_error_is_raised_at_once() -> None:
    bad = http_error(400)
    script = Script(http_error(529), bad)
    slept: list[float] = []
    with pytest.raises(APIStatusError) as info:
        run_with_retries(script, POLICY, sleep=slept.append, rand=lambda: 0.0)
    assert info.value is bad
    assert slept == [0.5]


def test_non_api_errors_propagate_without_retry() -> None:
    script = Script(MissingApiKey())
    with pytest.raises(MissingApiKey):
        run(script)
    assert script.attempts == [0]


def test_zero_retries_means_one_attempt() -> None:
    script = Script(http_error(529))
    with pytest.raises(APIStatusError):
        run(script, RetryPolicy(max_retries=0))
    assert script.attempts == [0]


def test_mid_stream_overload_is_retried() -> None:
    script = Script(stream_error("overloaded_error"))
    assert run(script) == ("ok", [0.5])


def test_rand_is_drawn_per_retry_and_on_retry_is_told() -> None:
    draws = iter([0.0, 1.0])
    told: list[tuple[APIError, float]] = []
    slept: list[float] = []
    first, second = APIConnectionError("a"), APIConnectionError("b")
    result = run_with_retries(
        Script(first, second),
        POLICY,
        sleep=slept.append,
        rand=lambda: next(draws),
        on_retry=lambda error, wait: told.append((error, wait)),
    )
    assert result == "ok"
    assert slept == [0.5, 0.75]
    assert told == [(first, 0.5), (second, 0.75)]


def test_raised_error_has_no_chained_context_from_earlier_attempts() -> None:
    last = http_error(400)
    with pytest.raises(APIStatusError) as info:
        run(Script(http_error(529), last))
    assert info.value.__context__ is None

"""Pushing to the Hub: which failures are retried, with what waits, and when it gives up."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub.errors import HfHubHTTPError

from trainjob.publish import is_retryable, with_retries


def http_error(status: int) -> HfHubHTTPError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/api/models/x/commit/main"))
    return HfHubHTTPError(f"{status} error", response=response)


class Flaky:
    """Fails with the given errors in turn, then succeeds."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "pushed"


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_server_trouble_is_retried(status):
    assert is_retryable(http_error(status))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_caller_mistakes_are_not_retried(status):
    assert not is_retryable(http_error(status))


def test_dropped_connections_are_retried():
    assert is_retryable(httpx.ConnectError("connection refused"))
    assert is_retryable(httpx.ReadTimeout("timed out"))
    assert not is_retryable(ValueError("bad repo id"))


def test_backoff_doubles_up_to_the_cap_then_succeeds():
    waits = []
    action = Flaky(http_error(503), http_error(504), httpx.ConnectError("reset"), http_error(500))
    assert with_retries(action, "pushing", attempts=6, first_delay=2, max_delay=5, sleep=waits.append) == "pushed"
    assert action.calls == 5
    assert waits == [2, 4, 5, 5]


def test_gives_up_after_the_last_attempt_with_the_real_error():
    waits = []
    action = Flaky(*[http_error(503)] * 10)
    with pytest.raises(HfHubHTTPError, match="503"):
        with_retries(action, "pushing", attempts=3, first_delay=1, sleep=waits.append)
    assert action.calls == 3 and waits == [1, 2]


def test_a_wrong_token_fails_at_once():
    waits = []
    action = Flaky(http_error(401))
    with pytest.raises(HfHubHTTPError, match="401"):
        with_retries(action, "pushing", sleep=waits.append)
    assert action.calls == 1 and waits == []

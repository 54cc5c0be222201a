"""Transient storage errors are retried with backoff; anything else fails at once."""

from __future__ import annotations

import errno

import pytest

from medray.platform.storage import is_transient, retry_transient


class EndpointConnectionError(Exception):  # botocore's name, as s3fs raises it
    pass


def test_transient_errors_are_recognised_through_their_causes():
    assert is_transient(ConnectionRefusedError())
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert is_transient(TimeoutError())
    wrapped = OSError("s3 failed")
    wrapped.__cause__ = EndpointConnectionError("could not connect")
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("bad"))


def test_retry_waits_for_the_store_then_returns(monkeypatch):
    monkeypatch.setattr("medray.platform.storage.time.sleep", lambda s: None)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError()
        return "ok"

    assert retry_transient(flaky, budget_s=60) == "ok" and len(calls) == 4


def test_retry_gives_up_after_its_budget_and_never_retries_other_errors(monkeypatch):
    monkeypatch.setattr("medray.platform.storage.time.sleep", lambda s: None)
    with pytest.raises(ConnectionRefusedError):
        retry_transient(lambda: (_ for _ in ()).throw(ConnectionRefusedError()), budget_s=0)
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        retry_transient(missing, budget_s=60)
    assert len(calls) == 1

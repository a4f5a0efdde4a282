"""The token endpoint's answers, against the fake service: what is retried, when, and what is
a configuration error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from daemon.backoff import retry_after_s
from daemon.config import AssemblyAIConfig
from daemon.errors import ConfigError
from daemon.tokens import RETRY_AFTER_MAX_S, TokenError, TokenProvider
from tests.fake_assemblyai import FakeAssemblyAI


@pytest.fixture
async def fake() -> AsyncIterator[FakeAssemblyAI]:
    async with FakeAssemblyAI({}) as server:
        yield server


async def mint(fake: FakeAssemblyAI) -> str:
    config = AssemblyAIConfig(api_key=fake.api_key, token_url=fake.token_url,
                              streaming_url=fake.streaming_url, max_session_seconds=60)
    async with httpx.AsyncClient() as client:
        return await TokenProvider(config, client).fresh()


@pytest.mark.parametrize(("header", "expected"), [
    ("7", 7.0), ("0", 0.0), ("-30", 0.0), ("nan", None), ("inf", None), ("1e400", None),
    ("86400", RETRY_AFTER_MAX_S), ("soon", None), ("", None),
])
async def test_retry_after_is_a_finite_bounded_delay(fake: FakeAssemblyAI, header: str,
                                                     expected: float | None) -> None:
    """"nan" or "inf" are no delay (the backoff applies); a day is capped (it would stall
    transcription); the caller keeps its backoff as a floor, so "0" is no tight loop."""
    fake.faults.token_status = [429]
    fake.faults.token_retry_after = header
    with pytest.raises(TokenError) as info:
        await mint(fake)
    assert info.value.retry_after == expected
    assert not info.value.rejected


def test_retry_after_as_a_date() -> None:
    """An HTTP date counts from now; one in the past is 0."""
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=90), usegmt=True)
    assert 80 < (retry_after_s(later, 300) or 0) <= 90
    assert retry_after_s(earlier, 300) == 0.0


async def test_400_from_the_service_is_a_config_error(fake: FakeAssemblyAI) -> None:
    """The service's own 400 (its JSON error) refuses our parameters: exit 78, not a retry."""
    fake.faults.token_status = [400]
    with pytest.raises(ConfigError, match="token_expires_in / max_session_seconds"):
        await mint(fake)


async def test_400_from_something_else_is_transient(fake: FakeAssemblyAI) -> None:
    """A proxy's HTML 400 says nothing about our settings: retried, not exit 78."""
    fake.faults.token_status = [400]
    fake.faults.token_raw_body = "<html><body>Bad Request</body></html>"
    with pytest.raises(TokenError, match="answered 400"):
        await mint(fake)
    assert await mint(fake)                 # the next request is answered


async def test_403_from_the_service_rejects_the_key(fake: FakeAssemblyAI) -> None:
    """The service's own 403 (its JSON error) refuses the key: it counts toward exit 77."""
    fake.faults.token_status = [403]
    with pytest.raises(TokenError, match="rejected the API key") as info:
        await mint(fake)
    assert info.value.rejected


async def test_403_from_something_else_is_transient(fake: FakeAssemblyAI) -> None:
    """A CDN's or firewall's HTML 403 says nothing about the key: retried, never exit 77 (a
    daemon that systemd does not restart, on a key that works)."""
    fake.faults.token_status = [403]
    fake.faults.token_raw_body = "<html><body>Access denied</body></html>"
    with pytest.raises(TokenError, match=r"answered 403 \(Forbidden\) without the service's "
                                         r"error body \(.*text/html.*\): a proxy, firewall"):
        await mint(fake)
    assert await mint(fake)                 # the next request is answered

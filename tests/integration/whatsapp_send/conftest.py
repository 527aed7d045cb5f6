"""The fake providers, a stand-in for the hub and a pooled client session, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from estafeta.connectors.http import new_client_session
from estafeta.testing.fakes import FakeMeta, FakeSendPulse, FakeTwilio, FakeZApi
from estafeta.testing.sink import Sink
from tests.integration.whatsapp_send.support import SP, TW, WA, WEBHOOK_TOKEN, ZA


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    shared = new_client_session()
    yield shared
    await shared.close()


@pytest.fixture
async def meta() -> AsyncIterator[FakeMeta]:
    async with FakeMeta(
        access_token=WA["access_token"],
        phone_number_id=WA["phone_number_id"],
        app_secret=WA["app_secret"],
    ) as fake:
        yield fake


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(
        account_sid=TW["account_sid"], auth_token=TW["auth_token"], sender=TW["from"]
    ) as fake:
        yield fake


@pytest.fixture
async def zapi() -> AsyncIterator[FakeZApi]:
    async with FakeZApi(**ZA, webhook_token=WEBHOOK_TOKEN) as fake:
        yield fake


@pytest.fixture
async def sendpulse() -> AsyncIterator[FakeSendPulse]:
    async with FakeSendPulse(
        client_id=SP["client_id"],
        client_secret=SP["client_secret"],
        bot_id=SP["bot_id"],
        webhook_token=WEBHOOK_TOKEN,
    ) as fake:
        yield fake


@pytest.fixture
async def hub() -> AsyncIterator[Sink]:
    """Stands in for the hub's ingress: records the status webhooks as they arrive."""
    sink = Sink()
    await sink.start()
    yield sink
    await sink.stop()

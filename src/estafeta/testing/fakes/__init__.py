"""Fake WhatsApp provider servers for tests: real aiohttp servers on 127.0.0.1.

One per provider kind of DESIGN §3.2, each implementing the documented send endpoint,
its credential checks, request validation and error bodies, planned misbehaviour
(`fail_next`, `throttle_next`, `reject_next`, `slow`), and the provider's status webhooks
(`send_status`), signed as the provider signs them (contracts §1–§3, §9).
"""

from estafeta.testing.fakes.base import FakeProvider, SentMessage, StatusWebhook, WebhookFailure
from estafeta.testing.fakes.meta import FakeMeta
from estafeta.testing.fakes.sendpulse import FakeSendPulse
from estafeta.testing.fakes.twilio import FakeTwilio
from estafeta.testing.fakes.zapi import FakeZApi

__all__ = [
    "FakeMeta",
    "FakeProvider",
    "FakeSendPulse",
    "FakeTwilio",
    "FakeZApi",
    "SentMessage",
    "StatusWebhook",
    "WebhookFailure",
]

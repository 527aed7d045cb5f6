"""The seam between the delivery worker and the systems it delivers to.

A connector turns one leased delivery into one attempt and reports an `Outcome`; it never
raises for a failure of the destination (that is an outcome), only for a bug.
"""

from __future__ import annotations

from typing import Protocol

from estafeta.delivery.model import LeasedDelivery
from estafeta.delivery.outcome import Outcome


class Connector(Protocol):
    async def deliver(self, delivery: LeasedDelivery) -> Outcome: ...

    async def close(self) -> None: ...

"""How the sandbox answers where the provider's documentation is silent.

The documentation shows one `/send` answer and one `/balance` answer; the bulk, logs,
pricing and account bodies, timestamps' zone and how strictly parameters are checked are
left open. The sandbox does NOT copy the client's guesses there: a `Shape` (one of
`VARIANTS`, `sandbox.variant` in the config) picks an answer, so the client is tested
against each reading a real provider might have made.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, tzinfo

from bridge.config import SANDBOX_VARIANTS


@dataclass(frozen=True)
class Shape:
    """How the sandbox answers where the documentation does not say."""

    numbers: str = "e164"  # e164 | plain (digits only, no +) in /logs and bulk answers
    log_keys: str = "documented"  # documented | other (phone, sms, state, created)
    send_answer: str = "id"  # id | no-id (success and cost, no message id)
    bulk_answer: str = "ids"  # ids | batch (a batch id only) | count (a count and cost)
    timezone: str = "UTC"  # the zone of its timestamps and of schedule_time
    times: str = "text"  # text (`Y-m-d H:i:s` in its zone) | epoch (seconds, a number) in /logs
    created_status: int = 200  # 200 | 201 for an accepted send
    strict: bool = False  # refuse past/unpadded schedule_time, `to` without +, unknown
    # fields, and a send the balance does not cover

    @property
    def zone(self) -> tzinfo:
        return UTC if self.timezone == "UTC" else zoneinfo.ZoneInfo(self.timezone)


VARIANTS: dict[str, Shape] = {
    "documented": Shape(),
    "plain-numbers": Shape(numbers="plain"),
    "other-keys": Shape(numbers="plain", log_keys="other"),
    "batch-only": Shape(bulk_answer="batch", send_answer="no-id"),
    "count-only": Shape(bulk_answer="count", send_answer="no-id"),
    "local-time": Shape(timezone="Asia/Beirut"),
    "epoch-time": Shape(times="epoch"),
    "created-201": Shape(created_status=201),
    "strict": Shape(strict=True),
    # The stand-in of issue 17: count-only answers, other keys, numbers without +.
    "stand-in": Shape(numbers="plain", log_keys="other", bulk_answer="count", send_answer="no-id"),
}
# Config validates `sandbox.variant` from its own list, so that config (below the
# provider) never imports the sandbox; the two lists must name the same shapes.
if set(VARIANTS) != set(SANDBOX_VARIANTS):
    raise RuntimeError("bridge.config.SANDBOX_VARIANTS and VARIANTS disagree")

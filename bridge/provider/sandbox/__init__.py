"""The sandbox provider: the SMS provider's v1 API served for real, on loopback, from memory.

`serve` runs it in-process when `provider.base_url` is empty, `sms-bridge sandbox` runs
it standalone, and the tests send to it. It keeps the provider's documented behaviour
(its published v1 API reference) and, where the documentation is silent, answers in one of several
shapes rather than the way the client guesses. It is an independent oracle: parts,
prices and number checks come from its own tables, never from the bridge's `text`,
`phone` or `pricing` modules (tests/test_imports.py holds that), so a bug there
disagrees with it instead of agreeing with itself.

    app.py         the Starlette app: the guard (key, rate window, faults), the controls
    api.py         the endpoints: send, send-bulk, balance, logs, pricing, calculate, account
    validation.py  the documented parameter checks (and the strict shape's extra ones)
    state.py       the account, the SMS taken and their delivery states, the requests seen
    faults.py      scripted misbehaviour queued through /_sandbox/faults
    shapes.py      answer shapes where the documentation is silent (`sandbox.variant`)
    billing.py     its own GSM 03.38 tables, part counts and prices per country

The production composition root imports this package only when the sandbox is
configured (no `provider.base_url`), so its fault-injection endpoints are not loaded
into a bridge that talks to the real provider.
"""

from __future__ import annotations

from bridge.provider.sandbox.app import create_sandbox_app
from bridge.provider.sandbox.billing import sms_parts
from bridge.provider.sandbox.faults import Fault
from bridge.provider.sandbox.shapes import VARIANTS, Shape
from bridge.provider.sandbox.state import (
    RequestRecord,
    SandboxState,
    SentEntry,
    state_from_config,
)

__all__ = [
    "VARIANTS",
    "Fault",
    "RequestRecord",
    "SandboxState",
    "SentEntry",
    "Shape",
    "create_sandbox_app",
    "sms_parts",
    "state_from_config",
]

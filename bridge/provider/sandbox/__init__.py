"""The sandbox provider: the SMS provider's v1 API served for real, on loopback, from memory.

A package so that its concerns (routes, state, faults, answer shapes, its own price and
part-count tables) each have a module; importers use the names re-exported here.
"""

from __future__ import annotations

from bridge.provider.sandbox.app import (
    VARIANTS,
    Fault,
    RequestRecord,
    SandboxState,
    SentEntry,
    Shape,
    create_sandbox_app,
    sms_parts,
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

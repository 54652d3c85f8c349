from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState, create_sandbox_app
from tests.helpers import served


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox_state(clock: ManualClock) -> SandboxState:
    return SandboxState(clock=clock, api_key="test-key")


@pytest.fixture
async def sandbox_url(sandbox_state: SandboxState) -> AsyncIterator[str]:
    """The sandbox provider served for real on a loopback port."""
    async with served(create_sandbox_app(sandbox_state)) as url:
        yield url

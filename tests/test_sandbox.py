"""The sandbox provider keeps the documented behaviour of the real one."""

from __future__ import annotations

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState

KEY = {"X-API-Key": "test-key"}


async def test_rate_window_slides_and_says_when_to_retry(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        for _ in range(60):
            assert (await http.get("/balance")).status_code == 200
        clock.advance(30)
        for _ in range(40):
            assert (await http.get("/balance")).status_code == 200
        limited = await http.get("/balance")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "30"
        assert limited.json() == {"success": False, "message": "Too many requests."}
        clock.advance(30)  # the first 60 leave the window; the later 40 stay
        for _ in range(60):
            assert (await http.get("/balance")).status_code == 200
        assert (await http.get("/balance")).status_code == 429


async def test_validation_and_balance(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        assert (await http.post("/send", json={"message": "x"})).status_code == 400
        assert (await http.post("/send", json={"to": "+12025550143"})).status_code == 400
        bad_type = await http.post(
            "/send", json={"to": "+12025550143", "message": "x", "message_type": 3}
        )
        assert bad_type.status_code == 400 and "message type" in bad_type.json()["message"]
        too_many = await http.post(
            "/send-bulk",
            json={"recipients": [f"+1202{5000000 + i:07d}" for i in range(1001)], "message": "x"},
        )
        assert too_many.status_code == 400
        assert (await http.get("/balance", headers={"X-API-Key": "nope"})).status_code == 401
        assert (await http.get("/logs", params={"per_page": 101})).status_code == 400
        # A 2-part Unicode text to the UK at 0.8 a part.
        sent = await http.post(
            "/send", json={"to": "+447911123456", "message": "é☃" * 40, "message_type": 2}
        )
        assert sent.json()["data"]["cost"] == pytest.approx(1.6)
        assert (await http.get("/balance")).json()["data"]["balance"] == pytest.approx(998.4)


async def test_logs_move_pending_sent_delivered_and_filter(
    clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.fail_share = 0.5
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        numbers = [f"+1202{5000000 + i:07d}" for i in range(40)]
        await http.post("/send-bulk", json={"recipients": numbers, "message": "x"})
        later = "2030-01-01 00:00:00"
        await http.post(
            "/send", json={"to": "+12025550143", "message": "later", "schedule_time": later}
        )

        async def statuses() -> list[str]:
            body = (await http.get("/logs", params={"per_page": 100})).json()
            return [e["status"] for e in body["data"]]

        assert set(await statuses()) == {"pending"}
        clock.advance(1.5)
        assert set((await statuses())[1:]) == {"sent"}
        clock.advance(5)
        final = await statuses()
        assert final[0] == "pending"  # scheduled for 2030
        assert set(final[1:]) == {"delivered", "failed"}
        failed = (await http.get("/logs", params={"status": "failed", "per_page": 100})).json()
        assert {e["status"] for e in failed["data"]} == {"failed"}
        page = (await http.get("/logs", params={"per_page": 10, "page": 5})).json()
        assert page["pagination"]["last_page"] == 5 and len(page["data"]) == 1
        bad = await http.post(
            "/send", json={"to": "+12025550143", "message": "x", "schedule_time": "soon"}
        )
        assert bad.status_code == 400

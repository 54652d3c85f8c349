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


# What the provider bills, written out from the provider's API reference ("Message types and length")
# rather than from the sandbox's tables: type 1 is GSM 03.38, 160 septets in one SMS and
# 153 per part, extension characters two septets; types 2 and 4 count UTF-16 units, 70
# then 67; a type 1 text with a character outside GSM 03.38 counts as UCS-2.
# The GSM 03.38 basic set beyond A-Z, a-z, 0-9 and ASCII punctuation (3GPP TS 23.038
# 6.2.1): written out here, so a character lost from the sandbox's table makes a text UCS-2.
GSM_NOT_ASCII = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà"
BILLED_PARTS = [
    ("a" * 160, 1, 1),
    ("a" * 161, 1, 2),
    ("a" * 306, 1, 2),
    ("a" * 307, 1, 3),
    ("€" * 80, 1, 1),  # 160 septets
    ("€" * 81, 1, 2),
    ("{" * 76 + "a" * 9, 1, 2),  # 161 septets in 85 characters
    ((GSM_NOT_ASCII * 4)[:160], 1, 1),  # one septet each: a lost one makes it UCS-2
    ((GSM_NOT_ASCII * 4)[:161], 1, 2),
    ("é" * 70, 2, 1),  # a GSM character sent as Unicode counts as Unicode
    ("é" * 71, 2, 2),
    ("ł" * 70, 1, 1),  # outside GSM 03.38: UCS-2 whatever the type says
    ("ł" * 71, 1, 2),
    ("ł" * 134, 1, 2),
    ("ł" * 135, 1, 3),
    ("مرحبا" * 14, 4, 1),  # Arabic type: counted as UCS-2
    ("مرحبا" * 15, 4, 2),
    ("😀" * 35, 2, 1),  # each a surrogate pair: two units
    ("😀" * 36, 2, 2),
]
# The sandbox's price per part by country (its /pricing), and anything else.
PRICES = {"+12025550143": 0.5, "+447911123456": 0.8, "+33612345678": 0.9}
PRICES |= {"+4915123456789": 0.9, "+96171123456": 1.5, "+971501234567": 1.2}
PRICES |= {"+81312345678": 1.0}  # Japan is not priced: the default


@pytest.mark.parametrize(("text", "message_type", "parts"), BILLED_PARTS)
async def test_the_sandbox_bills_the_documented_parts(
    text: str, message_type: int, parts: int, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        answer = await http.post(
            "/send", json={"to": "+81312345678", "message": text, "message_type": message_type}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["cost"] == pytest.approx(parts * 1.0)
        logged = (await http.get("/logs")).json()["data"][0]
        assert logged["parts"] == parts
        if message_type == 1 or text[0] in "ł😀":  # the calculator picks the type itself
            calculated = await http.post("/calculate", json={"to": "+81312345678", "message": text})
            assert calculated.json()["data"]["parts"] == parts


async def test_the_sandbox_prices_each_country_from_its_own_list(
    sandbox_state: SandboxState, sandbox_url: str
) -> None:
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/api/v1", headers=KEY) as http:
        for number, price in PRICES.items():
            answer = await http.post("/send", json={"to": number, "message": "a" * 161})
            assert answer.json()["data"]["cost"] == pytest.approx(2 * price), number
        everyone = await http.post(
            "/calculate", json={"recipients": list(PRICES), "message": "€" * 81}
        )
        assert everyone.json()["data"]["cost"] == pytest.approx(2 * sum(PRICES.values()))
        listed = (await http.get("/pricing")).json()["data"]
    assert listed["default"] == 1.0
    assert {c["country_code"]: c["price"] for c in listed["countries"]} == {
        "+1": 0.5,
        "+33": 0.9,
        "+44": 0.8,
        "+49": 0.9,
        "+961": 1.5,
        "+971": 1.2,
    }
    assert sandbox_state.balance == pytest.approx(1000 - 2 * sum(PRICES.values()))


async def test_a_fault_held_by_the_test_cannot_come_over_http(
    sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`hold` is an in-process event: posted as JSON it is refused (400, not a 500 at
    the next request), and nothing is queued."""
    async with httpx.AsyncClient(base_url=sandbox_url) as http:
        answer = await http.post("/_sandbox/faults", json={"status": 400, "hold": True})
        assert answer.status_code == 400 and "hold" in answer.json()["error"]
        assert (await http.post("/_sandbox/faults", json={"status": 503})).status_code == 200
    assert [f.status for f in sandbox_state.faults] == [503]

"""Cancelling many waiting messages at once, through the real listener with httpx: the
API's `POST /api/v1/messages/cancel` (the console's "Cancel all" as a script's call, the
same store operation), who a token-less bridge records as having cancelled, and the
console's POSTs written with a trailing slash.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.ingress.http import bulk
from bridge.models import NewMessage, State
from tests.helpers import bridge_config, running_bridge
from tests.stores import seed
from tests.test_console import ADMIN, READER, SENDER, TOKENS, csrf_of, sign_in

CANCEL = "/api/v1/messages/cancel"
PHONE, OTHER = "+12025550144", "+12025550145"
QUEUED = NewMessage(PHONE, "disk full on nas-1", "http", "SMS", 1, 1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def states(bridge, ids: list[int]) -> list[State]:
    return [(await bridge.store.get(i)).state for i in ids]


async def test_the_api_cancels_a_phones_waiting_messages_with_the_admin_scope(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str
) -> None:
    """The console could cancel a phone's queued storm at once; a script could only
    cancel a message at a time. `POST /api/v1/messages/cancel` takes the console's
    filter (the phone, as a number in any spacing) and `state`: 401 without a token, 403
    with a read or send one, nothing changed; with admin, that phone's queued messages
    are failed "cancelled by NAME" with an event each, and the answer counts them and
    those being handed to the provider (not cancelled). Held ones stay until asked for
    (no `state`: both); other phones' and sent ones stay. Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        mine = await seed(bridge.store, [QUEUED] * 3, 1.0)
        held, theirs, sending, sent = await seed(
            bridge.store,
            [
                QUEUED._replace(state=State.HELD),
                QUEUED._replace(recipient=OTHER),
                QUEUED._replace(state=State.SENDING),
                QUEUED._replace(state=State.SENT),
            ],
            1.0,
        )
        body = {"recipient": "+1 202 555 0144", "state": "queued"}
        refused = await http.post(CANCEL, json=body)
        assert refused.status_code == 401, refused.text
        assert "missing bearer token" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        for token in (READER, SENDER):
            answer = await http.post(CANCEL, json=body, headers=bearer(token))
            assert answer.status_code == 403, answer.text
            assert "lacks the 'admin' scope" in answer.json()["error"]
        assert await states(bridge, mine) == [State.QUEUED] * 3

        done = await http.post(CANCEL, json=body, headers=bearer(ADMIN))
        assert done.status_code == 200, done.text
        assert done.json() == {
            "cancelled": 3,
            "in_flight": 1,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        for message_id in mine:
            message = await bridge.store.get(message_id)
            assert (message.state, message.reason) == (State.FAILED, "cancelled by root")
            assert message.reason_kind == "cancelled"
            events = await bridge.store.events(message_id)
            assert (events[-1]["state"], events[-1]["detail"]) == (
                "failed",
                "cancelled by root",
            )
        assert await states(bridge, [held, theirs, sending, sent]) == [
            State.HELD,
            State.QUEUED,
            State.SENDING,
            State.SENT,
        ]
        # No state: queued and held alike; written with a trailing slash, served.
        both = await http.post(f"{CANCEL}/", json={"recipient": PHONE}, headers=bearer(ADMIN))
        assert both.json() == {
            "cancelled": 1,
            "in_flight": 1,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, [held, theirs]) == [State.FAILED, State.QUEUED]
        # Held only: what the dispatcher is sending was never selected (none of it held).
        [held_too] = await seed(bridge.store, [QUEUED._replace(state=State.HELD)], 2.0)
        only = {"recipient": PHONE, "state": "held"}
        held_only = await http.post(CANCEL, json=only, headers=bearer(ADMIN))
        assert held_only.json() == {
            "cancelled": 1,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, [held_too]) == [State.FAILED]
        again = await http.post(CANCEL, json={"recipient": PHONE}, headers=bearer(ADMIN))
        assert again.json() == {
            "cancelled": 0,
            "in_flight": 1,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }


async def test_the_api_cancels_by_route_and_text(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A storm is often one route's, or one alert's text to many phones: `route` and `q`
    (the list's filters, the same names) select those; given together, both hold."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        routed = QUEUED._replace(route="am", recipient=OTHER)
        disk_am, cpu_am, disk_api, cpu_api = await seed(
            bridge.store,
            [
                routed,
                routed._replace(text="CPU hot on db-2"),
                QUEUED,
                QUEUED._replace(text="cpu hot on web-1"),
            ],
            1.0,
        )
        both = await http.post(CANCEL, json={"route": "am", "q": "DISK"})
        assert both.json() == {
            "cancelled": 1,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, [disk_am, cpu_am]) == [State.FAILED, State.QUEUED]
        text = await http.post(CANCEL, json={"q": "cpu hot"})
        assert text.json()["cancelled"] == 2
        assert await states(bridge, [cpu_am, disk_api, cpu_api]) == [
            State.FAILED,
            State.QUEUED,
            State.FAILED,
        ]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 400, "give 'recipient', 'route' or 'q'"),
        ({"state": "queued"}, 400, "give 'recipient', 'route' or 'q'"),
        ({"recpient": PHONE}, 400, "unknown field 'recpient': one of recipient, route, q, state"),
        ({"to": PHONE}, 400, "unknown field 'to'"),
        ({"recipient": "nas.example.org"}, 400, "not a possible phone number"),
        ({"recipient": "+1\x00"}, 400, "'recipient' holds a NUL character"),
        ({"q": "\x00"}, 400, "'q' holds a NUL character"),
        ({"route": "nope"}, 400, "unknown route 'nope'"),
        ({"route": "\x00"}, 400, "'route' holds a NUL character"),
        ({"q": "disk", "state": "sent"}, 400, "'state' 'sent' is not a waiting state"),
        ({"q": " "}, 400, "'q' is empty"),
        ({"q": 5}, 400, "'q' must be a string"),
        ([PHONE], 400, "body must be a JSON object"),
        ({"q": "x" * 5001}, 400, "longer than 5000 characters"),
    ],
)
async def test_a_bad_filter_is_a_4xx_that_says_why_and_cancels_nothing(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str, body, status: int, words: str
) -> None:
    """Nothing selected is no "cancel everything": an empty or misspelt body is a 400
    naming what is missing, as is a phone that is no number, a route neither configured
    nor stored, a state no message can be cancelled from, and a NUL (PostgreSQL's text
    holds none: a 500 there). Both stores; nothing is cancelled."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        [queued] = await seed(bridge.store, [QUEUED], 1.0)
        async with httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http:
            answer = await http.post(CANCEL, json=body)
        assert answer.status_code == status, answer.text
        assert words in answer.json()["error"], answer.text
        assert await states(bridge, [queued]) == [State.QUEUED]


async def test_a_body_that_is_not_json_is_a_4xx(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (_bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        form = await http.post(CANCEL, data={"recipient": PHONE})
        assert form.status_code == 415, form.text
        json_type = {"content-type": "application/json"}
        answer = await http.post(CANCEL, content=b"recipient=+1202", headers=json_type)
        assert answer.status_code == 400
        assert "body is not valid JSON" in answer.json()["error"]
        # The single cancel's id route stays a read: "cancel" is no id.
        listed = await http.get(CANCEL)
        assert listed.status_code == 400 and listed.json()["field"] == "id"


async def test_a_token_less_bridge_records_where_a_cancel_came_from(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """With no tokens the caller is anonymous, and its cancels read "cancelled by
    anonymous": who, from where, the operator could not tell. The reason and the event
    say which face (the console, the API) and the client's address."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url):
        by_console, by_api, one, retried = await seed(
            bridge.store,
            [
                QUEUED,
                QUEUED._replace(recipient=OTHER),
                QUEUED._replace(text="one"),
                QUEUED._replace(state=State.FAILED, text="two"),
            ],
            1.0,
        )
        async with httpx.AsyncClient(base_url=url) as http:
            page = await http.get(f"/ui/messages/{by_console}")
            done = await http.post(
                "/ui/queued/cancel", data={"csrf": csrf_of(page), "recipient": PHONE}
            )
            assert done.status_code == 303, done.text
            api = await http.post(CANCEL, json={"recipient": OTHER})
            assert api.json()["cancelled"] == 1
            single = await http.post(f"/ui/messages/{retried}/retry", data={"csrf": csrf_of(page)})
            assert single.status_code == 303
        console_words = "the console (no tokens configured), from 127.0.0.1"
        api_words = "the API (no tokens configured), from 127.0.0.1"
        for message_id, words in ((by_console, console_words), (one, console_words)):
            message = await bridge.store.get(message_id)
            assert message.reason == f"cancelled by {words}"
            events = await bridge.store.events(message_id)
            assert events[-1]["detail"] == f"cancelled by {words}"
        assert (await bridge.store.get(by_api)).reason == f"cancelled by {api_words}"
        assert console_words in (await bridge.store.events(retried))[-1]["detail"]


async def test_console_posts_with_a_trailing_slash_are_served(
    tmp_path, sandbox_url: str, clock: ManualClock
) -> None:
    """A POST to `/ui/PATH/` got Starlette's 307 to `/ui/PATH`: curl without -L stopped
    there, the cancel not done and nothing said. It is served as `/ui/PATH`, as the API
    serves its POSTs; a GET keeps its redirect (a browser follows it), and a POST to no
    page is the console's 404, not a redirect to one."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with running_bridge(config, clock) as (bridge, url):
        one, pile = await seed(bridge.store, [QUEUED._replace(recipient=OTHER), QUEUED], 1.0)
        async with httpx.AsyncClient(base_url=url) as admin:
            form = await admin.get("/ui/signin/")
            assert form.status_code == 307  # a GET: the redirect, as before
            signed = await admin.post(
                "/ui/signin/", data={"csrf": csrf_of(await admin.get("/ui/signin")), "token": ADMIN}
            )
            assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
            csrf = csrf_of(await admin.get("/ui/"))
            single = await admin.post(f"/ui/messages/{one}/cancel/", data={"csrf": csrf})
            assert single.status_code == 303, single.text
            storm = await admin.post("/ui/queued/cancel/", data={"csrf": csrf, "recipient": PHONE})
            assert storm.status_code == 303, storm.text
            assert await states(bridge, [one, pile]) == [State.FAILED, State.FAILED]
            nowhere = await admin.post("/ui/nowhere/", data={"csrf": csrf})
            assert nowhere.status_code == 404 and "no page /ui/nowhere" in nowhere.text
        async with httpx.AsyncClient(base_url=url) as reader:
            await sign_in(reader, READER)
            answer = await reader.post("/ui/messages/1/retry/", data={"csrf": "x"})
            assert answer.status_code == 403  # the scope and CSRF hold as without the slash


async def test_a_cancel_that_stops_at_its_bound_says_more_may_be_left(
    tmp_path, sandbox_url: str, clock: ManualClock, monkeypatch
) -> None:
    """One call is bounded (a flood still arriving is not chased for ever): one that
    stopped at its bound with messages maybe left says so (`more`), and the next call
    cancels the rest."""
    monkeypatch.setattr(bulk, "CANCEL_BATCH", 2)
    monkeypatch.setattr(bulk, "MAX_CANCEL_ROUNDS", 1)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        ids = await seed(bridge.store, [QUEUED] * 3, 1.0)
        body = {"recipient": PHONE, "state": "queued"}
        first = await http.post(CANCEL, json=body)
        assert first.json() == {
            "cancelled": 2,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 0,
            "more": True,
        }
        rest = await http.post(CANCEL, json=body)
        assert rest.json() == {
            "cancelled": 1,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, ids) == [State.FAILED] * 3


async def test_a_round_the_dispatcher_took_whole_is_no_end_and_each_text_is_counted_once(
    tmp_path, sandbox_url: str, clock: ManualClock, monkeypatch
) -> None:
    """The dispatcher (another instance) claims the first round's texts between the
    cancel's read and its write. A round with nothing cancelled ended the call: `more`
    false, nothing cancelled, the rest of the storm left to go. It goes on; what was
    taken is `in_flight` (once: not `gone` too)."""
    monkeypatch.setattr(bulk, "CANCEL_BATCH", 2)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        ids = await seed(bridge.store, [QUEUED] * 5, 1.0)
        reads, claimed = bridge.store.query, []

        async def read_then_claim(**filters):
            found = await reads(**filters)
            if filters.get("state") == "queued" and not claimed:
                claimed.extend(m.id for m in found)
                await bridge.store.claim(claimed, clock.now(), owner="b", lease_until=1e10)
            return found

        monkeypatch.setattr(bridge.store, "query", read_then_claim)
        answer = await http.post(CANCEL, json={"recipient": PHONE, "state": "queued"})
        monkeypatch.undo()
        left = [i for i in ids if i not in claimed]
        assert answer.json() == {
            "cancelled": 3,
            "in_flight": 2,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, left) == [State.FAILED] * 3
        assert await states(bridge, claimed) == [State.SENDING] * 2


async def test_the_api_says_what_the_dispatcher_sent_between_its_read_and_write(
    tmp_path, sandbox_url: str, clock: ManualClock, monkeypatch
) -> None:
    """Texts sent between the cancel's read and its write: the answer was
    {"cancelled": 0, "in_flight": 0, "more": false}, as if nothing had been selected.
    They are `gone`, as the console's note tells them."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        texts = [QUEUED._replace(text=f"disk {i} full") for i in range(3)]
        ids = await seed(bridge.store, texts, clock.now())
        reads = bridge.store.query

        async def read_then_dispatch(**filters):
            found = await reads(**filters)
            if filters.get("state") == "queued":
                await bridge.dispatcher.run_once()  # between the read and the write
            return found

        monkeypatch.setattr(bridge.store, "query", read_then_dispatch)
        answer = await http.post(CANCEL, json={"recipient": PHONE})
        monkeypatch.undo()
        assert answer.json() == {
            "cancelled": 0,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 3,
            "more": False,
        }
        assert await states(bridge, ids) == [State.SENT] * 3


@pytest.mark.parametrize(
    "between", ["claimed then retried", "cancelled then retried", "cancelled, retried, claimed"]
)
async def test_a_text_found_again_in_a_later_round_is_counted_once(
    between: str,
    tmp_path,
    sandbox_url: str,
    clock: ManualClock,
    backend: str,
    monkeypatch,
) -> None:
    """A round that was full goes on to the next. A text of the first round the
    dispatcher claimed before the write, then put back to queued (a transient failure
    retried), is found and cancelled in the next round: it was `cancelled` and `gone`
    both, four counts for three texts. One an operator retried after the first round
    cancelled it is cancelled again: `cancelled` counted it twice; claimed before the
    next round's write, it is being sent, not cancelled. Each is counted by what the
    last round found of it. Both stores."""
    monkeypatch.setattr(bulk, "CANCEL_BATCH", 2)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        ids = await seed(bridge.store, [QUEUED] * 3, 1.0)
        reads, rounds, first = bridge.store.query, [], []

        async def read_between_rounds(**filters):
            if filters.get("state") != "queued":
                return await reads(**filters)
            rounds.append(filters)
            if len(rounds) == 2:  # the next round: one of the first's put back
                again = first[0]
                if between == "claimed then retried":
                    noted = await bridge.store.requeue(
                        [again], clock.now(), owner="b", at=clock.now(), reason="try again"
                    )
                    assert noted == []  # requeued, none noted instead
                else:
                    assert await bridge.store.retry([again], clock.now(), by="x") == [again]
            found = await reads(**filters)
            if len(rounds) == 2 and between == "cancelled, retried, claimed":
                await bridge.store.claim([again], clock.now(), owner="b", lease_until=1e10)
            if len(rounds) == 1:
                first.extend(m.id for m in found)
                if between == "claimed then retried":  # before the first round's write
                    claimed = await bridge.store.claim(
                        first, clock.now(), owner="b", lease_until=1e10
                    )
                    assert claimed == first
            return found

        monkeypatch.setattr(bridge.store, "query", read_between_rounds)
        answer = await http.post(CANCEL, json={"recipient": PHONE, "state": "queued"})
        monkeypatch.undo()
        if between != "cancelled then retried":  # one claimed still, two cancelled
            expected = {
                "cancelled": 2,
                "in_flight": 1,
                "in_flight_more": False,
                "gone": 0,
                "more": False,
            }
            assert sorted(await states(bridge, ids)) == sorted(
                [State.FAILED, State.FAILED, State.SENDING]
            )
        else:
            expected = {
                "cancelled": 3,
                "in_flight": 0,
                "in_flight_more": False,
                "gone": 0,
                "more": False,
            }
            assert await states(bridge, ids) == [State.FAILED] * 3
        assert answer.json() == expected


async def test_an_in_flight_count_cut_at_its_bound_says_so(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str, monkeypatch
) -> None:
    """`in_flight` counts at most IN_FLIGHT_COUNTED texts in `sending`: of more, the
    answer said that many as if exact ("500 still going" of 800). `in_flight_more`
    says the count stopped there; the console's note says "or more". At the bound
    exactly, the count is whole. Both stores."""
    monkeypatch.setattr(bulk, "IN_FLIGHT_COUNTED", 2)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        sending = QUEUED._replace(state=State.SENDING)
        await seed(bridge.store, [sending] * 2, 1.0)
        body = {"recipient": PHONE}
        whole = await http.post(CANCEL, json=body, headers=bearer(ADMIN))
        assert whole.json() == {
            "cancelled": 0,
            "in_flight": 2,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        [queued, *_] = await seed(bridge.store, [QUEUED, sending], 2.0)
        cut = await http.post(CANCEL, json=body, headers=bearer(ADMIN))
        assert cut.json() == {
            "cancelled": 1,
            "in_flight": 2,
            "in_flight_more": True,
            "gone": 0,
            "more": False,
        }
        assert await states(bridge, [queued]) == [State.FAILED]
        await sign_in(http, ADMIN)
        page = await http.get("/ui/")
        form = {"csrf": csrf_of(page), "recipient": PHONE}
        done = await http.post("/ui/queued/cancel", data=form)
        shown = (await http.get(done.headers["location"])).text
        assert (
            "Nothing was queued for +12025550144: nothing cancelled. 2 or more being handed"
            " to the provider now: too late to cancel." in shown
        ), shown


def store_calls(store: Any, monkeypatch) -> list[str]:
    """The name of each call made to `store`'s operations from now on, in order."""
    calls: list[str] = []
    for name in dir(store):
        method = getattr(store, name)
        if not name.startswith("_") and inspect.iscoroutinefunction(method):

            async def counted(*args: Any, _name: str = name, _method: Any = method, **kw: Any):
                calls.append(_name)
                return await _method(*args, **kw)

            monkeypatch.setattr(store, name, counted)
    return calls


@pytest.mark.parametrize("taken", [2, 1200])
async def test_texts_taken_meanwhile_are_in_flight_when_the_count_is_cut(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str, monkeypatch, taken: int
) -> None:
    """The dispatcher claims the texts the cancel found before its write, while more
    texts to the phone are sending than `in_flight` counts. Those it took were told
    only by the count's read: past the bound, they were `gone` ("sent already, or
    ended") while being sent. They are `in_flight` (once). They were then looked up one
    by one, a query for each (up to 50000 in one request): read a chunk at a time now,
    with the same answer, every call to the store counted. Both stores."""
    monkeypatch.setattr(bulk, "IN_FLIGHT_COUNTED", 1)
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url, headers=bearer(ADMIN)) as http,
    ):
        found = await seed(bridge.store, [QUEUED] * taken, 1.0)
        # Newer, so the count's read (newest first) reaches these, not those taken.
        await seed(bridge.store, [QUEUED._replace(state=State.SENDING)] * 2, 2.0)
        reads = bridge.store.query

        async def read_then_claim(**filters):
            seen = await reads(**filters)
            if filters.get("state") == "queued" and seen:
                ids = [m.id for m in seen]
                assert await bridge.store.claim(ids, clock.now(), owner="b", lease_until=1e10)
            return seen

        monkeypatch.setattr(bridge.store, "query", read_then_claim)
        calls = store_calls(bridge.store, monkeypatch)
        answer = await http.post(CANCEL, json={"recipient": PHONE, "state": "queued"})
        monkeypatch.undo()
        assert await states(bridge, found) == [State.SENDING] * taken
        # Rounds of 500 (a read, the claim, the cancel), the count's read, a read per 500.
        assert len(calls) <= 20, Counter(calls)
        assert answer.json() == {
            "cancelled": 0,
            "in_flight": taken + 1,
            "in_flight_more": True,
            "gone": 0,
            "more": False,
        }


async def held_folded_midway(bridge, clock: ManualClock) -> tuple[list[int], Any, Any]:
    """Three held texts to PHONE whose digest is due; their ids, the store's `query`,
    and a stand-in for it (to patch in) that has the digest fold them between a held
    cancel's read and its write."""
    held = QUEUED._replace(state=State.HELD)
    ids = await seed(bridge.store, [held] * 3, clock.now() - 86400)
    reads = bridge.store.query

    async def read_then_fold(**filters: Any) -> Any:
        found = await reads(**filters)
        if filters.get("state") == "held":
            await bridge.digests.run_once()  # between the read and the write
        return found

    return ids, reads, read_then_fold


@pytest.mark.parametrize("via", ["api", "console"])
async def test_held_texts_folded_between_the_read_and_the_write_are_gone(
    via: str, tmp_path, sandbox_url: str, clock: ManualClock, backend: str, monkeypatch
) -> None:
    """A held text leaves `held` only by ending: cancelled, or folded into its phone's
    digest (`suppressed`, the digest a new queued message of its own); none goes back
    to `queued` as itself, so none found held is still waiting at the write. Those the
    digest folded between a held cancel's read and its write are `gone`, counted once,
    and the digest is not among them (never found held); the console's note says where
    they went ("released" read as back in the queue). Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with (
        running_bridge(config, clock) as (bridge, url),
        httpx.AsyncClient(base_url=url) as http,
    ):
        ids, reads, read_then_fold = await held_folded_midway(bridge, clock)

        if via == "console":
            await sign_in(http, ADMIN)
            form = {"csrf": csrf_of(await http.get("/ui/")), "recipient": PHONE}
        monkeypatch.setattr(bridge.store, "query", read_then_fold)
        if via == "api":
            body = {"recipient": PHONE, "state": "held"}
            answer = await http.post(CANCEL, json=body, headers=bearer(ADMIN))
        else:
            answer = await http.post("/ui/held/cancel", data=form)
        monkeypatch.undo()
        if via == "api":
            assert answer.json() == {
                "cancelled": 0,
                "in_flight": 0,
                "in_flight_more": False,
                "gone": 3,
                "more": False,
            }
        else:
            shown = (await http.get(answer.headers["location"])).text
            told = (
                "Nothing cancelled. 3 found held were no longer held (folded into a digest,"
                " or ended)."
            )
            assert told in shown, shown
        assert await states(bridge, ids) == [State.SUPPRESSED] * 3
        [digest] = await reads(state="queued", number=PHONE)
        assert digest.id not in ids and digest.source == "digest"


async def test_a_digest_folded_during_a_cancel_of_every_waiting_text_is_cancelled_too(
    tmp_path, sandbox_url: str, clock: ManualClock, backend: str, monkeypatch
) -> None:
    """A cancel of a phone's waiting texts (no `state`: queued and held) cancelled the
    queued ones first. A digest folded from the held ones while the held pass ran was a
    new queued text after the queued pass: it went out, with "more": false. Held go
    first now, and the queued pass that follows finds the digest. Both stores."""
    config = bridge_config(tmp_path, sandbox_url, TOKENS)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        ids, reads, read_then_fold = await held_folded_midway(bridge, clock)

        monkeypatch.setattr(bridge.store, "query", read_then_fold)
        answer = await http.post(f"{url}{CANCEL}", json={"recipient": PHONE}, headers=bearer(ADMIN))
        monkeypatch.undo()
        assert answer.status_code == 200, answer.text
        digests = [m for m in await reads(number=PHONE) if m.id not in ids]
    assert [(m.source, m.state) for m in digests] == [("digest", State.FAILED)], digests
    assert answer.json()["cancelled"] == 1 and answer.json()["gone"] == 3, answer.json()

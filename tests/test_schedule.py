"""`schedule_time` from every ingress, in the provider's time zone, refused when past, and
followed by the poller until its time has passed; CLI calls share serve's rate window."""

from __future__ import annotations

import argparse
import asyncio
import smtplib
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import httpx
import pytest

from bridge.cli import book_cli_request
from bridge.clock import ManualClock
from bridge.commands import call_provider
from bridge.errors import InputError
from bridge.ingress import smtp as smtp_module
from bridge.ingress.mail import parse_mail
from bridge.models import State
from bridge.provider.sandbox import VARIANTS, Fault, SandboxState
from bridge.provider.sandbox.shapes import Shape
from bridge.schedule import held_until, parse_schedule_time, scheduled_epoch
from bridge.store import open_store
from tests.helpers import bridge_config, max_in_window, pump, running_bridge
from tests.test_smtp import smtp_listening

BEIRUT = 'timezone = "Asia/Beirut"'  # UTC+2 in winter: 1800000000 is 2027-01-15 08:00 UTC
HOOK = '[routes.generic]\nformat = "generic"\nto = ["+12025550101"]\npublic = true\n'
SMTP = '[smtp]\ndomains = ["sms.localhost"]\n'


def local(epoch: float, tz: str = "Asia/Beirut") -> str:
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(epoch, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S")


async def test_schedule_from_api_mail_and_hooks_in_the_providers_zone(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.shape = VARIANTS["local-time"]  # Asia/Beirut, as configured below
    config = bridge_config(tmp_path, sandbox_url, HOOK + SMTP, timezone="Asia/Beirut")
    when = clock.now() + 7200
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        api = await http.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550143", "message": "api", "schedule_time": local(when)},
        )
        iso = datetime.fromtimestamp(when, UTC).isoformat()
        hook = await http.post(
            f"{url}/hooks/generic", params={"schedule_time": iso}, json={"message": "hook"}
        )
        past = await http.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550143", "message": "x", "schedule_time": local(clock.now() - 60)},
        )
        bad_hook = await http.post(
            f"{url}/hooks/generic", params={"schedule_time": "soon"}, json={"message": "x"}
        )
        async with smtp_listening(bridge) as port:
            mail = (
                f"From: ops@example.com\r\nSubject: mail\r\nX-SMS-Schedule: {local(when)}\r\n"
                "\r\nbody\r\n"
            )
            unreadable = mail.replace(local(when), "soon")

            def deliver() -> tuple[dict, int]:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    ok = smtp.sendmail("ops@example.com", ["+12025550144@sms.localhost"], mail)
                    try:
                        smtp.sendmail("ops@example.com", ["+12025550144@sms.localhost"], unreadable)
                    except smtplib.SMTPDataError as exc:
                        return ok, exc.smtp_code
                return ok, 250

            ok, refused_code = await asyncio.to_thread(deliver)
        stored = {m.text.split("\n")[0]: m for m in await bridge.store.query()}
        clock.advance(1)
        await bridge.dispatcher.run_once()
    assert api.status_code == 202 and hook.status_code == 202 and ok == {}
    assert past.status_code == 400 and past.json()["field"] == "schedule_time"
    assert "past" in past.json()["error"]
    assert bad_hook.status_code == 400 and refused_code == 554
    utc = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert [m.schedule_time for m in stored.values()] == [utc] * 3
    # Sent with the provider's local time: the sandbox (same zone) holds each until then.
    assert len(sandbox_state.entries) == 3
    assert {e.deliver_from for e in sandbox_state.entries} == {when}


async def test_a_mail_whose_schedule_passed_while_it_was_queued_is_sent_now(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """An MTA delivers a mail when it can (the bridge was down, or answered 451): an
    X-SMS-Schedule that passed meanwhile was a permanent 554, the text bounced."""
    config = bridge_config(tmp_path, sandbox_url, SMTP, timezone="Asia/Beirut")
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        mail = (
            "From: ops@example.com\r\nSubject: maintenance starts\r\n"
            f"X-SMS-Schedule: {local(clock.now() - 3600)}\r\n\r\ndb-2 read-only\r\n"
        )

        def deliver() -> dict:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                return smtp.sendmail("ops@example.com", ["+12025550144@sms.localhost"], mail)

        assert await asyncio.to_thread(deliver) == {}
        [stored] = await bridge.store.query()
        assert stored.schedule_time is None
        await bridge.dispatcher.run_once()
    assert [e.message for e in sandbox_state.entries] == ["maintenance starts\ndb-2 read-only"]


@pytest.mark.slow  # over ~2 s
async def test_the_poller_follows_a_scheduled_message_past_give_up_after(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    config = bridge_config(tmp_path, sandbox_url, '[status]\ngive_up_after = "1h"\n')
    when = clock.now() + 3 * 3600
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        iso = datetime.fromtimestamp(when, UTC).isoformat()
        body = {"to": "+12025550143", "message": "later", "schedule_time": iso}
        [message_id] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]

        async def delivered() -> bool:
            return (await bridge.store.get(message_id)).state == State.DELIVERED

        await pump(bridge, clock, delivered, max_seconds=4 * 3600, step_cap=60)
    assert clock.now() >= when


@pytest.mark.parametrize("offset", ["-04:00", "-05:00"])  # 01:30 in summer, then winter time
async def test_a_time_the_providers_zone_lives_twice_is_kept_and_sent_at_that_instant(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str, offset: str
) -> None:
    """New York's clocks go back at 02:00 on 2027-11-07: 01:30 comes twice. Given with
    its offset, the time went to the provider as "2027-11-07 01:30:00", which it reads
    as the first (summer) 01:30: the winter one went an hour early. The bridge now keeps
    such a message and sends it at its instant, without schedule_time."""
    sandbox_state.shape = Shape(timezone="America/New_York")
    config = bridge_config(tmp_path, sandbox_url, timezone="America/New_York")
    given = f"2027-11-07T01:30:00{offset}"
    when = datetime.fromisoformat(given).timestamp()
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        body = {"to": "+12025550143", "message": "rotate the keys", "schedule_time": given}
        [message_id] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
        await bridge.dispatcher.run_once()
        assert not sandbox_state.entries  # nothing goes to the provider ahead of time
        message = await bridge.store.get(message_id)
        assert message.state == State.QUEUED and "occurs twice" in message.reason
        assert await bridge.store.next_due_at() == when  # due at its instant
        clock.advance(when - 1 - clock.now())
        await bridge.dispatcher.run_once()
        assert not sandbox_state.entries
        clock.advance(1)

        async def delivered() -> bool:
            return (await bridge.store.get(message_id)).state == State.DELIVERED

        await pump(bridge, clock, delivered, max_seconds=600)
        events = await bridge.store.events(message_id)
    [entry] = sandbox_state.entries
    assert entry.created_at == when and entry.deliver_from == when
    assert any("occurs twice" in (e["detail"] or "") for e in events)


async def test_a_message_kept_for_its_time_is_retried_after_a_5xx_not_given_up(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A message the bridge kept until its time (here 01:30 of a fall-back night, ten
    months ahead) met a 500 there and failed at once, "gave up after 1 attempts":
    `provider.retry_max_age` was counted from when it was stored, not from its time."""
    sandbox_state.shape = Shape(timezone="America/New_York")
    config = bridge_config(tmp_path, sandbox_url, timezone="America/New_York")
    given = "2027-11-07T01:30:00-05:00"
    when = datetime.fromisoformat(given).timestamp()
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        body = {"to": "+12025550143", "message": "rotate the keys", "schedule_time": given}
        [message_id] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
        await bridge.dispatcher.run_once()
        clock.advance(when - clock.now())
        sandbox_state.faults.append(Fault(status=500, path="/send"))

        async def ended() -> bool:
            return (await bridge.store.get(message_id)).state in (State.DELIVERED, State.FAILED)

        await pump(bridge, clock, ended, max_seconds=600)
        message = await bridge.store.get(message_id)
    assert message.state == State.DELIVERED, message.reason
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/send")] == [500, 200]


class Ahead:
    """The provider's clock, `seconds` ahead of ours (or a request that long in flight)."""

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def now(self) -> float:
        return self.clock.now() + self.seconds


async def test_a_time_a_few_seconds_ahead_is_kept_not_refused_as_past_by_the_provider(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """A schedule_time 20 s ahead went to the provider as such; with its clock 30 s ahead
    of ours (or the request slow), the provider refused it as past, a 400: the message
    failed for good, the alert lost. A time that near is kept by the bridge and sent at
    its instant without schedule_time."""
    sandbox_state.shape = VARIANTS["strict"]  # refuses a past schedule_time
    sandbox_state.clock = Ahead(clock, 30.0)
    config = bridge_config(tmp_path, sandbox_url)
    when = clock.now() + 20
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        iso = datetime.fromtimestamp(when, UTC).isoformat()
        body = {"to": "+12025550143", "message": "soon", "schedule_time": iso}
        [message_id] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state != State.QUEUED

        await pump(bridge, clock, sent, max_seconds=300)
        message = await bridge.store.get(message_id)
    assert message.state in (State.SENDING, State.SENT, State.DELIVERED), message.reason
    [send] = [r for r in sandbox_state.requests if r.path.endswith("/send")]
    assert send.status == 200 and send.at == when + 30  # at its time (the provider's clock)


def test_held_until_only_where_the_wall_time_is_ambiguous_or_too_near() -> None:
    from zoneinfo import ZoneInfo

    ny = ZoneInfo("America/New_York")
    now = datetime(2027, 1, 15, tzinfo=UTC).timestamp()

    def stored(iso: str) -> str:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")

    for iso in ("2027-11-07T01:00:00-04:00", "2027-11-07T01:59:59-05:00"):
        held = held_until(stored(iso), now=now, tz=ny)
        assert held is not None and held[0] == datetime.fromisoformat(iso).timestamp()
        assert "occurs twice in America/New_York" in held[1]
    for iso in ("2027-11-07T00:59:59-04:00", "2027-11-07T02:00:00-05:00", "2027-03-14T03:30-04:00"):
        assert held_until(stored(iso), now=now, tz=ny) is None
    assert held_until(stored("2027-11-07T01:30:00-05:00"), now=now, tz=UTC) is None
    soon = datetime.fromtimestamp(now + 59, UTC).strftime("%Y-%m-%d %H:%M:%S")
    held = held_until(soon, now=now, tz=UTC)
    assert held is not None and held[0] == now + 59 and "too near" in held[1]
    assert held_until(soon, now=now - 1, tz=UTC) is None  # a minute ahead: the provider's
    past = stored("2027-11-07T01:30:00-05:00")
    assert (
        held_until(past, now=datetime.fromisoformat("2027-11-08T00:00Z").timestamp(), tz=ny) is None
    )


async def test_a_schedule_that_passed_in_the_queue_is_sent_now_not_refused(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.shape = VARIANTS["strict"]  # refuses a past schedule_time
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        sandbox_state.api_key = "rotated"  # nothing goes out for a while
        iso = datetime.fromtimestamp(clock.now() + 60, UTC).isoformat()
        body = {"to": "+12025550143", "message": "soon", "schedule_time": iso}
        [message_id] = (await http.post(f"{url}/api/v1/messages", json=body)).json()["ids"]
        await bridge.dispatcher.run_once()
        clock.advance(600)
        sandbox_state.api_key = "test-key"

        async def sent() -> bool:
            return (await bridge.store.get(message_id)).state in (State.SENT, State.DELIVERED)

        await pump(bridge, clock, sent, max_seconds=300)
    # The key was refused once; then sent without the stale time, not refused with a 400.
    assert [r.status for r in sandbox_state.requests if r.path.endswith("/send")] == [401, 200]


async def test_cli_calls_book_the_window_serve_keeps(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    sandbox_state.rate_limit = 5
    config = bridge_config(tmp_path, sandbox_url, requests_per_minute=5)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        cli = open_store(config.store)  # as `sms-bridge provider ...` opens it
        await cli.open()
        try:
            for _ in range(3):  # three account calls while serve runs
                await book_cli_request(cli, config, clock, "balance", sleep=sleep)
                await http.get(f"{sandbox_url}/api/v1/balance", headers={"X-API-Key": "test-key"})
            for i in range(4):
                await http.post(
                    f"{url}/api/v1/messages", json={"to": f"+1202555015{i}", "message": f"x{i}"}
                )
            await bridge.dispatcher.run_once()  # price list + 1 send: the CLI took 3
            assert len(sandbox_state.entries) == 1
            # And the other way: serve's window is full, so the CLI waits its turn.
            await book_cli_request(cli, config, clock, "logs", sleep=sleep)
        finally:
            await cli.close()
        await http.get(f"{sandbox_url}/api/v1/balance", headers={"X-API-Key": "test-key"})

        async def all_sent() -> bool:
            return len(sandbox_state.entries) == 4

        await pump(bridge, clock, all_sent, max_seconds=600)
    assert waits and waits[0] > 50
    assert 429 not in [r.status for r in sandbox_state.requests]
    assert max_in_window([r.at for r in sandbox_state.requests]) <= 5


@pytest.mark.usefixtures("backend")  # the re-stamp is SQL of each backend
async def test_a_cli_call_counts_in_the_window_from_when_its_answer_came(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`sms-bridge provider ...` books its call before making it, and the provider counts
    the call when it arrives, up to a connect timeout later. Its booking is stamped again
    when the answer comes (the provider counted it before that), as serve's are: serve's
    window keeps it at least as long as the provider does."""
    config = bridge_config(tmp_path, sandbox_url)
    answer = asyncio.Event()
    sandbox_state.faults.append(Fault(status=0, hold=answer, path="/balance"))
    cli = open_store(config.store)
    await cli.open()
    try:
        start = clock.now()
        args = argparse.Namespace(action="balance", json=True)
        call = asyncio.create_task(call_provider(config, args, cli, clock))
        for _ in range(400):  # the call reached the provider, which says nothing yet
            if sandbox_state.requests:
                break
            await asyncio.sleep(0.02)
        clock.advance(3.0)
        answer.set()
        assert await call == 0
        assert [(b.at, b.kind) for b in await cli.request_rows(0)] == [(start + 3.0, "cli:balance")]
    finally:
        await cli.close()


def test_a_refused_schedule_time_is_echoed_cut() -> None:
    """fromisoformat takes any number of fraction digits: the 400 shows 40 characters."""
    long_past = "2020-01-01T00:00:00." + "1" * 100_000
    with pytest.raises(InputError) as caught:
        parse_schedule_time(long_past, now=2e9, tz=UTC)
    assert "in the past" in str(caught.value) and len(str(caught.value)) < 120
    assert "'2020-01-01T00:00:00.1111" in str(caught.value)


async def test_a_time_beyond_what_the_providers_zone_can_write_is_a_400(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """9999-12-31 23:00 UTC is year 10000 in Beirut: it was stored, and the dispatcher's
    conversion for the provider raised, ending the dispatcher (and serve with it). And
    23:59 at -05:00 is past 9999 in UTC: a 500. Both are bad input, said so."""
    sandbox_state.shape = VARIANTS["local-time"]  # Asia/Beirut, as configured below
    config = bridge_config(tmp_path, sandbox_url, timezone="Asia/Beirut")
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        answers = [
            await http.post(
                f"{url}/api/v1/messages",
                json={"to": "+12025550143", "message": "x", "schedule_time": when},
            )
            for when in ("9999-12-31T23:00:00Z", "9999-12-31T23:59:59-05:00")
        ]
        far = await http.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550144", "message": "y", "schedule_time": "2999-01-01 08:00:00"},
        )
        await bridge.dispatcher.run_once()  # must not raise
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["field"] == "schedule_time"
    assert far.status_code == 202  # far, but a date everywhere: the provider is told it
    assert [e.deliver_from for e in sandbox_state.entries] == [
        datetime(2999, 1, 1, 6, tzinfo=UTC).timestamp()
    ]


async def test_a_time_before_the_year_1000_is_refused_over_smtp_and_the_api(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    """`X-SMS-Schedule: 0999-01-01 00:00:00` was answered 250: strftime writes `%Y`
    unpadded below 1000 ("999-01-01 ..."), which `scheduled_epoch` cannot read back,
    so the mail's time was taken as not passed yet, handed to the provider as it was
    stored, and the text failed for good. It is the input error it is now: 554 over
    SMTP, 400 over the API, as other bad schedule values; nothing stored."""
    config = bridge_config(tmp_path, sandbox_url, SMTP)
    async with (
        running_bridge(config, clock) as (bridge, url),
        smtp_listening(bridge) as port,
        httpx.AsyncClient() as http,
    ):
        mail = (
            "From: ops@example.com\r\nSubject: UPS on battery\r\n"
            "X-SMS-Schedule: 0999-01-01 00:00:00\r\n\r\nups1 on battery\r\n"
        )

        def deliver() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("ops@example.com", ["+12025550144@sms.localhost"], mail)

        with pytest.raises(smtplib.SMTPDataError) as refused:
            await asyncio.to_thread(deliver)
        answer = await http.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550143", "message": "x", "schedule_time": "0999-01-01 00:00:00"},
        )
        assert await bridge.store.counts() == {}
    assert refused.value.smtp_code == 554
    assert b"before the year 1000" in refused.value.smtp_error
    assert answer.status_code == 400 and answer.json()["field"] == "schedule_time"


def test_a_schedule_is_stored_only_as_it_reads_back() -> None:
    """A time whose UTC (or provider's) year is below 1000 is refused even where the
    year written is 1000; the first year allowed is stored as `scheduled_epoch` reads."""
    beirut = ZoneInfo("Asia/Beirut")
    for early in ("0999-12-31 23:59:59", "1000-01-01T00:30:00+01:00", "0001-01-01 00:00:00"):
        with pytest.raises(InputError, match="before the year 1000"):
            parse_schedule_time(early, now=float("-inf"), tz=beirut, field="X-SMS-Schedule")
    stored = parse_schedule_time("1000-01-02T00:00:00Z", now=float("-inf"), tz=UTC)
    assert stored == "1000-01-02 00:00:00"
    assert scheduled_epoch(stored) == datetime(1000, 1, 2, tzinfo=UTC).timestamp()


async def test_a_stored_schedule_that_cannot_be_read_back_is_sent_now(
    tmp_path, clock: ManualClock, sandbox_url: str, monkeypatch
) -> None:
    """Defensively: a schedule the parser stored in a form `scheduled_epoch` cannot
    read (as year 999 was) is no schedule: sent now, not handed to the provider as
    "not passed yet". Its key keeps the header's time all the same."""
    monkeypatch.setattr(smtp_module, "parse_schedule_time", lambda *a, **k: "999-01-01 00:00:00")
    config = bridge_config(tmp_path, sandbox_url, SMTP)
    async with running_bridge(config, clock) as (bridge, _):
        raw = b"Subject: x\r\nX-SMS-Schedule: whenever\r\n\r\nbody\r\n"
        mail = parse_mail(raw, mail_from="a@example.org")
        assert bridge.smtp_handler.schedule_of(mail) == ("999-01-01 00:00:00", None)


async def test_the_same_words_for_another_time_are_not_a_duplicate(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """A reminder at 08:00 and at 20:00, posted together: the evening one was
    `suppressed` as a duplicate of the morning's (the key was the text alone). A retry
    of the same request (same time) is still one text."""
    config = bridge_config(tmp_path, sandbox_url)
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:

        async def remind(at: str) -> dict:
            body = {"to": "+12025550143", "message": "take your pills", "schedule_time": at}
            answer = await http.post(f"{url}/api/v1/messages", json=body)
            return answer.json()["messages"][0]

        morning = await remind("2099-01-01 08:00:00")
        evening = await remind("2099-01-01 20:00:00")
        retried = await remind("2099-01-01T08:00:00+00:00")
    assert morning["state"] == "queued"
    assert evening["state"] == "queued", evening
    assert retried["state"] == "suppressed"
    assert f"duplicate of message {morning['id']}" in retried["reason"]

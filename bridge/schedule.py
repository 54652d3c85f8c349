"""`schedule_time`: one parser for every ingress (HTTP API, mail header, webhooks).

The provider takes `schedule_time` as `Y-m-d H:i:s` in its own time zone
(`provider.timezone`). A sender may give that naive form (read in the provider's zone)
or ISO 8601 with an offset. It is stored in UTC, so the poller can compare it with the
clock, and turned into the provider's zone only when sent. A time already past is
refused at the edge: the provider would refuse it too, after the sender was told "ok".

The dispatcher keeps two kinds of scheduled message itself (`held_until`) and sends them
at their time without `schedule_time`:
- A time that falls in the hour the provider's zone lives twice (clocks going back at
  the end of summer time: 01:30 comes once in summer time, once an hour later in winter
  time) cannot be written in the provider's `Y-m-d H:i:s` so that it means one instant:
  the provider may read the other one and send an hour early or late. A naive time
  given in that hour is read as its first occurrence (summer time).
- A time less than `SCHEDULE_LEAD` ahead: the provider refuses a time it takes for past
  (a 400, so the message failed for good) once its clock runs a little ahead of ours or
  the request takes a while; a time 20 s ahead was lost that way.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, tzinfo

from bridge.config.masking import mask
from bridge.errors import InputError

STORED_FORMAT = "%Y-%m-%d %H:%M:%S"  # UTC in the store; the provider's format too
FIELD = "schedule_time"
MAIL_HEADER = "X-SMS-Schedule"
# strftime writes `%Y` unpadded below the year 1000 ("999-01-01"), which strptime, the
# provider and `scheduled_epoch` do not read back: such a time was stored, answered
# "stored", and failed for good when sent. No real schedule is that early.
FIRST_YEAR = 1000


def parse_schedule_time(
    value: str, *, now: float, tz: tzinfo, field: str = FIELD, secrets: Iterable[str] = ()
) -> str:
    """The sender's time -> UTC `Y-m-d H:M:S`; InputError when unreadable or past, which
    quotes the value with `secrets` (the config's) masked."""
    text = value.strip()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(
            field, "must be 'YYYY-MM-DD HH:MM:SS' (the provider's time zone) or ISO 8601"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz)
    if when.timestamp() <= now:
        raise InputError(field, f"{_shown(text, secrets)} is in the past; leave it out to send now")
    if when.year < FIRST_YEAR:  # before the conversions: year 1 can underflow in them
        raise InputError(field, f"{_shown(text, secrets)} is before the year {FIRST_YEAR}")
    try:
        stored = when.astimezone(UTC)
        # As `for_provider` will write it: a time past year 9999 there raised in the
        # dispatcher, long after the sender was told "stored", and ended it.
        provider = datetime.fromtimestamp(when.timestamp(), tz)
    except (OverflowError, ValueError) as exc:
        raise InputError(field, f"{_shown(text, secrets)} is beyond the year 9999") from exc
    if min(stored.year, provider.year) < FIRST_YEAR:  # 1000-01-01 00:30 at +01:00 is 999 in UTC
        raise InputError(
            field,
            f"{_shown(text, secrets)} is before the year {FIRST_YEAR} "
            "(in UTC or the provider's time zone)",
        )
    return stored.strftime(STORED_FORMAT)


SHOWN_CHARS = 40  # of a refused value echoed back: enough to recognise, never a payload


def _shown(text: str, secrets: Iterable[str]) -> str:
    """`text` quoted for an error, masked, then cut: fromisoformat takes any number of
    fraction digits, and a 400 echoing a whole megabyte helps nobody. Masked first: the
    error reaches the log and the console's route page, which mask what the cut left,
    and a secret of digits across the cut kept its first part."""
    text = mask(text, secrets)
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def scheduled_epoch(stored: str | None) -> float | None:
    if not stored:
        return None
    try:
        return datetime.strptime(stored, STORED_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:  # a row from before this module: taken as it was sent then
        return None


def for_provider(stored: str | None, *, now: float, tz: tzinfo) -> str | None:
    """The stored UTC time in the provider's zone; None once it has passed (send now)."""
    epoch = scheduled_epoch(stored)
    if epoch is None:
        return stored or None
    if epoch <= now:
        return None
    return datetime.fromtimestamp(epoch, tz).strftime(STORED_FORMAT)


SCHEDULE_LEAD = 60.0  # seconds: a schedule_time nearer than this is kept by the bridge


def held_until(stored: str | None, *, now: float, tz: tzinfo) -> tuple[float, str] | None:
    """When a message the bridge keeps itself (see the module docstring) is due, and
    why, while that is still ahead; None for any other message."""
    epoch = scheduled_epoch(stored)
    if epoch is None or epoch <= now:
        return None
    if epoch - now < SCHEDULE_LEAD:
        return epoch, "too near for the provider's schedule_time (its clock may be ahead)"
    wall = datetime.fromtimestamp(epoch, tz).replace(tzinfo=None)
    first, second = (wall.replace(tzinfo=tz, fold=f).timestamp() for f in (0, 1))
    if first != second:
        return epoch, f"{wall:%Y-%m-%d %H:%M:%S} occurs twice in {tz} (the clocks go back)"
    return None

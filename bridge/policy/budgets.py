"""Daily caps on texts, SMS parts and cost, overall and per route, and the admin's warnings.

Days are UTC. A batch that would cross a cap is split: what fits goes, the rest waits
for the next day (`budget.on_exceeded = "wait"`, nothing lost) or fails with the reason
("fail"). A reload that raises or removes a cap has what waits judged again at once, not
at midnight (`loosened`); so does a start where a cap a waiting text ran into is higher
than its reason says (`raised_over`). A text over a cap on its own (more parts than `parts_per_day`, or costing
more than `cost_per_day`) fails either way, saying so: no day could hold it. The first
time each cap (at its value) bites in a day, and when the provider's balance falls
below `budget.low_balance`, the admin recipients get one warning text; warnings are
never held back by the caps they report.

Per API token (`tokens.NAME.texts_per_day`): what the messages stored with that token's
name sent today, so a leaked or looping CI token cannot spend the whole day's budget. Its
warning is its own (one a day per token): a token that hit its cap does not mute the
warning of the overall cap, nor another token's. An SMTP user's cap
(`smtp.user_texts_per_day.LOGIN`) is the same cap over what its mail sent (stored with
the token `smtp:LOGIN`): a device that logs in is as able to loop as a CI job.

The cost cap (`budget.cost_per_day`, in the provider's currency) counts what today's sent
messages cost (the provider's figure, else the estimate made at ingest, else one made now)
plus the estimate for the next one, from the price list the dispatcher fetches. A country
the list does not price is counted at its highest price: a cap that guards against toll
fraud must not let the unpriced destinations through for free. A country the list gives
at 0 is free: 0 is a price. With no list (its path is undocumented; a fetch may fail: the
dispatcher tries again with backoff, and daily) a country is priced by what its parts
were billed last, else by the most a part was billed (within a day of that bill: a price
cut lowers it a day later; `pricing.BILLED_MAX_FOR`), and such a text goes alone (its bill
prices its country: four texts to a dearer country priced by a cheaper one's bill went
in one call); before any bill (or with nothing priced above 0), one text goes alone and
its bill prices the rest (a whole bulk call counted as free once spent the day's cap
many times over). A text whose only
price is such a guess larger than the whole cap is treated the same way (alone, on a day
with room, its bill prices its country), never failed as larger than the budget: that is
said of a text by its own price only.

A text whose send answer gave no cost, sent while nothing was priced above 0, cost what
nobody can tell: counted as 0, the cap never held. The cap is then taken as possibly
spent: what follows waits for 00:00 UTC (or fails, as `on_exceeded` says), the reason
saying "spend unknown", until a price is known (the list answers, a bill says its cost,
or the store recalls one at start), when what waits for it (and only that) is judged
again at once; in a cluster, any instance that knows a price also releases them within a
minute (`Dispatcher.release_holds`: the one that held them may be gone for good), and one
that knows none leaves what was released today to it (`for_a_priced_instance`). A cap
is a promise about money: with a provider that never states a cost and no price list, at
most one text a day goes under a cost cap.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bridge.clock import Clock
from bridge.config import BudgetConfig, ProviderConfig, Recipients, RouteConfig, TokenConfig
from bridge.errors import StoreUnavailable
from bridge.models import SMTP_SENDER, Message
from bridge.policy.shaping import Draft, Shaper
from bridge.pricing import PriceBook
from bridge.store import Store

log = logging.getLogger(__name__)
WARNING_SOURCE = "budget"
# Why texts wait when a text sent today has no cost anyone can tell (`_spent`).
UNKNOWABLE = "spend unknown: a text sent today had no cost and no price is known"


# The start of a text's event when a reload released it; after it, the instance and the
# caps in force there (`BudgetGuard.released_by_reload`), each NAME=VALUE.
RELEASED_BY_RELOAD = "daily caps changed by a reload: judged again"
CAPS_THERE = "whose caps are "
# Who judged a text by which caps, at the end of its event (`BudgetGuard.judged`).
JUDGED_BY = re.compile(rf"\(by (?P<owner>.+?), {CAPS_THERE}[^()]*\)$")
RELEASE_CAP = re.compile(
    r"(texts_per_day|parts_per_day|cost_per_day|routes\.[^=\s,]+|tokens\.[^=\s,]+"
    r"|smtp\.user_texts_per_day\.[^=\s,]+)=([0-9.e+-]+)"
)


def day_bounds(now: float) -> tuple[float, float, str]:
    """Start and end of the UTC day holding `now`, and its date."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), (day + timedelta(days=1)).timestamp(), day.strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class Cap:
    """A cap a message ran into: why (in its reason, "texts_per_day=3") and which daily
    warning tells the admins (`cap:NAME=VALUE` for the overall and route caps, one per
    token)."""

    why: str
    warning: str = "cap"
    # The message alone is over the cap: no day can hold it, so it fails whatever
    # `on_exceeded` says (waiting would requeue it every midnight for ever).
    never: bool = False


# The cap a held text's reason names ("daily budget reached (texts_per_day=1); ..."),
# by its key in `BudgetGuard.caps` (a route's or token's with its field after it).
CAP_IN_REASON = re.compile(
    r"\((?P<name>texts_per_day|parts_per_day|cost_per_day|routes\.\S+\.max_texts_per_day"
    r"|tokens\.\S+\.texts_per_day|smtp\.user_texts_per_day\.\S+)=(?P<value>[0-9.e+-]+)"
)


def smtp_token(login: str) -> str:
    """The `token` an SMTP user's messages are stored with: no API token's name holds a
    `:`, so no API token's cap counts them, nor an SMTP user's an API token's."""
    return f"{SMTP_SENDER}{login}"


def token_cap_name(token: str) -> str:
    """The key of the cap on what `token` sends, as a reason names it."""
    if token.startswith(SMTP_SENDER):
        return f"smtp.user_texts_per_day.{token.removeprefix(SMTP_SENDER)}"
    return f"tokens.{token}.texts_per_day"


def token_cap_key(token: str) -> str:
    """Its key in `BudgetGuard.caps`: as `raised_over` reads a reason's cap back."""
    name = token_cap_name(token)
    return name.rsplit(".", 1)[0] if name.startswith("tokens.") else name


def figure(value: float) -> str:
    """`value` as short as it reads back exactly: a reason names the cap in force, and
    `raised_over` reads it back. `:g` (six digits) wrote 12345.25 as 12345.2, and every
    start took that cap for raised while the bridge was stopped."""
    exact = (t for p in range(6, 18) if float(t := f"{value:.{p}g}") == value)
    return next(exact, repr(value))


def _cap(name: str, more: str = "") -> Cap:
    """An overall or route cap, warned of once a day per cap and value: a cap raised by a
    reload that bites again is told again (one warning a day for every cap, the admins
    never heard that the cap they had just raised was reached too)."""
    return Cap(f"{name}{more}", f"cap:{name}")


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: list[Message]
    over: list[Message]
    caps: list[Cap] = field(default_factory=list)  # the cap of each of `over`, in order
    # Not decided yet: an unpriced text goes alone, so with one (or a priced text) already
    # going in this batch the others stay queued, due: the next step prices them.
    later: list[Message] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return self.caps[0].why if self.caps else None


class BudgetGuard:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        budget: BudgetConfig,
        routes: Mapping[str, RouteConfig],
        recipients: Recipients,
        provider: ProviderConfig,
        shaper: Shaper,
        prices: PriceBook | None = None,
        tokens: Mapping[str, TokenConfig] | None = None,
        smtp_users: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.prices = prices or PriceBook()
        # Warnings are shaped as every other text is (transliterated, cut, priced).
        self.shaper = shaper
        self.clock = clock
        self.sender_id = provider.sender_id  # the bridge's own texts: fixed until restart
        self.over_cap_total = 0  # messages held back or failed by a cap, for metrics
        # Texts another instance released for a cap it has higher (a reload there, not
        # here) that this one held again: caps differ across the cluster (`mismatched`).
        self.cap_mismatch_total = 0
        # A reload raised or removed a cap: what waits for midnight is judged again now
        # (the dispatcher's next step, `Dispatcher.release_holds`), not tomorrow. At
        # start, the dispatcher asks `raised_over` of what waits instead: True here
        # released every held text at each start as "changed by a reload".
        self.loosened = False
        self.caps: dict[str, float] = {}  # every cap in force by name (`_caps`)
        # Texts wait for midnight because today's spend was unknowable (`newly_priced`).
        self._unknowable_hold = False
        self.reload(
            budget=budget,
            routes=routes,
            recipients=recipients,
            tokens=tokens or {},
            smtp_users=smtp_users or {},
        )

    def reload(
        self,
        *,
        budget: BudgetConfig,
        routes: Mapping[str, RouteConfig],
        recipients: Recipients,
        tokens: Mapping[str, TokenConfig],
        smtp_users: Mapping[str, int] | None = None,
    ) -> None:
        """Take the caps, admins and low-balance mark (at start and on SIGHUP).
        `smtp_users`: `smtp.user_texts_per_day`, by login.

        The admins are resolved first, by the resolver every ingress uses: an InputError
        there leaves the running budget as it was.
        """
        admins = recipients.resolve(budget.admin, field="budget.admin")
        self.config = budget
        self.route_caps: dict[str, int] = {
            name: route.max_texts_per_day
            for name, route in routes.items()
            if route.max_texts_per_day > 0
        }
        # By the `token` messages are stored with: an API token's name, `smtp:LOGIN`.
        self.token_caps: dict[str, int] = {
            name: token.texts_per_day for name, token in tokens.items() if token.texts_per_day > 0
        }
        self.token_caps.update(
            {smtp_token(login): cap for login, cap in (smtp_users or {}).items() if cap > 0}
        )
        self.admins = admins
        before, self.caps = self.caps, self._caps()
        # Raised, or gone (0 or no longer named: no cap). A cap only lowered or added
        # holds back nothing that waits already.
        self.loosened = self.loosened or any(
            name not in self.caps or self.caps[name] > cap for name, cap in before.items()
        )

    def raised_over(self, reasons: Iterable[str]) -> bool:
        """Whether a cap that held back a text (its reason names it, "texts_per_day=1")
        is higher now, or gone: raised while the bridge was stopped. A reason that names
        no cap this bridge knows is judged again too (nothing waits for nothing). One
        that waits for a price (`UNKNOWABLE`) is watched for by `newly_priced`, which
        releases those texts alone once a price is known (already, or later): True here
        released every text waiting for a cap, held again at once."""
        for reason in reasons:
            if UNKNOWABLE in reason:
                self._unknowable_hold = True  # released when a price is (`newly_priced`)
            found = CAP_IN_REASON.search(reason)
            if found is None:
                return True
            name, value = found["name"], float(found["value"])
            if name.startswith(("routes.", "tokens.")):  # routes.NAME.max_texts_per_day
                name = name.rsplit(".", 1)[0]
            if name not in self.caps or self.caps[name] > value:
                return True
        return False

    def released_by_reload(self, owner: str) -> str:
        """The event of a text a reload on `owner` released (`judged`)."""
        return self.judged(RELEASED_BY_RELOAD, owner)

    def judged(self, detail: str, owner: str) -> str:
        """`detail`, the event of a text `owner` held or released by its caps (a reload,
        a start, a price), naming the caps in force there: another instance that holds
        the text again tells that its own differ (`mismatched`). Only a reload's named
        them: a text released at start or for a price, or held by a higher cap till
        midnight, and held again by a lower one elsewhere, was held again silently."""
        caps = ", ".join(f"{name}={figure(cap)}" for name, cap in sorted(self.caps.items()))
        return f"{detail} (by {owner}, {CAPS_THERE}{caps or 'none'})"

    @staticmethod
    def held_before(m: Message) -> bool:
        """Whether `m` waited for a daily cap and was released other than by the day's
        end (due then, at 00:00): by a reload, a start or a price."""
        return m.reason_kind == "budget" and m.due_at % 86400 != 0

    async def for_a_priced_instance(self, due: list[Message]) -> list[Message]:
        """What of `due` this instance leaves to one that knows a price: texts held
        because today's spend was unknown, released today by an instance that knows a
        price (or by a reload or start), while this one knows none. Judged here, they
        were held again at once (spend still unknown here), and released again by the
        priced instance a minute later: an event each a minute, every text, until the
        priced instance won the race to claim them. At midnight (due at 00:00, a new
        day's spend) any instance judges them, and this one too once it knows a price."""
        if not self.config.cost_per_day or self.prices.ceiling() > 0:
            return []
        start, _, _ = day_bounds(self.clock.now())
        released = [
            m
            for m in due
            if self.held_before(m) and m.due_at >= start and UNKNOWABLE in (m.reason or "")
        ]
        if released:  # another instance's bill may price them here too
            await self.recall_prices()
        return released if self.prices.ceiling() == 0 else []

    async def mismatched(self, m: Message, cap: Cap, owner: str) -> str | None:
        """Whether `m`, which `owner` (this instance) holds by `cap`, was last judged by
        another instance whose cap of that name is higher (or none): released by its
        reload, its start or its price, or held by it till midnight (`judged`). Caps are
        each instance's own config, and one that has not reloaded holds again what
        another released. That instance's event, else None."""
        held = CAP_IN_REASON.search(f"({cap.why}")  # as its reason will name it
        if held is None:
            return None
        name = held["name"]
        if name.startswith(("routes.", "tokens.")):
            name = name.rsplit(".", 1)[0]
        judged = [
            (found["owner"], e["detail"])
            for e in await self.store.events(m.id)
            if (found := JUDGED_BY.search(e["detail"] or "")) is not None
        ]
        if not judged or judged[-1][0] == owner:  # its own judgement: nothing differs
            return None
        theirs = dict(RELEASE_CAP.findall(judged[-1][1].partition(CAPS_THERE)[2]))
        if name in theirs and float(theirs[name]) <= float(held["value"]):
            return None
        return str(judged[-1][1])

    def _caps(self) -> dict[str, float]:
        """Every daily cap in force by name; none of them 0."""
        c = self.config
        caps: dict[str, float] = {
            "texts_per_day": c.texts_per_day,
            "parts_per_day": c.parts_per_day,
            "cost_per_day": c.cost_per_day,
        }
        caps.update({f"routes.{name}": cap for name, cap in self.route_caps.items()})
        caps.update({token_cap_key(name): cap for name, cap in self.token_caps.items()})
        return {name: cap for name, cap in caps.items() if cap > 0}

    @property
    def active(self) -> bool:
        return bool(
            self.config.texts_per_day
            or self.config.parts_per_day
            or self.config.cost_per_day
            or self.route_caps
            or self.token_caps
        )

    def _cost(
        self, recipient: str, parts: int, known: float | None = None
    ) -> tuple[float | None, bool]:
        """What one message costs or will cost, and whether that is its own price (stored,
        listed or billed for its country) or the highest price known, counted where its
        own is not; None where nothing is priced above 0 (no list, or one of free
        entries only, and nothing billed yet): an unknown destination is never free."""
        if known is not None:
            return known, True
        estimate = self.prices.estimate(recipient, parts)
        if estimate is not None:
            return estimate, True
        ceiling = self.prices.ceiling()
        return (ceiling * parts if ceiling > 0 else None), False

    async def billed(self, cost: float, sent: list[tuple[str, int]]) -> None:
        """The provider billed `cost` for `sent` (recipient, parts): the prices it says
        are kept in the store too, for a restart and the other instances. In memory only,
        a restart with no price list counted the day's texts at nothing until a bill came
        (a whole bulk call went past the cap as "unpriced, alone")."""
        learnt = self.prices.billed(cost, sent, self.clock.now())
        if not learnt:
            return
        try:
            await self.store.record_billed(learnt, self.clock.now())
        except StoreUnavailable as exc:  # the send is recorded; this process knows it
            log.warning("prices learnt from a bill not kept in the store: %s", exc)

    async def recall_prices(self) -> None:
        """What the store kept of the bills (before a restart, and the other instances')."""
        self.prices.remember(await self.store.billed_prices())

    async def _spent(self, since: float) -> tuple[float, bool]:
        """Today's cost so far, in the provider's currency: summed in SQL where a cost or
        estimate is stored; the rare rows with neither are estimated here. And whether
        some of it is unknowable: a text whose answer gave no cost, sent while nothing
        was priced above 0 (counted as 0, the cap never held: one text after another
        went alone, each "priced by its bill", a bill that never said)."""
        known, unknown = await self.store.spent_since(since, WARNING_SOURCE)
        priced = [self._cost(r, int(p))[0] for r, p in unknown]
        return float(known) + sum(c for c in priced if c is not None), None in priced

    def newly_priced(self) -> bool:
        """Whether texts wait for midnight only because today's spend was unknowable,
        and a price is known now (the list answered, a bill said its cost): they are
        judged again (until `released_for_price`)."""
        return self._unknowable_hold and self.prices.ceiling() > 0

    @property
    def waiting_for_price(self) -> bool:
        """Texts wait for midnight because today's spend was unknowable (`newly_priced`)."""
        return self._unknowable_hold

    def released_for_price(self) -> None:
        """What waited for a price was released (`newly_priced`)."""
        self._unknowable_hold = False

    async def _used(
        self, since: float, route: str | None = None, token: str | None = None
    ) -> tuple[int, int]:
        return await self.store.used_since(since, WARNING_SOURCE, route, token=token)

    async def check(self, batch: list[Message]) -> Verdict:
        if not self.active:
            return Verdict(batch, [])
        start, _, _ = day_bounds(self.clock.now())
        texts, parts = await self._used(start)
        cost_cap = self.config.cost_per_day
        if cost_cap:  # another instance's bills price countries for this one too
            await self.recall_prices()
        spent, unknowable = await self._spent(start) if cost_cap else (0.0, False)
        # Texts sent today per capped route and token, read from the store (so every
        # instance of a cluster counts the same) the first time the batch needs one.
        route_used: dict[str, int] = {}
        token_used: dict[str, int] = {}
        allowed, over, caps, later = [], [], [], []
        unpriced = False  # an unpriced text is in `allowed`: the others wait for its bill
        priced_allowed = False  # a priced text is in `allowed`: an unpriced one waits
        for m in batch:
            if m.source == WARNING_SOURCE:
                allowed.append(m)
                continue
            priced, own = (
                self._cost(m.recipient, m.parts, m.estimated_cost) if cost_cap else (0.0, True)
            )
            # Nothing to price it by, or only a guess: another country's price that no
            # day could hold, or (no price list) the most another country's part was
            # billed. It goes alone, on a day with room left, and its bill prices its
            # country. Failed as "larger than the daily budget" on that guess, a 0.5
            # text never went once a 1.5 one had been billed; priced by a 0.5 bill, four
            # 1.5 texts went in one call and spent 2.5 times the cap.
            guess = priced is None or (not own and (priced > cost_cap or not self.prices.listed))
            # Alone: counted at 0 beside priced texts, it let them fill the cap and its
            # bill came on top.
            if unpriced or (guess and priced_allowed):
                later.append(m)
                continue
            # A guess is counted as guessed where a day could hold it, else at 0.
            fits = priced is not None and (not guess or priced <= cost_cap)
            cost = (priced or 0.0) if fits else 0.0
            route, token = m.route or "", m.token or ""
            cap = self.route_caps.get(route)
            if cap is not None and route not in route_used:
                route_used[route] = (await self._used(start, route=route))[0]
            token_cap = self.token_caps.get(token)
            if token_cap is not None and token not in token_used:
                token_used[token] = (await self._used(start, token=token))[0]
            why: Cap | None = None
            if (never := self._never_fits(m, cost)) is not None:
                why = never
            elif token_cap is not None and token_used[token] + 1 > token_cap:
                # First: a runaway token is told apart from the day's budget running out.
                why = Cap(f"{token_cap_name(token)}={token_cap}", f"token:{token}")
            elif self.config.texts_per_day and texts + 1 > self.config.texts_per_day:
                why = _cap(f"texts_per_day={self.config.texts_per_day}")
            elif self.config.parts_per_day and parts + m.parts > self.config.parts_per_day:
                why = _cap(f"parts_per_day={self.config.parts_per_day}")
            elif cap is not None and route_used[route] + 1 > cap:
                why = _cap(f"routes.{m.route}.max_texts_per_day={cap}")
            elif cost_cap and unknowable:
                # A text of today's cost what nobody can tell: the cap may be spent.
                self._unknowable_hold = True
                why = _cap(f"cost_per_day={figure(cost_cap)}", f"; {UNKNOWABLE}")
            elif cost_cap and (spent + cost > cost_cap or (guess and spent >= cost_cap)):
                currency = f" {self.prices.currency}" if self.prices.currency else ""
                why = _cap(f"cost_per_day={figure(cost_cap)}", f"{currency}, {spent:g} spent")
            if why:
                over.append(m)
                caps.append(why)
                continue
            allowed.append(m)
            unpriced, priced_allowed = unpriced or guess, priced_allowed or not guess
            texts, parts = texts + 1, parts + m.parts
            spent += cost
            if cap is not None:
                route_used[route] += 1
            if token_cap is not None:
                token_used[token] += 1
        self.over_cap_total += len(over)
        return Verdict(allowed, over, caps, later)

    def _never_fits(self, m: Message, cost: float) -> Cap | None:
        """The cap `m` (costing `cost`) is over on its own, on a day with nothing else sent."""
        parts_cap = self.config.parts_per_day
        if parts_cap and m.parts > parts_cap:
            return Cap(f"parts_per_day={parts_cap}, it has {m.parts} parts", never=True)
        cost_cap = self.config.cost_per_day
        if cost_cap and cost > cost_cap:
            currency = f" {self.prices.currency}" if self.prices.currency else ""
            return Cap(f"cost_per_day={figure(cost_cap)}{currency}, it costs {cost:g}", never=True)
        return None

    async def warn(self, kind: str, text: str) -> bool:
        """Queue one warning to the admins per kind and day; False if already sent today."""
        if not self.admins:
            return False
        _, _, date = day_bounds(self.clock.now())
        now = self.clock.now()
        draft = Draft(
            recipients=self.admins,
            text=text,
            source=WARNING_SOURCE,
            sender_id=self.sender_id,
            dedupe_key=f"{kind}:{date}",  # stored as budget:KIND:DATE: once a day
            topic="budget",
        )
        messages = self.shaper.messages([draft])
        queued = await self.store.queue_once(messages, now)
        if queued:
            log.warning("budget warning to %d admin(s): %s", len(self.admins), text)
        return queued

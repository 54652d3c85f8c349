"""The overview's chart as geometry for a server-rendered SVG (pure; no script, no library).

Bars: provider requests per minute, the unit the provider's rate limit counts; a dashed
line at the limit. A line over them: messages sent per minute (a bulk call carries many,
so it may stand above the limit line without breaking it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 26  # room for the axis labels


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str  # a tooltip: "02:14 UTC: 12 requests, 40 messages"


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    plot_left: float
    plot_right: float
    plot_top: float
    plot_bottom: float
    bars: list[Bar]
    messages_line: str  # SVG polyline points
    limit_y: float
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    peak_requests: int
    peak_messages: int


def _nice_top(value: float) -> int:
    """A round axis top at or above `value`: 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^n."""
    magnitude = 1
    while True:
        for step in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8):
            top = int(step * magnitude)
            if top >= value and top == step * magnitude:
                return top
        magnitude *= 10


def build(
    requests: list[int], messages: list[int], *, limit: int, since: float, bucket: float
) -> Chart:
    """Geometry for `len(requests)` buckets of `bucket` seconds starting at `since`."""
    count = max(1, len(requests))
    top = _nice_top(max([limit, *requests, *messages, 1]) * 1.1)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    step = plot_w / count

    def y_of(value: float) -> float:
        return round(TOP + plot_h - plot_h * value / top, 1)

    def when(index: int) -> str:
        return datetime.fromtimestamp(since + index * bucket, UTC).strftime("%H:%M")

    bars = [
        Bar(
            x=round(LEFT + i * step, 1),
            y=y_of(n),
            width=round(max(step - 0.6, 0.6), 2),
            height=round(TOP + plot_h - y_of(n), 1),
            label=f"{when(i)} UTC: {n} requests, {messages[i]} messages",
        )
        for i, n in enumerate(requests)
        if n or messages[i]
    ]
    points = " ".join(
        f"{round(LEFT + (i + 0.5) * step, 1)},{y_of(n)}" for i, n in enumerate(messages)
    )
    x_every = max(1, count // 6)
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot_left=LEFT,
        plot_right=WIDTH - RIGHT,
        plot_top=TOP,
        plot_bottom=TOP + plot_h,
        bars=bars,
        messages_line=points,
        limit_y=y_of(limit),
        y_ticks=[Tick(y_of(v), str(v)) for v in (0, top // 2, top)],
        x_ticks=[Tick(round(LEFT + i * step, 1), when(i)) for i in range(0, count, x_every)],
        peak_requests=max(requests, default=0),
        peak_messages=max(messages, default=0),
    )

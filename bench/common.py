"""What the benchmarks share: free loopback ports and servers run as subprocesses."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(args: list[str], port: int, env: dict[str, str], cwd: str) -> Iterator[int]:
    """Run `args` until the block ends; yield its pid once `port` accepts connections."""
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.1)
        time.sleep(1.0)  # let start-up settle (idle RSS is read right after)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def bridge_env(tmp: str, port: int, **settings: str) -> dict[str, str]:
    """This environment less any SMS_BRIDGE_ setting, plus what points `serve` at `port`
    (HTTP only) and a store in `tmp`, and `settings` (more variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    return dict(
        env,
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{port}",
        SMS_BRIDGE_SMTP_LISTEN="",
        SMS_BRIDGE_STORE_PATH=f"{tmp}/bench.db",
        **settings,
    )


SANDBOX_KEY = "bench-key"


@contextlib.contextmanager
def sandbox_provider(
    env: dict[str, str], cwd: str, *, requests_per_minute: int = 100
) -> Iterator[dict[str, str]]:
    """`sms-bridge sandbox` in a process of its own, as a remote provider would be; yield
    the settings that point a bridge at it (its work then stays out of the bridge's loop)."""
    port = free_port()
    args = [sys.executable, "-m", "bridge", "sandbox", "--listen", f"127.0.0.1:{port}"]
    args += ["--requests-per-minute", str(requests_per_minute)]
    with server([*args, "--api-key", SANDBOX_KEY], port, env, cwd):
        yield {
            "SMS_BRIDGE_PROVIDER_BASE_URL": f"http://127.0.0.1:{port}/api/v1",
            "SMS_BRIDGE_PROVIDER_API_KEY": SANDBOX_KEY,
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc: per request, a
    figure that a busy neighbour disturbs far less than throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average(avg: tuple[float, float, float]) -> str:
    """`os.getloadavg()` as uptime prints it."""
    return " ".join(f"{x:.2f}" for x in avg)


def report_instructions(base: str, count: int, unit: str) -> None:
    """Instructions per `unit` (a request, a mail) in the measured dump (the second) of
    each thread callgrind wrote as `base.2-*` (app_instr.py, smtp_instr.py)."""
    for path in sorted(Path(base).parent.glob(Path(base).name + ".2-*")):
        text = path.read_text()
        total = re.search(r"^summary: (\d+)", text, re.M) or re.search(
            r"^totals: (\d+)", text, re.M
        )
        assert total is not None
        print(f"{path.name}: {int(total.group(1)) / count:12,.0f} instructions a {unit}")

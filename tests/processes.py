"""Test plumbing for the bridge as a real process: start it, find the port it bound, wait.

Servers started here listen on port 0 and the test reads the port the child actually
bound from its log (`serve` logs "HTTP listening on 127.0.0.1:PORT", `sandbox` logs
"sandbox provider on http://127.0.0.1:PORT/api/v1"). Picking a free port in the test and
handing it to the child races with every other process on this shared machine; a fixed
port (8080, 2525) collides outright.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

# What each listener announces, and the address group in it.
ANNOUNCEMENTS = {
    "HTTP": r"HTTP listening on (\S+)",
    "SMTP": r"SMTP listening on (\S+)",
    "SMTPS": r"SMTPS listening on (\S+)",
    "sandbox": r"sandbox provider on http://(\S+)/api/v1",
}
ANY_PORT = "127.0.0.1:0"
SEND_TOKEN = "send-token-0123456789abcdef"
SENDER_CONFIG = f"""
[http]
listen = "{ANY_PORT}"
{{http}}
[smtp]
listen = ""
[store]
path = "{{db}}"
[tokens.sender]
token = "{SEND_TOKEN}"
scopes = ["send"]
[routes.open]
format = "generic"
to = ["+12025550101"]
public = true
"""


def free_port() -> int:
    """A port free a moment ago: only for programs that cannot bind 0 and say where
    (Postfix's listener). The bridge and the sandbox bind 0 themselves: see `Child`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SMS_BRIDGE_* setting the test runner may carry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMS_BRIDGE_")}
    env.update(extra)
    return env


def run_command(
    args: list[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m bridge ARGS` to its end, its output captured as text (in this process's
    directory and environment unless given)."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


class Child(subprocess.Popen[bytes]):
    """`python -m bridge ...` writing to a log file, which other children may share."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        # Where this child's output starts: a restarted child announces a new port.
        self.log_start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            super().__init__(
                [sys.executable, "-m", "bridge", *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def address(self, what: str = "HTTP", timeout: float = 30.0) -> str:
        """The `host:port` this child announced for `what` (a key of ANNOUNCEMENTS)."""
        pattern = re.compile(ANNOUNCEMENTS[what])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search(self.output())
            if found:
                return found.group(1).rstrip('",')
            if self.poll() is not None:
                raise AssertionError(
                    f"exited {self.returncode} before announcing {what}:\n{self.output()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no {what} address announced in {timeout}s:\n{self.output()}")

    def url(self, what: str = "HTTP") -> str:
        return f"http://{self.address(what)}"

    def port(self, what: str = "HTTP") -> int:
        return int(self.address(what).rpartition(":")[2])


def sender_config(tmp_path: Path, http: str = "") -> Path:
    """A `serve` config in `tmp_path`: HTTP on any port (more `[http]` keys in `http`),
    no SMTP, a `send` token (SEND_TOKEN) and a public generic route, `/hooks/open`."""
    config = tmp_path / "bridge.toml"
    config.write_text(SENDER_CONFIG.format(http=http, db=tmp_path / "bridge.db"))
    config.chmod(0o600)
    return config


@contextlib.contextmanager
def process(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Child]:
    """Run the child for the `with` block; kill it if the test left it running."""
    proc = Child(args, cwd, env, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` until it is truthy (connection errors count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            result = check()
            if result:
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")

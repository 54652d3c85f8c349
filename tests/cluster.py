"""The chaos harness (#13 item 7): several `sms-bridge serve` processes on one PostgreSQL
database, and the sandbox provider in a process of its own, whose record of what it
received is the judge.

Every process binds port 0 and the harness reads the bound address from its log
(tests/processes.py). Each instance gets its own config file and log, a distinct
`cluster.instance` name, and the same `store.url`. The database is read directly (one
short connection per look) for the final states; the sandbox's `/_sandbox/entries` and
`/_sandbox/requests` for what really went out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.postgres import run_async
from tests.processes import ANY_PORT, Child, clean_env, wait_for

KEY = "chaos-key"
PHONES = ("+12025550181", "+12025550182")  # the alertmanager route's recipients
UNFINISHED = ("queued", "sending")  # every other state is final and carries a reason


@dataclass
class Instance:
    name: str
    proc: Child

    @property
    def http(self) -> str:
        return self.proc.url("HTTP")

    @property
    def smtp_port(self) -> int:
        return self.proc.port("SMTP")

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, its claims left in `sending`."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class Cluster:
    """Start with `cluster()`; `start(name)` adds an instance."""

    root: Path
    store_url: str
    rate: int  # provider.requests_per_minute of every instance
    lease: str
    extra: str  # more TOML for every instance's config
    sandbox: Child | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=clean_env)

    @property
    def sandbox_url(self) -> str:
        assert self.sandbox is not None
        return self.sandbox.url("sandbox")

    def start_sandbox(self, rate: int) -> None:
        args = ["sandbox", "--listen", ANY_PORT, "--api-key", KEY]
        self.sandbox = Child(
            [*args, "--requests-per-minute", str(rate)],
            self.root,
            self.env,
            self.root / "sandbox.log",
        )
        wait_for(lambda: httpx.get(f"{self.sandbox_url}/_sandbox/requests").status_code == 200)

    def config(self, name: str) -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(
            textwrap.dedent(f"""
            [http]
            listen = "{ANY_PORT}"
            [smtp]
            listen = "{ANY_PORT}"
            [store]
            url = "{self.store_url}"
            [cluster]
            instance = "{name}"
            lease = "{self.lease}"
            [provider]
            base_url = "{self.sandbox_url}/api/v1"
            api_key = "{KEY}"
            requests_per_minute = {self.rate}
            [status]
            poll_interval = "1s"
            [routes.alertmanager]
            format = "alertmanager"
            to = {list(PHONES)!r}
            allowed_networks = ["127.0.0.0/8"]
            """).replace("'", '"')
            + textwrap.dedent(self.extra)
        )
        return path

    def start(self, name: str) -> Instance:
        args = ["serve", "--config", str(self.config(name))]
        instance = Instance(name, Child(args, self.root, self.env, self.root / f"{name}.log"))
        self.instances[name] = instance
        return instance

    def ready(self) -> None:
        """Wait until every running instance answers /readyz with 200."""
        for instance in self.instances.values():
            if instance.proc.poll() is None:
                url = f"{instance.http}/readyz"

                def answers(url: str = url) -> bool:
                    return httpx.get(url).status_code == 200

                wait_for(answers, what=f"{url} ready")

    def stop(self) -> None:
        for child in [*(i.proc for i in self.instances.values()), self.sandbox]:
            if child is not None and child.poll() is None:
                child.kill()
            if child is not None:
                child.wait(timeout=10)

    def logs(self) -> str:
        """Every process's log, for a failing assertion's message."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- the judges ---------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every SMS the provider took, as its /logs would list it."""
        return list(httpx.get(f"{self.sandbox_url}/_sandbox/entries", timeout=10).json())

    def requests(self) -> list[dict[str, Any]]:
        """Every request the provider received: `at` (its clock), path, status."""
        return list(httpx.get(f"{self.sandbox_url}/_sandbox/requests", timeout=10).json())

    def fault(self, **fault: Any) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/faults", json=fault, timeout=10)

    def rows(self, sql: str = "SELECT * FROM messages ORDER BY id", *args: Any) -> list[dict]:
        return query(self.store_url, sql, *args)

    def settled(self, timeout: float = 40.0) -> list[dict]:
        """Wait until no message is queued or sending; return every message row."""

        def done() -> list[dict] | None:
            rows = self.rows()
            return None if any(r["state"] in UNFINISHED for r in rows) else rows or None

        try:
            return wait_for(done, timeout=timeout, what="every message in a final state")
        except AssertionError:
            pending = [r for r in self.rows() if r["state"] in UNFINISHED]
            raise AssertionError(f"unsettled: {pending[:10]}\n{self.logs()}") from None


def query(url: str, sql: str, *args: Any) -> list[dict]:
    async def run() -> list[dict]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return run_async(run)


@contextlib.contextmanager
def cluster(
    root: Path,
    store_url: str,
    *,
    rate: int,
    sandbox_rate: int | None = None,
    lease: str = "5s",
    extra: str = "",
) -> Iterator[Cluster]:
    """A sandbox process and room for instances, all killed when the block ends."""
    chaos = Cluster(root, store_url, rate, lease, extra)
    try:
        chaos.start_sandbox(sandbox_rate or rate)
        yield chaos
    finally:
        chaos.stop()


def judge(rows: list[dict], acked: set[str], entries: list[dict]) -> dict[str, int]:
    """Nothing acknowledged lost, nothing duplicated that the provider's /logs can tell.

    Every acknowledged text is stored, and each of its messages is at the provider or in
    a final state with a reason; a text reaches the provider at most once per recipient,
    unless its outcome was unknown (then it was resent on purpose, and says so).
    """
    stored = {r["text"] for r in rows}
    assert not acked - stored, f"acknowledged but not stored: {sorted(acked - stored)[:10]}"
    reached = Counter((e["to"], e["message"]) for e in entries)
    for r in rows:
        if r["text"] not in acked:
            continue
        taken = reached[(r["recipient"], r["text"])]
        if r["state"] in ("sent", "delivered"):
            assert taken >= 1, f"{r['state']} but never at the provider: {r}"
        else:
            assert r["state"] not in UNFINISHED and r["reason"], f"no final state: {r}"
        if taken > 1:
            assert "unknown" in (r["reason"] or ""), f"texted {taken} times: {r}"
    return {
        "acknowledged": len(acked),
        "reached": sum(
            1 for r in rows if r["text"] in acked and reached[(r["recipient"], r["text"])]
        ),
        "duplicates": sum(1 for n in reached.values() if n > 1),
    }


def pids_of_connections(url: str, sql: str) -> set[int]:
    """The OS processes (of this machine) that own the PostgreSQL sessions `sql` selects
    by their `client_port`: which instance holds a lock, say."""
    ports = {r["client_port"] for r in query(url, sql)}
    inodes = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        if local_port in ports:
            inodes[fields[9]] = local_port
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners.add(int(pid))
    return owners

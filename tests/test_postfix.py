"""A real Postfix on loopback relays `NUMBER@sms.test` to the bridge (docs/recipes.md).

Needs Debian's postfix package and root (for Postfix's queue ownership); `.ci/run`
installs it where it can, and this test is skipped where it could not.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from bridge.clock import ManualClock
from bridge.provider.sandbox import SandboxState
from tests.helpers import bridge_config, pump, running_bridge
from tests.processes import free_port
from tests.test_smtp import smtp_listening

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("postfix") is None or os.geteuid() != 0,
        reason="needs the postfix package and root",
    ),
]


def _postfix_config(folder: Path, listen: int, bridge: int) -> None:
    (folder / "queue").mkdir()
    (folder / "data").mkdir()
    shutil.chown(folder / "data", "postfix")
    (folder / "main.cf").write_text(
        textwrap.dedent(f"""
        compatibility_level = 3.6
        queue_directory = {folder}/queue
        data_directory = {folder}/data
        inet_interfaces = 127.0.0.1
        inet_protocols = ipv4
        myhostname = relay.test
        mydestination =
        mynetworks = 127.0.0.0/8
        relay_domains = sms.test
        transport_maps = inline:{{sms.test=smtp:[127.0.0.1]:{bridge}}}
        smtp_dns_support_level = disabled
        maillog_file = {folder}/maillog
        maillog_file_prefixes = {folder}
        alias_maps =
        alias_database =
    """)
    )
    master = Path("/etc/postfix/master.cf").read_text()
    master = re.sub(
        r"^smtp\s+inet\s.*$", f"127.0.0.1:{listen} inet n - n - - smtpd", master, flags=re.M
    )
    # No chroot: the queue lives in a temporary folder.
    master = re.sub(r"^(\S+\s+\S+\s+[-yn]\s+[-yn]\s+)y(\s)", r"\1n\2", master, flags=re.M)
    (folder / "master.cf").write_text(master)


def _start_postfix(listen: int, bridge: int) -> tuple[Path, subprocess.Popen[bytes]]:
    # Postfix's own user must reach its data folder: pytest's tmp_path is root-only.
    folder = Path(tempfile.mkdtemp(prefix="sms-bridge-postfix-"))
    folder.chmod(0o755)
    _postfix_config(folder, listen, bridge)
    master = subprocess.Popen(
        ["postfix", "-c", str(folder), "start-fg"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return folder, master


def _stop_postfix(folder: Path, master: subprocess.Popen[bytes]) -> None:
    subprocess.run(["postfix", "-c", str(folder), "stop"], capture_output=True, timeout=30)
    master.terminate()
    master.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


def _hand_to_postfix(port: int) -> None:
    for _ in range(100):
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                client.sendmail(
                    "ups@relay.test",
                    ["+12025550143@sms.test"],
                    "Subject: UPS on battery\r\n\r\nRuntime 12 min\r\n",
                )
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("postfix never accepted the mail")


async def test_mail_handed_to_postfix_reaches_the_sandbox(
    tmp_path, clock: ManualClock, sandbox_state: SandboxState, sandbox_url: str
) -> None:
    postfix_port = free_port()
    config = bridge_config(tmp_path, sandbox_url, '[smtp]\ndomains = ["sms.test"]\n')
    async with running_bridge(config, clock) as (bridge, _), smtp_listening(bridge) as port:
        folder, master = await asyncio.to_thread(_start_postfix, postfix_port, port)
        try:
            await asyncio.to_thread(_hand_to_postfix, postfix_port)
            for _ in range(300):  # Postfix delivers on its own schedule, in real time
                if await bridge.store.counts():
                    break
                await asyncio.sleep(0.1)

            async def sent() -> bool:
                counts = await bridge.store.counts()
                return bool(counts) and not counts.get("queued") and not counts.get("sending")

            await pump(bridge, clock, sent, max_seconds=60)
        finally:
            await asyncio.to_thread(_stop_postfix, folder, master)
    assert [(e.to, e.message) for e in sandbox_state.entries] == [
        ("+12025550143", "UPS on battery\nRuntime 12 min")
    ]

"""The `[[smtp.rules]]` recipes of docs/recipes.md, loaded as a user would, over mails of
each sender's shape: each picks the line that matters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.config import load_config
from bridge.ingress.mail import compose, parse_mail
from bridge.ingress.mailrules import apply_rule, rule_for
from bridge.text import truncate_to_parts
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TOML_BLOCK = re.compile(r"```toml\n(.*?)```", re.DOTALL)

# mail -> (the recipe that must apply, the SMS text it gives)
CASES = {
    "mail/nagios-service.eml": (
        "nagios",
        "** PROBLEM Service Alert: web-01/HTTP is CRITICAL **\n"
        "HTTP CRITICAL - No data received from host",
    ),
    "mail/icinga-host.eml": (
        "nagios",
        "[PROBLEM] Host db-2 is DOWN!\ndb-2 is DOWN!\n"
        "Info: CRITICAL - 127.0.0.32: rta nan, lost 100%",
    ),
    "mail/zabbix-problem.eml": (
        "zabbix",
        "Problem: High CPU utilization (over 90% for 5m)\nHost: db-2\nSeverity: Warning\n"
        "Operational data: 93.4 %",
    ),
    "mail/apcupsd-onbatt.eml": (
        "apcupsd",
        "nas-2 UPS ups-rack3 Power Failure !!!\nSTATUS : ONBATT\nLOADPCT : 41.0 Percent\n"
        "BCHARGE : 96.0 Percent\nTIMELEFT : 17.4 Minutes",
    ),
    # apcupsd before 3.14 writes no "UPS NAME" in its subject
    "recipes/apcupsd-3.12-onbattery.eml": (
        "apcupsd",
        "files-2 Power Failure !!!\nSTATUS : ONBATT",
    ),
    "recipes/nut-onbatt.eml": ("nut", "UPS rack2@ups-host.example.org on battery"),
    "recipes/smartd-offline-uncorrectable.eml": (
        "smartd",
        "SMART error (OfflineUncorrectableSector) detected on host: backup-3\n"
        "Device: /dev/sda [SAT], 24 Offline uncorrectable sectors",
    ),
    "recipes/mdadm-degraded.eml": (
        "mdadm",
        "Fail event on /dev/md/1:files-1\n"
        "A Fail event had been detected on md device /dev/md/1.\n"
        "It could be related to component device /dev/sdb2.\n"
        "976630464 blocks super 1.2 [2/1] [U_]\n523264 blocks super 1.2 [2/2] [UU]",
    ),
    "mail/proxmox-vzdump-failed.eml": (
        "proxmox vzdump",
        "vzdump backup status (pve-2.example.org) : backup failed\n"
        "203: 2026-11-26 01:14:32 ERROR: Backup of VM 203 failed - vma_queue_write: write"
        " error - No space left on device\n203 db-1 err 00:01:31 0.00MB -\n"
        "203: 2026-11-26 01:14:31 ERROR: vma_queue_write: write error - No space left on device",
    ),
    "recipes/fail2ban-banned.eml": (
        "fail2ban",
        "[Fail2Ban] postfix-sasl: banned 198.51.100.23 from mail-1.example.org\n"
        "12 attempts against postfix-sasl.\nNetName: TEST-NET-2\n"
        "OrgName: Internet Assigned Numbers Authority",
    ),
    "recipes/netdata-critical.eml": (
        "netdata",
        "\U0001f534 web-4 critical - disk space usage - disk_space._var",
    ),
    "mail/synology-nas.eml": (
        "nas",
        "[DS918] Volume 1 on DS918 has entered degraded mode\n"
        "Volume 1 on DS918 has entered degraded mode [Drive 3 has failed]."
        " Please repair it as soon as possible.",
    ),
    "recipes/qnap-error.eml": (
        "nas",
        "[nas-7] Error: [Storage & Snapshots] Disk 3 failed\nServer Name: nas-7\n"
        "IP Address: 192.0.2.70\nDate/Time: 2026/11/26 10:00:00\nLevel: Error\n"
        "[Storage & Snapshots] Host: Disk 3 failed. Replace it and rebuild RAID Group 1.",
    ),
    "mail/jenkins-build-failed.eml": (
        "jenkins",
        "Build failed in Jenkins: payments-api #912\n"
        "FAILED tests/test_refunds.py::test_partial_refund - AssertionError\n"
        "[dana] Bump httpx to 0.28\nBuild step 'Execute shell' marked build as failure",
    ),
    # The last error failed the build; the traceback before it was survived (|| true),
    # and "onerror(" in it is no error line: the recipe's words match whole words.
    "recipes/jenkins-onerror-traceback.eml": (
        "jenkins",
        "Build failed in Jenkins: firmware #318\n"
        'meson.build:41:0: ERROR: Dependency "libssl" not found\n'
        "+ meson setup --wipe build\nTraceback (most recent call last):\n"
        'File "/usr/lib/python3.11/shutil.py", line 738, in rmtree\n'
        "onerror(os.path.islink, path, sys.exc_info())\n"
        "OSError: Cannot call rmtree on a symbolic link\n+ true\n+ meson setup build\n"
        "Dependency zlib found: YES 1.2.13\n"
        "Build step 'Execute shell' marked build as failure",
    ),
    "mail/cron-output.eml": (
        "cron",
        "Cron <root@backup-01> /usr/local/bin/nightly-backup.sh\n"
        "rsync: [sender] write error: Broken pipe (32)\n"
        "rsync error: error in socket IO (code 10) at io.c(823) [sender=3.2.7]\n"
        "backup FAILED after 00:00:07",
    ),
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    blocks = TOML_BLOCK.findall((ROOT / "docs" / "recipes.md").read_text(encoding="utf-8"))
    recipes = "\n".join(b for b in blocks if "[[smtp.rules]]" in b)
    assert recipes.count("[[smtp.rules]]") >= 10
    path = write_config(tmp_path_factory.mktemp("recipes"), recipes)
    return load_config(path, env={}).smtp.rules


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_recipe_picks_the_line_that_matters(rules, name: str) -> None:
    recipe, expected = CASES[name]
    mail = parse_mail((DATA / name).read_bytes())
    rule = rule_for(rules, mail, None)
    assert rule is not None and rule.name == recipe
    text = compose(apply_rule(rule, mail), rule.compose or "subject_body")
    assert text == expected
    assert truncate_to_parts(text, 3) == text  # nothing that matters is cut


def test_recipes_leave_other_mail_alone(rules) -> None:
    for name in ("mail/emoji.eml", "mail/gmail-alternative.eml", "mail/windows-1252.eml"):
        assert rule_for(rules, parse_mail((DATA / name).read_bytes()), None) is None, name

"""The shared corpus of real senders' mails and payloads, replayed through the listeners.

The corpus (`../shared/corpus/`, next to the repository) belongs to its authors and is not
part of the project; where it is absent this test is skipped. Each input goes in the way
its sender sends it (`bench/corpus.py`: SMTP with smtplib, webhooks with httpx, signed),
and the texts the bridge stored are checked against what a person on call should read.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from bridge.clock import ManualClock
from bridge.models import Message, State
from tests.helpers import bridge_config, running_bridge
from tests.test_smtp import smtp_listening

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
_spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
assert _spec is not None and _spec.loader is not None
replay = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = replay  # dataclasses look their module up while it loads
_spec.loader.exec_module(replay)

MOJIBAKE = re.compile("\ufffd|Ã[\u0080-\u00bf]|â€|[\u0080-\u009f]")
# No news on a phone: a rule of one character, a mobile footer, a reply's intro.
NOISE = re.compile(
    r"^(([-=_*#~+.])\2{3,}|Sent from my \w+|On .{5,200} wrote:|-+ ?Original Message ?-+)$",
    re.MULTILINE | re.IGNORECASE,
)
# Mail a monitor, a cron job or CI wrote: texted, never taken for a loop.
MACHINE_MAIL = ("mail/cron_", "mail/jenkins_", "mail/mdadm_", "mail/apcupsd_", "mail/rendered_")
LOOPS = ("bounce", "dsn", "autoreply")
# What the fixed readings must be (the stored text, as the provider gets it).
EXPECTED = {
    "mail/cron_cronie_postfix_php_not_found.eml": (
        "Cron <root@izuf6hxtmn3a1egw9z21hjz> php /root/code/test/crontabTest.php\n"
        "/bin/sh: php: command not found"
    ),
    "github/octokit_workflow_job.completed.failure.json": (
        "GitHub Codertocat/Hello-World: job CodeQL / linters failure on main (3484a3f),"
        " step: Run yarn run format-check"
    ),
    "github/octokit_check_run.completed.failure.json": (
        "GitHub Codertocat/Hello-World: check Octocoders-linter failure on changes (ec26c3e)"
    ),
    # two alerts on one host: the host once, not "andromeda +1"
    "alertmanager/zulip_firing_2alerts.json": (
        "[FIRING:2] High CPU Temperature andromeda: High CPU core temperature"
    ),
    "grafana/zulip_legacy_alerting.json": (
        "[ALERTING] Test rule: Someone is testing the alert notification within grafana."
        " (High value=100, Higher Value=200)"
    ),
    "grafana/zulip_legacy_ok.json": (
        "[OK] Test rule: Someone is testing the alert notification within grafana."
    ),
    "grafana/zulip_legacy_v7_nodata.json": "[ALERTING] No Data alert: The panel has no data.",
    "grafana/zulip_unified_v9_resolved.json": (
        "[RESOLVED] Test alert otherhost.example.com: This is a summary field, failure on ?"
    ),
}
STARTS = {
    "mail/apcupsd_onbattery_forum_paste_no_from.eml": "tubuntu2 Power Failure !!!\nAPC : ",
    # the git plugin's " > git ..." console lines kept, the rule of dashes left out
    "mail/jenkins_build_failed_libcamera_via_list.eml": (
        "Build failed in Jenkins: libcamera #175\n"
        "See <https://builder.linuxtv.org/job/libcamera/175/display/redirect?page=changes>\n"
        "Changes:\n[laurent.pinchart] ipa: Only sign IPA modules that are being installed\n"
        "Started by an SCM change\n"
    ),
    "mail/mikel_windows-1252_raw_subject.eml": (
        "Formação FrenetikPolis: Mega Campanha Final Verão | Cursos de Setembro"
    ),
    "mail/mailparser_declared_gb2312_but_utf8_body.eml": "代开各地增值税发票\n你好\uff01我公司可代开",
    "mail/enmime_incorrect-charset_8bit_utf8_as_ascii.eml": "plain text\nUsing Unicode/UTF-8",
    "grafana/zulip_unified_v11_firing_values.json": (
        "[FIRING:1] Memory (copy) node_exporter: High memory usage (A="
    ),
}
# CI failures: each names the repository and what failed.
CI_FAILURES = {
    "github/octokit_workflow_job.completed.failure.json": ("Codertocat/Hello-World", "linters"),
    "github/octokit_check_run.completed.failure.json": (
        "Codertocat/Hello-World",
        "Octocoders-linter",
    ),
    "gitlab/datakit_job.failed.json": ("pengyonghui/datakit", "job release-testing"),
    "gitlab/datakit_pipeline.failed.json": ("pengyonghui/datakit", "pipeline #110437"),
    "gitlab/zulip_deployment_hook.failed.json": ("vedant8600317/test", "deployment to production"),
}


@pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"the shared corpus is not here ({CORPUS}): it belongs to its authors, not the repo",
)
@pytest.mark.slow  # over ~2 s
async def test_the_shared_corpus_reads_right(tmp_path, clock: ManualClock, sandbox_url) -> None:
    config = bridge_config(tmp_path, sandbox_url, replay.ROUTES)
    stored: dict[str, list[Message]] = {}
    answers: dict[str, str] = {}
    async with running_bridge(config, clock) as (bridge, url), smtp_listening(bridge) as port:
        for delivery in replay.deliveries(CORPUS):
            await asyncio.to_thread(replay.send, delivery, url, port)
            answers[delivery.name] = delivery.answer
            stored[delivery.name] = [m for i in delivery.ids if (m := await bridge.store.get(i))]
    assert len(answers) >= 60, sorted(answers)
    for name, answer in answers.items():  # 250 for a mail; 202 or 200 (ignored) for a hook
        assert answer.startswith(("250 ", "202 ", "200 ")), (name, answer)
    texts = {name: messages[0].text for name, messages in stored.items() if messages}
    for name, text in texts.items():
        assert not MOJIBAKE.search(text), (name, text)
        assert not NOISE.search(text), (name, text)
    for name, messages in stored.items():
        suppressed = {m.state for m in messages} == {State.SUPPRESSED}
        if any(key in name for key in LOOPS):
            assert messages and suppressed, (name, answers[name])
        elif name.startswith(MACHINE_MAIL):
            assert messages and not suppressed, (name, [m.reason for m in messages])
    for name, expected in EXPECTED.items():
        assert texts.get(name) == expected, (name, answers[name])
    for name, start in STARTS.items():
        assert texts.get(name, "").startswith(start), (name, texts.get(name))
    jenkins = texts["mail/jenkins_build_failed_libcamera_via_list.eml"]
    assert "> git rev-parse --is-inside-work-tree" in jenkins, jenkins
    for name, (repository, what) in CI_FAILURES.items():
        assert repository in texts.get(name, "") and what in texts[name], (name, answers[name])

"""[[smtp.rules]] as pure functions: which rule a mail meets, which lines it keeps."""

from __future__ import annotations

from pathlib import Path

from bridge.config import MailRule
from bridge.ingress.mail import MailText, compose, parse_mail
from bridge.ingress.mailrules import apply_rule, rule_for
from bridge.text import truncate_to_parts

MAIL_DIR = Path(__file__).parent / "data" / "mail"
BODY = "Notification Type: PROBLEM\nService: Disk /var\nHost: db-2\nState: CRITICAL\nInfo: 97% used"


def mail(sender: str = "Nagios <nagios@mon.example.org>", subject: str = "PROBLEM") -> MailText:
    return MailText(subject=subject, body=BODY, sender=sender, message_id=None)


def test_first_matching_rule_wins_on_sender_glob_or_envelope_and_subject() -> None:
    nagios = MailRule(name="nagios", sender=("nagios@*",))
    ups = MailRule(name="ups", subject=r"power (failure|is back)")
    both = MailRule(name="both", sender=("*@mon.example.org",), subject="^RECOVERY")
    rules = [both, nagios, ups]
    assert rule_for(rules, mail(), None) is nagios  # From address, case-insensitive
    assert rule_for(rules, mail(sender="", subject="x"), "NAGIOS@mon.example.org") is nagios
    assert rule_for(rules, mail(subject="RECOVERY Service"), None) is both
    assert rule_for(rules, mail(sender="root@nas", subject="nas Power Failure !!!"), None) is ups
    assert rule_for(rules, mail(sender="root@nas", subject="disk"), "root@nas") is None


def test_keep_drop_first_line_and_max_lines() -> None:
    picked = apply_rule(MailRule(sender=("*",), keep=("^(State|Host|Info):",)), mail())
    assert picked.body == "Host: db-2\nState: CRITICAL\nInfo: 97% used"
    dropped = apply_rule(MailRule(sender=("*",), drop=("notification type", "^service")), mail())
    assert dropped.body == "Host: db-2\nState: CRITICAL\nInfo: 97% used"
    first = apply_rule(
        MailRule(sender=("*",), first_line_matching="^info:", keep=("^State",)), mail()
    )
    assert first.body == "Info: 97% used\nState: CRITICAL"  # found even where keep left it out
    led = apply_rule(MailRule(sender=("*",), first_line_matching="^serv", drop=("^serv",)), mail())
    assert led.body.split("\n")[:2] == ["Service: Disk /var", "Notification Type: PROBLEM"]
    cut = apply_rule(MailRule(sender=("*",), drop=("^Notif",), max_lines=2), mail())
    assert cut.body == "Service: Disk /var\nHost: db-2"
    nothing = apply_rule(MailRule(sender=("*",), keep=("no such line",)), mail())
    assert compose(nothing, "subject_body") == "PROBLEM"  # an empty body: the subject alone


def test_last_line_matching_puts_the_last_match_first_after_the_first_match() -> None:
    log = "ERROR: cache miss (retried)\nbuild step 2\nERROR: linker failed\nFinished"
    build = MailText(subject="Build failed", body=log, sender="ci@example.org", message_id=None)
    last = apply_rule(MailRule(sender=("*",), last_line_matching="^error:"), build)
    assert last.body == "ERROR: linker failed\nERROR: cache miss (retried)\nbuild step 2\nFinished"
    both = apply_rule(
        MailRule(sender=("*",), first_line_matching="step", last_line_matching="^error:"), build
    )
    assert both.body.split("\n")[:2] == ["build step 2", "ERROR: linker failed"]
    same = apply_rule(
        MailRule(sender=("*",), first_line_matching="linker", last_line_matching="^error:"), build
    )
    assert same.body.count("linker") == 1


def test_without_a_rule_the_failed_vm_is_cut_off_with_one_it_comes_first() -> None:
    parsed = parse_mail((MAIL_DIR / "proxmox-vzdump-failed.eml").read_bytes())
    plain = truncate_to_parts(compose(parsed, "subject_body"), 3)
    assert "Backup of VM 203 failed" not in plain
    rule = MailRule(
        subject="^vzdump", keep=("ERROR",), first_line_matching=r"Backup of VM \d+ failed"
    )
    text = truncate_to_parts(compose(apply_rule(rule, parsed), "subject_body"), 3)
    assert "Backup of VM 203 failed" in text[:160]

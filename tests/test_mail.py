"""Mail to text, as a pure function: cleaning rules and a fuzzer."""

from __future__ import annotations

from email.message import EmailMessage

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.mail import MailText, clean_body, compose, parse_mail


def test_signature_quotes_and_blank_lines_are_dropped() -> None:
    body = "Disk  full\t on db-2\n\n\n> earlier\n> mail\nSecond line\n-- \nOps team\n555-0100"
    assert clean_body(body) == "Disk full on db-2\nSecond line"
    assert clean_body("Yes.\n\nOn Mon, 1 Jan 2026 at 10:00, Sam wrote:\nold text") == "Yes."


def test_compose_modes() -> None:
    mail = MailText(subject="UPS on battery", body="Runtime 12 min", sender="", message_id=None)
    assert compose(mail, "subject") == "UPS on battery"
    assert compose(mail, "body") == "Runtime 12 min"
    assert compose(mail, "subject_body") == "UPS on battery\nRuntime 12 min"
    repeated = MailText(subject="Disk full", body="Disk full on db-2", sender="", message_id=None)
    assert compose(repeated, "subject_body") == "Disk full on db-2"
    empty = MailText(subject="", body="", sender="", message_id=None)
    assert compose(empty, "subject_body") == ""


def test_html_only_mail_becomes_readable_text() -> None:
    message = EmailMessage()
    message["Subject"] = "Alert"
    message.set_content(
        "<html><head><script>steal()</script><style>p{}</style></head><body>"
        "<p>Disk &gt; 90% on <b>db-2</b></p><a href='https://x.example/very/long"
        "?q=1'>Open</a></body></html>",
        subtype="html",
    )
    mail = parse_mail(message.as_bytes())
    assert mail.body == "Disk > 90% on db-2\nOpen"


def test_plain_preferred_over_html() -> None:
    message = EmailMessage()
    message["Subject"] = "x"
    message.set_content("plain version")
    message.add_alternative("<p>html version</p>", subtype="html")
    assert parse_mail(message.as_bytes()).body == "plain version"


def test_unknown_charset_and_broken_encodings_do_not_raise() -> None:
    raw = (
        b"Subject: =?x-unknown?q?caf=E9?=\r\nContent-Type: text/plain; charset=x-klingon\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64\xff\xfe\r\n"
    )
    mail = parse_mail(raw)
    assert isinstance(mail.body, str) and isinstance(mail.subject, str)


def test_loop_detection() -> None:
    assert parse_mail(b"Subject: x\r\n\r\nbody", mail_from="").loop_reason
    assert parse_mail(b"Auto-Submitted: auto-generated\r\n\r\nbody").loop_reason
    assert parse_mail(b"Auto-Submitted: no\r\n\r\nbody").loop_reason is None
    assert parse_mail(b"Subject: x\r\n\r\nbody", mail_from="a@b").loop_reason is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    mail = parse_mail(raw, mail_from="x@y")
    assert isinstance(mail.subject, str) and isinstance(mail.body, str)


header_names = st.sampled_from(
    [
        "Subject",
        "From",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Auto-Submitted",
        "Message-ID",
        "MIME-Version",
    ]
)
header_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "text/html; charset=utf-8",
            "multipart/alternative; boundary=b",
            "text/plain; charset=iso-8859-2",
            "base64",
            "quoted-printable",
            "=?utf-8?b?w6k=?=",
            "=?iso-8859-1?q?caf=E9?=",
            "multipart/report",
        ]
    ),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(header_names, header_values), max_size=8), st.binary(max_size=2000))
def test_mail_shaped_input_never_raises(headers: list[tuple[str, str]], body: bytes) -> None:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", errors="replace")
    mail = parse_mail(head + b"\r\n" + body)
    assert "\x00" not in mail.body

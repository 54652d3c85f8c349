"""The shortest secret a caller may authenticate with: API tokens, route tokens, route
basic-auth passwords and HMAC secrets under `MIN_SECRET_CHARS` are refused by
`check-config`, `serve` and a reload alike (one validation), each by its key, with the
command that makes a good one, and never with the secret itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.config import (
    MAKE_SECRET,
    MAKE_SMTP_PASSWORD,
    MIN_SECRET_CHARS,
    MIN_SMTP_PASSWORD_CHARS,
    load_config,
)
from bridge.errors import ConfigError
from tests.helpers import write_config
from tests.test_protected import run

SHORT = "x" * (MIN_SECRET_CHARS - 1)
LONG = "y" * MIN_SECRET_CHARS
TO = 'to = ["+12025550143"]\n'

# (the config with the secret as {}, the key it is refused under)
PLACES = [
    ('[tokens.ci]\ntoken = "{}"\nscopes = ["send"]\n', "tokens.ci.token"),
    ('[routes.r]\nformat = "generic"\n' + TO + 'token = "{}"\n', "routes.r.token"),
    (
        '[routes.r]\nformat = "generic"\n' + TO + 'username = "jenkins"\npassword = "{}"\n',
        "routes.r.password",
    ),
    ('[routes.r]\nformat = "grafana"\n' + TO + 'secret = "{}"\n', "routes.r.secret"),
    ('[routes.r]\nformat = "github"\n' + TO + 'secret = "{}"\n', "routes.r.secret"),
    ('[routes.r]\nformat = "gitlab"\n' + TO + 'secret = "{}"\n', "routes.r.secret"),
]


def _made_by(command: str) -> str:
    """What a secret-making command a refusal names prints, run as the operator would
    (python3 on PATH may not be this interpreter: the venv's own)."""
    return subprocess.run(
        command.replace("python3", sys.executable, 1),
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.parametrize(("body", "key"), PLACES, ids=[k for _, k in PLACES])
def test_a_short_secret_is_refused_by_its_key(tmp_path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, body.format(SHORT)), env={})
    problems = dict(refused.value.problems)
    assert list(problems) == [key]
    assert f"at least {MIN_SECRET_CHARS} characters" in problems[key]
    assert MAKE_SECRET in problems[key]
    assert SHORT not in str(refused.value)
    load_config(write_config(tmp_path, body.format(LONG)), env={})  # long enough: accepted


def test_a_short_secret_from_the_environment_is_refused_too(tmp_path) -> None:
    path = write_config(tmp_path, PLACES[3][0].format(LONG))
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={"SMS_BRIDGE_ROUTES_R_SECRET": SHORT})
    assert [k for k, _ in refused.value.problems] == ["routes.r.secret"]


@pytest.mark.slow  # subprocesses
def test_check_config_and_serve_refuse_it_and_the_advised_command_makes_one(tmp_path) -> None:
    body = '[routes.gh]\nformat = "github"\n' + TO + 'secret = "{}"\n'
    short = write_config(
        tmp_path, f'[store]\npath = "{tmp_path / "b.db"}"\n' + body.format("hunter2")
    )
    for command in ("check-config", "serve"):
        result = run(command, "--config", str(short), cwd=tmp_path)
        assert result.returncode == 78, (command, result.stderr)
        assert "  routes.gh.secret: too short" in result.stderr, result.stderr
        assert MAKE_SECRET in result.stderr
        assert "hunter2" not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "b.db").exists()  # refused before anything opened
    made = _made_by(MAKE_SECRET)  # the command the message names
    assert len(made) >= MIN_SECRET_CHARS
    good = write_config(tmp_path, body.format(made), "good.toml")
    assert run("check-config", str(good), cwd=tmp_path).returncode == 0


def test_the_floor_is_sixteen_characters(tmp_path) -> None:
    body = '[routes.r]\nformat = "grafana"\n' + TO + 'secret = "{}"\n'
    with pytest.raises(ConfigError):
        load_config(write_config(tmp_path, body.format("0123456789abcde")), env={})  # 15
    load_config(write_config(tmp_path, body.format("0123456789abcdef")), env={})  # 16


@pytest.mark.slow  # runs the secret-making command
def test_an_smtp_password_shorter_than_nists_floor_is_refused(tmp_path) -> None:
    """`[smtp.users]` passwords are the only factor of an SMTP login: under the 15
    characters NIST SP 800-63B-4 sets for such a password, refused by the user's key (from
    the file, a `*_file` or the environment alike), never printing the password."""
    assert MIN_SMTP_PASSWORD_CHARS == 15
    short, enough = "ups-pass-01234", "ups-pass-012345"  # 14 and 15 characters
    (tmp_path / "nas.pw").write_text(short + "\n")
    body = f'[smtp]\nusers = {{ups = "{short}", nas_file = "nas.pw", pdu = "{enough}"}}\n'
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, body), env={})
    problems = dict(refused.value.problems)
    assert sorted(problems) == ["smtp.users.nas", "smtp.users.ups"]
    assert "an SMTP password needs at least 15 characters" in problems["smtp.users.ups"]
    made = _made_by(MAKE_SMTP_PASSWORD)  # fits a device's 15-character field
    assert MAKE_SMTP_PASSWORD in problems["smtp.users.ups"] and len(made) == 15
    assert short not in str(refused.value)
    (tmp_path / "nas.pw").write_text(enough + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, body), env={"SMS_BRIDGE_SMTP_USERS": f"ups={short}"})
    assert [k for k, _ in refused.value.problems] == ["smtp.users.ups"]
    body = body.replace(short, enough)
    assert load_config(write_config(tmp_path, body), env={}).smtp.users["ups"] == enough

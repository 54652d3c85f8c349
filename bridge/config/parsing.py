"""Reading one value: durations, listen addresses, environment strings, `[[smtp.rules]]`.

Each function raises ValueError saying what was expected; the loader turns that into a
problem under the key's path.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
import urllib.parse
from typing import Any

from bridge.config.sections import COMPOSE_MODES, MAIL_RULE_KEYS, MailRule

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


# Longest duration any key means (a century). TOML's `inf` and `nan`, or "9999999999d",
# passed check-config and then broke where the bridge waits: a thread's wait raises
# OverflowError past ~292 years, a datetime past year 9999, and nan compares false to
# everything (a timeout never reached, a retention never due).
DURATION_MAX = 100 * 365 * 86400.0
# Largest integer any key takes: Python's sqlite3 cannot bind one past 2**63
# (OverflowError), and JSON readers of check-config's output lose precision past 2**53.
INTEGER_MAX = 2**53


def parse_duration(value: object) -> float:
    """`30s`, `10m`, `1.5h`, `2d`, `250ms` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 10m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        # min: TOML's integers have no bound here, and float() of 10**400 overflows
        seconds = float(min(value, DURATION_MAX * 2))
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 30s, 10m, 2h or 1d")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not seconds <= DURATION_MAX:  # nan too
        raise ValueError(f"{value!r} is not a duration of at most {DURATION_MAX / 86400:.0f}d")
    return seconds


def _finite(value: float) -> float:
    if not math.isfinite(value) or abs(value) > INTEGER_MAX:
        raise ValueError(f"{value!r} is not a number this key can take")
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{value!r} has no host")
    if host.endswith("."):
        # `localhost.` passed as loopback (protected mode), but a name ending in a dot
        # skips the hosts file when bound: asked of DNS, no such name or any address.
        raise ValueError(
            f"{value!r}: write {host.rstrip('.')}, without the final '.' (a name ending"
            " in '.' is looked up in DNS, not in the hosts file)"
        )
    if host == "*":  # nginx's way: check-config took it, then serve could not bind it
        raise ValueError(
            f"{value!r}: '*' is no address; every address is 0.0.0.0 (IPv4) or [::] (both)"
        )
    return host, int(port)


def _pairs(text: str, what: str) -> list[list[str]]:
    """`name=VALUE,name2=VALUE2` as [name, VALUE] pairs; `what` names VALUE in the error."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"expected name={what} pairs separated by commas")
    return pairs


def from_env_text(text: str, kind: str, default: object, secret: bool = False) -> object:
    """Turn an environment string into the type of the key it overrides. A `secret`
    table's values (`SMS_BRIDGE_SMTP_USERS=ups=PASSWORD`) are kept as written, spaces
    and all, for the loader to refuse: trimmed, the password in force was not the one
    given, and no one said so."""
    if kind == "table":  # name=value,name2=value2
        return {k.strip(): v if secret else v.strip() for k, v in _pairs(text, "value")}
    if kind in ("rules", "lists"):  # a TOML array of inline tables, or an inline table
        return _toml_value(text)
    if kind == "counts":  # name=N,name2=M
        pairs = _pairs(text, "number")
        try:
            return {k.strip(): int(v) for k, v in pairs}
        except ValueError:
            raise ValueError("expected name=number pairs: a number is not an integer") from None
    if kind == "list":
        if text.strip().startswith("["):
            return _toml_value(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "duration":
        return text
    return _env_scalar(text, default)


def _toml_value(text: str) -> object:
    """One TOML value written in the environment. Read as the document `v = TEXT`, what
    followed the value on a line of its own (`[...]` then `extra = 1`, or a `[table]`)
    was parsed as more keys and dropped without a word: refused instead."""
    document = tomllib.loads(f"v = {text}")
    if after := [key for key in document if key != "v"]:
        raise ValueError(
            f"text after the value ({after[0]!r} ...): one TOML value only, on its own"
        )
    return document["v"]


def _env_scalar(text: str, default: object) -> object:
    """An environment string as the boolean, integer, number or text `default` is."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not {'an integer' if isinstance(default, int) else 'a number'}"
        ) from None
    return text


def coerce(value: object, kind: str, default: object, base: str | None = None) -> object:
    """Check a TOML value against the key's type; raise ValueError saying what was expected.

    `base`: the directory relative file names are read from (`resolve_path`)."""
    if kind == "duration":
        return parse_duration(value)
    if kind == "rules":
        if not isinstance(value, list):
            raise ValueError("expected an array of tables [[smtp.rules]]")
        return tuple(_mail_rule(index, table) for index, table in enumerate(value))
    if kind == "table":
        return _text_table(value, base)
    if kind == "list":
        return _strings(value)
    if kind == "counts":
        return _counts(value)
    if kind == "lists":
        return _string_lists(value)
    return _scalar(value, default)


def _text_table(value: object, base: str | None) -> dict[str, str]:
    """A table of name = "text", where `name_file` = a file name reads `name` from the
    file (`read_secret_file`)."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('expected a table of name = "text"')
    twice = sorted(k for k in value if f"{k}_file" in value)
    if twice:  # the later one silently won
        raise ValueError(f"{twice[0]!r} set twice, as {twice[0]} and {twice[0]}_file: keep one")
    return {
        k.removesuffix("_file"): read_secret_file(v, base) if k.endswith("_file") else v
        for k, v in value.items()
    }


def _counts(value: object) -> dict[str, int]:
    """A table of name = integer."""
    if not isinstance(value, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value.values()
    ):
        raise ValueError("expected a table of name = integer")
    return dict(value)


def _string_lists(value: object) -> dict[str, tuple[str, ...]]:
    """A table of name = ["text", ...] (a lone "text" for a list of one)."""
    if not isinstance(value, dict):
        raise ValueError('expected a table of name = ["text", ...]')
    try:
        return {k: _strings(v) for k, v in value.items()}
    except ValueError as exc:
        raise ValueError(f'expected a table of name = ["text", ...]: {exc}') from None


def _scalar(value: object, default: object) -> object:
    """A boolean, integer, number or string, as `default` is one."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if abs(value) > INTEGER_MAX:
            raise ValueError(f"{value} is larger than any count or size this key means")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        if isinstance(value, int) and abs(value) > INTEGER_MAX:  # float() may overflow
            raise ValueError(f"{value} is larger than any amount this key means")
        return _finite(float(value))
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def config_dir(path: str | os.PathLike[str]) -> str:
    """The directory relative paths in the config file at `path` are read from: its own,
    made absolute now so that neither a later chdir nor the error messages depend on the
    directory the file was named from. Symlinks are not followed: the directory the
    operator named the file in is the one they read the paths against (as Prometheus)."""
    return os.path.dirname(os.path.abspath(path))


def resolve_path(value: str, base: str | None) -> str:
    """A file name as the config means it. Written in a config file (`base`, from
    `config_dir`), a relative name is relative to that file's directory, as in
    Prometheus' or nginx's configs: `/etc/sms-bridge/config.toml` naming "api-key" means
    `/etc/sms-bridge/api-key`, not a file in the unit's WorkingDirectory. `base` None
    (not written in a file: see `bridge.config.loader._Loader`) leaves it to the current
    directory. "" (unset) and absolute names stay as they are."""
    if base is None or not value or os.path.isabs(value):
        return value
    return os.path.join(base, value)


# A secret is a line (a key, a password, a URL); a config is pages of TOML. Anything
# larger is a wrong file named (a log, a disk image, /dev/zero), not a config.
SECRET_FILE_MAX = 64 * 1024
CONFIG_FILE_MAX = 4 * 1024 * 1024


def read_regular_file(path: str, limit: int) -> str:
    """The text of the regular file `path`, refused (ValueError naming the file) when it
    is anything else or larger than `limit` bytes. `read_text()` on a FIFO blocked until
    a writer came (`serve` hung at start; inside a reload the bridge stopped answering
    reloads for good) and on /dev/zero read until memory ran out. Opened non-blocking so
    that a FIFO is only looked at, then judged by the descriptor actually opened (no
    window between a check of the name and the read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)  # before fdopen, which refuses a directory with no name in its error
        raise ValueError(f"{path!r} is {_file_kind(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path!r} is larger than {limit // 1024} KiB: not the file meant")
    try:
        # A byte order mark (Notepad's "UTF-8") marks the encoding, it is no text: left
        # in, a config failed as "Invalid statement (at line 1, column 1)" and a secret
        # file's key carried an invisible character the provider refused.
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path!r} is not UTF-8 text: {exc}") from None


def store_file_problem(path: str) -> str | None:
    """Why `path` names no SQLite file the bridge can keep private and find again, in
    words, or None: an SQLite URI (SQLite reads it as one, the bridge's own steps, the
    private file, the serve lock and the commands' checks, as a file name: a stray empty
    file named after it, the store not private), `:memory:` (every message lost at exit,
    acknowledged or not, and the API, the console and the commands reading databases of
    their own, empty), or nothing (SQLite's temporary database: the same). Judged for
    `store.path` and for every path the commands take for a store (`store copy --from`)."""
    if not path.strip():
        return (
            "is empty: SQLite would open a temporary database, every message lost at"
            " exit; write the store file's path"
        )
    if path.startswith("file:"):
        return (
            "an SQLite URI: write the store file's path (a file whose name starts with"
            " file: as ./file:...)"
        )
    if path == ":memory:":
        return (
            "a store in memory keeps nothing: every message would be lost at exit, and"
            " the API and the console would read an empty database of their own;"
            " write a file's path"
        )
    return None


def file_problem(path: str) -> str | None:
    """What keeps `path` from being a regular file to read, in words, or None. Every case
    said "no such file": a directory named as the store, or a certificate that is a FIFO,
    sent the operator looking for a file that was there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a part of its path is a file, not a directory)"
    except OSError as exc:  # a directory on the way that may not be searched, a loop
        return f"cannot be looked at: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return f"is {_file_kind(mode)}, not a regular file"
    return None


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "a special file"


def read_secret_file(path: str, base: str | None = None) -> str:
    """A `*_file` secret: the file's text without its final line break (an editor's or
    `echo`'s, normal in a file). Other white space around it is kept, and refused by the
    loader for a secret (`secret_text_problem`): trimming it silently changed the secret."""
    text = read_regular_file(resolve_path(path, base), SECRET_FILE_MAX)
    return text.removesuffix("\n").removesuffix("\r")


def secret_text_problem(value: str) -> str | None:
    """Why a secret as given cannot be meant, else None: white space before or after it
    is a paste or quoting slip, and the sender's secret would never match. Refused with
    this message rather than trimmed: a secret is used exactly as written or not at all.
    A control character (a second line in a secret file) can never travel in the header
    or the AUTH line it is compared with or sent in."""
    if value and value != value.strip():
        return (
            "begins or ends with white space (a space, a tab, a blank line); a secret is"
            " used as written, never trimmed: remove it (a file's one final line break is"
            " fine)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "holds a control character (a line break inside?): a secret is one line"
    return None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a regular expression: {exc}"
    return None


def _mail_rule(index: int, table: object) -> MailRule:
    """One `[[smtp.rules]]` table, checked; ValueError names the rule and the key."""
    where = f"[{index}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(set(table) - MAIL_RULE_KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(MailRule(), key)
        if isinstance(default, tuple):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{key}: expected an integer, 0 or more")
        elif not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string")
        values[key] = value
    rule = MailRule(**values)
    if not rule.sender and not rule.subject:
        raise ValueError(f"{where}: a rule needs sender or subject to match on")
    for key in ("subject", "first_line_matching", "last_line_matching", "keep", "drop"):
        patterns = getattr(rule, key)
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            if pattern and (why := _regex_problem(pattern)):
                raise ValueError(f"{where}.{key}: {why}")
    if rule.compose and rule.compose not in COMPOSE_MODES:
        raise ValueError(f"{where}.compose: must be {', '.join(COMPOSE_MODES)}")
    if rule.compose == "template" and not rule.template:
        raise ValueError(f'{where}.template: required when compose = "template"')
    if rule.template and (why := template_problem(rule.template)):
        raise ValueError(f"{where}.template: {why}")
    return rule


def template_problem(source: str) -> str | None:
    """Why a mail template does not compile, else None. Imported here: Jinja2 is loaded
    only by a config that has a template."""
    from bridge.templates import check_template

    return check_template(source)


# Query parameters libpq and asyncpg read a password from (`?password=...`).
URL_PASSWORD_PARAMETERS = frozenset(("password", "sslpassword"))


def url_passwords(url: str) -> list[str]:
    """The passwords a URL carries, in its user part or its query, as written and
    decoded (a driver's error may quote either)."""
    try:
        parts = urllib.parse.urlsplit(url)
        written = [parts.netloc.rpartition("@")[0].partition(":")[2]] if parts.password else []
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:  # not a URL after all (validate says so): all of it is the secret
        return [url]
    if "@" in url.partition("//")[2] and "@" not in parts.netloc:
        # A user part cut short by a raw "/", "?" or "#" in the password
        # (`bridge:hunter/2@db-1`): which part is the password is a guess, so all of it.
        return [url]
    written += [
        value
        for raw in parts.query.split("&")
        for key, _, value in [raw.partition("=")]
        if urllib.parse.unquote_plus(key).lower() in URL_PASSWORD_PARAMETERS
    ]
    decoded = [urllib.parse.unquote(parts.password or "")] + [
        v for k, v in query if k.lower() in URL_PASSWORD_PARAMETERS
    ]
    return list(dict.fromkeys(p for p in written + decoded if p))

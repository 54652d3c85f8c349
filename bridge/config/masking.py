"""Secrets: every key marked `secret=True` is masked in output and logs, and found in
files (inline or `*_file`) for the permission warnings; none is listed by hand. And
`mask`, which stars them in any text (the log's filter, HTTP answers, an echoed value):
here, below every layer that quotes a sender's words, so each masks before it cuts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from bridge.config.exposure import (
    plaintext_auth_warnings,
    replayable_routes_warnings,
    unrestricted_sessions_warnings,
)
from bridge.config.parsing import (
    CONFIG_FILE_MAX,
    config_dir,
    read_regular_file,
    resolve_path,
    url_passwords,
)
from bridge.config.sections import ENV_PREFIX, SECTIONS, Config, RouteConfig, TokenConfig
from bridge.permissions import readable_by_everyone


def _masked_value(spec: dataclasses.Field[Any], value: Any) -> Any:
    if not spec.metadata.get("secret") or not value:
        return _plain(dict(value) if isinstance(value, Mapping) else value)
    if spec.metadata["secret"] == "url":  # the address is worth showing, not its passwords
        for password in url_passwords(value):
            value = value.replace(password, "***")
        return value
    return {k: "***" for k in value} if isinstance(value, Mapping) else "***"


def _plain(value: Any) -> Any:
    """Tables of tables (`[[smtp.rules]]`) as plain data, for JSON."""
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        return [dataclasses.asdict(v) for v in value]
    return value


def masked(config: Config) -> dict[str, Any]:
    """The config as plain data with every secret replaced, for logs and `check-config`."""
    out: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {
            f.name: _masked_value(f, getattr(section, f.name)) for f in dataclasses.fields(section)
        }
    out["groups"] = {k: list(v) for k, v in config.groups.items()}
    out["tokens"] = {
        k: {f.name: _masked_value(f, getattr(t, f.name)) for f in dataclasses.fields(t)}
        for k, t in config.tokens.items()
    }
    out["routes"] = {
        k: {f.name: _masked_value(f, getattr(r, f.name)) for f in dataclasses.fields(r)}
        for k, r in config.routes.items()
    }
    return out


def _tables(config: Config) -> list[tuple[str, Any]]:
    """Every config dataclass with the key prefix it is written under."""
    return [
        *((name, getattr(config, name)) for name in SECTIONS),
        *((f"routes.{k}", r) for k, r in config.routes.items()),
        *((f"tokens.{k}", t) for k, t in config.tokens.items()),
    ]


def key_fingerprint(api_key: str) -> str:
    """A short name for the provider key that does not give it away (a hash of it): two
    bridges showing the same one share the provider's per-key rate limit, which the
    bridge can pace together only when they book in the same store. "" for no key."""
    if not api_key:
        return ""
    digest = hashlib.sha256(b"sms-bridge provider key\0" + api_key.encode("utf-8"))
    return digest.hexdigest()[:12]


def secret_values(config: Config) -> list[str]:
    """Every value of a key marked `secret`, for log masking: none is hand-listed. Of a
    `secret="url"` key (the store's URL), its passwords: the log names the server."""
    out: list[str] = []
    for _, table in _tables(config):
        for spec in dataclasses.fields(table):
            value = getattr(table, spec.name)
            if spec.metadata.get("secret") == "url":
                out += url_passwords(value) if value else []
            elif spec.metadata.get("secret"):
                out += list(value.values()) if isinstance(value, Mapping) else [value]
    return [v for v in out if v]


def inline_secrets(path: str | os.PathLike[str]) -> list[str]:
    """Keys of secrets written into the file itself (not `*_file`), for the mode warning.

    The in-process sandbox's key is left out: it is served to nothing but this process
    (masked in logs all the same), and the warning's "chmod 600" on the systemd recipe's
    copy of config.example.toml, which holds it, would leave the unit's DynamicUser
    unable to read its config."""
    return [
        key for key, file in _secret_keys(path) if file is None and not key.startswith("sandbox.")
    ]


def secret_files(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(key, file) of every secret the config reads from a file (`*_file` keys), each
    file named as the loader reads it (a relative name: from the config's directory)."""
    return [(key, file) for key, file in _secret_keys(path) if file is not None]


def secret_env_files(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, file) of every secret the environment has the loader read from a file
    (`SMS_BRIDGE_PROVIDER_API_KEY_FILE`, `SMS_BRIDGE_ROUTES_<NAME>_TOKEN_FILE`, ...): any
    key may come from a `_FILE` variable, but only a secret's file holds a secret, and
    one the plain variable overrides is not read."""

    def secret_fields(cls: type) -> list[str]:
        return [
            spec.name.upper() for spec in dataclasses.fields(cls) if spec.metadata.get("secret")
        ]

    sections = {
        f"{ENV_PREFIX}{name.upper()}_{field}"
        for name, cls in SECTIONS.items()
        for field in secret_fields(cls)
    }
    named = {  # per route or token: SMS_BRIDGE_ROUTES_<NAME>_<FIELD>
        f"{ENV_PREFIX}{kind}_": tuple(f"_{field}" for field in secret_fields(cls))
        for kind, cls in (("ROUTES", RouteConfig), ("TOKENS", TokenConfig))
    }
    found = []
    for variable, file in sorted(env.items()):
        key = variable.removesuffix("_FILE")
        if key == variable or not file or key in env:
            continue
        prefix = next((p for p in named if key.startswith(p)), None)
        if key in sections or (prefix is not None and key.endswith(named[prefix])):
            found.append((variable, file))
    return found


def _secret_keys(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """Each secret key the file sets: (its key path, the file it names or None if inline)."""
    try:
        raw = tomllib.loads(read_regular_file(os.fspath(path), CONFIG_FILE_MAX))
    except (OSError, ValueError):  # not TOML, or not a regular file any more
        return []
    tables: list[tuple[str, type, object]] = [
        (name, cls, raw.get(name)) for name, cls in SECTIONS.items()
    ]
    for kind, named_cls in (("routes", RouteConfig), ("tokens", TokenConfig)):
        named = raw.get(kind)
        if isinstance(named, dict):
            tables += [(f"{kind}.{k}", named_cls, v) for k, v in named.items()]
    base = config_dir(path)
    keys: list[tuple[str, str | None]] = []
    for prefix, cls, table in tables:
        if not isinstance(table, dict):
            continue
        for spec in dataclasses.fields(cls):
            if not spec.metadata.get("secret"):
                continue
            value, file = table.get(spec.name), table.get(f"{spec.name}_file")
            if isinstance(file, str):
                keys.append((f"{prefix}.{spec.name}_file", resolve_path(file, base)))
            if isinstance(value, dict):  # smtp.users: login = "password" or login_file
                keys += [
                    (
                        f"{prefix}.{spec.name}.{k}",
                        resolve_path(v, base) if k.endswith("_file") else None,
                    )
                    for k, v in value.items()
                    if isinstance(v, str) and v
                ]
            elif value and (spec.metadata["secret"] != "url" or url_passwords(str(value))):
                keys.append((f"{prefix}.{spec.name}", None))  # a URL: if it has a password
    return keys


def exposed_secrets(
    config: Config, path: str | os.PathLike[str] | None, env: Mapping[str, str]
) -> list[str]:
    """Why files' modes expose secrets (`check-config`, `serve`, each SIGHUP): the config
    file's inline ones, a secret file it or the environment names (`SMS_BRIDGE_..._FILE`,
    read relative to the current directory as the loader reads it), or a listener's TLS
    private key; SMTP passwords allowed in clear text on a listener beyond loopback;
    `smtp.user_recipients` that a client skipping AUTH escapes; and signed Grafana
    routes that take a replayed request."""
    named = secret_env_files(env)
    named += [
        (f"{section}.tls_key", key)
        for section, key in (("http", config.http.tls_key), ("smtp", config.smtp.tls_key))
        if key
    ]
    if path is not None:
        named += secret_files(path)
    warnings = [
        f"{name}: {file} is readable by every user: chmod 600 {file}"
        for name, file in named
        if readable_by_everyone(file)
    ]
    keys = inline_secrets(path) if path is not None and readable_by_everyone(path) else []
    if keys:
        warnings.insert(
            0,
            f"{path} is readable by every user and holds secrets ({', '.join(keys)}): "
            f"chmod 600 {path}, or move them to *_file keys",
        )
    return (
        warnings
        + plaintext_auth_warnings(config)
        + unrestricted_sessions_warnings(config)
        + replayable_routes_warnings(config)
    )


# A one-character secret would turn every line into stars and show, by where the stars
# fall, what it is; such a "secret" protects nothing anyway. Two characters and up are
# masked even if that garbles some words: a garbled line is a nuisance, a leaked
# password is not.
MIN_MASKED_CHARS = 2


@functools.lru_cache(maxsize=16)  # one per config in force
def masked_first(secrets: frozenset[str]) -> tuple[str, ...]:
    """The secrets worth masking, longest first: one that holds another goes whole."""
    return tuple(sorted((s for s in secrets if len(s) >= MIN_MASKED_CHARS), key=len, reverse=True))


def mask_ordered(text: str, ordered: Iterable[str]) -> str:
    """`text` with each of `ordered` (as `masked_first` orders them) `***`."""
    for secret in ordered:
        text = text.replace(secret, "***")
    return text


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` as the log would show it: every secret `***`. For text that leaves the
    bridge other than by the log (HTTP answers) and may quote what others wrote (a
    provider's error, a database's)."""
    return mask_ordered(text, masked_first(frozenset(secrets)))

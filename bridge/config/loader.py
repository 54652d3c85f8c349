"""Loading: TOML file + `SMS_BRIDGE_<SECTION>_<KEY>` environment + `*_file` secrets.

`load_config` collects every problem (unknown keys, wrong types, then the checks of
`bridge.config.validate`) and raises one ConfigError listing them by key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from bridge.config.parsing import (
    CONFIG_FILE_MAX,
    coerce,
    config_dir,
    from_env_text,
    read_regular_file,
    read_secret_file,
    resolve_path,
    secret_text_problem,
    store_file_problem,
)
from bridge.config.sections import (
    ENV_PREFIX,
    GROUP_NAME,
    ROUTE_FORMATS,
    SECTIONS,
    Config,
    RouteConfig,
    TokenConfig,
)
from bridge.config.validate import validate
from bridge.errors import ConfigError

TOKEN_ENV_KEYS = ("TOKEN", "SCOPES", "TEXTS_PER_DAY")  # SMS_BRIDGE_TOKENS_<NAME>_<KEY>


def _refuse_no_store_file(path: str) -> None:
    """ValueError for a `store.path` that names no file the bridge can keep private and
    find again (`store_file_problem`). An empty one is judged with `store.url`
    (`validate`): it names no SQLite file where a PostgreSQL store is in use."""
    if path.strip() and (why := store_file_problem(path)):
        raise ValueError(why)


class _Loader:
    """Collects problems instead of stopping at the first one.

    `base`: the config file's directory, which the file names it writes (`*_file`
    keys, `store.path`, the TLS files) are relative to; None without a file. Names from
    the environment and the built-in defaults (`store.path` = "sms-bridge.db") stay
    relative to the current directory: no file wrote them; an environment variable is a
    path handed to the process, read from where it runs as any program reads one; and
    the default store is where the README's first commands (no config at all) and
    `sms-bridge messages` run after them expect it, in the directory they run in.
    """

    def __init__(self, env: Mapping[str, str], base: str | None) -> None:
        self.env = env
        self.base = base
        self.problems: list[tuple[str, str]] = []
        self.env_token_files: set[str] = set()  # tokens whose token_file is the environment's

    def problem(self, key: str, why: str) -> None:
        self.problems.append((key, why))

    def refuse_a_store_left_behind(self, written: str, resolved: str) -> None:
        """A relative `store.path` was read from the current directory before it was read
        beside the config. Where the new reading finds no store but the old one does,
        SQLite would start an empty one there: the queue, the held texts, the dedupe
        window and today's cap counts left behind in the old file, silently."""
        if not os.path.exists(resolved) and os.path.exists(written):
            self.problem(
                "store.path",
                f"{written!r} is read beside the config file, as {resolved}, where no store"
                f" is; the store at {os.path.abspath(written)} (read from the current"
                " directory by earlier versions) would be left behind: move it there, or"
                " write its absolute path",
            )

    def refuse_spaced_secrets(self, origin: str, value: object) -> None:
        """A secret (or a table of them: `[smtp.users]`) with white space around it."""
        named = value.items() if isinstance(value, Mapping) else [("", value)]
        for name, secret in named:
            why = secret_text_problem(secret) if isinstance(secret, str) else None
            if why:
                self.problem(f"{origin}.{name}" if name else origin, why)

    def env_twin(self, table: str, name: str, seen: dict[str, str]) -> bool:
        """Is `name` of `[table.NAME]` spelt in the environment as a name in `seen` (the
        environment's spelling -> the name as first written) is? Then a problem, and True.
        One variable would set both: a token rotation changed one of the two tokens, a
        route's override (`Ops`, `ops`) set both routes' keys, a group's (`on-call`,
        `on_call`) only one of them."""
        spelling = _env_spelling(name)
        if spelling not in seen:
            seen[spelling] = name
            return False
        keys = "" if table == "groups" else "_*"  # SMS_BRIDGE_GROUPS_<NAME> is the group
        self.problem(
            f"{table}.{name}",
            f"the same name as {table}.{seen[spelling]} but for case (or - . _): the"
            f" environment's {ENV_PREFIX}{table.upper()}_{spelling}{keys} cannot tell them"
            " apart; rename one",
        )
        return True

    def env_list(self, env_name: str) -> object:
        """A list from the environment (`SMS_BRIDGE_GROUPS_<NAME>`, a token's `_SCOPES`):
        comma-separated or a TOML array. Not TOML after all: a problem under the variable's
        name and None, never a traceback from check-config or a reload."""
        try:
            return from_env_text(self.env[env_name], "list", ())
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            self.problem(env_name, f"not a list: {why}")
            return None

    def section(
        self,
        name: str,
        cls: type,
        raw: object,
        *,
        env: bool = True,
        env_prefix: str | None = None,
        fixed: dict[str, Any] | None = None,
        names_from_env: bool = False,
    ) -> Any:
        """`names_from_env`: `raw`'s file names are the environment's (a token's
        `SMS_BRIDGE_TOKENS_<NAME>_TOKEN_FILE`), relative to the current directory."""
        fixed = fixed or {}
        file_base = None if names_from_env else self.base
        if not isinstance(raw, dict):
            self.problem(name, "expected a table")
            raw = {}
        values: dict[str, object] = {}
        known = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
        for key in raw:
            base = key.removesuffix("_file")
            if key not in known and not (key.endswith("_file") and base in known):
                self.problem(f"{name}.{key}", "unknown key" + _did_you_mean(key, known))
        for fname, spec in known.items():
            if fname in raw and f"{fname}_file" in raw:
                # One silently won (the inline value): the file the owner meant, unread.
                self.problem(f"{name}.{fname}", f"set twice, as {fname} and {fname}_file: keep one")
                continue
            kind = spec.metadata.get("kind", "")
            prefix = f"{ENV_PREFIX}{name.upper()}_" if env_prefix is None else env_prefix
            env_name = f"{prefix}{fname.upper()}" if env else "\0"
            value: object = dataclasses.MISSING
            origin = f"{name}.{fname}"
            where = None  # the directory relative names in `value` are read from
            try:
                if env_name in self.env:
                    origin = env_name
                    secret = bool(spec.metadata.get("secret"))
                    value = from_env_text(self.env[env_name], kind, spec.default, secret)
                elif f"{env_name}_FILE" in self.env:
                    origin = f"{env_name}_FILE"
                    value = read_secret_file(self.env[f"{env_name}_FILE"])
                elif fname in raw:
                    value, where = raw[fname], file_base
                elif f"{fname}_file" in raw:
                    origin = f"{name}.{fname}_file"
                    file_name = raw[f"{fname}_file"]
                    if not isinstance(file_name, str):
                        raise ValueError("expected a file path")
                    value = read_secret_file(file_name, file_base)
                if value is not dataclasses.MISSING:
                    value = coerce(value, kind, spec.default, where)
                    if (name, fname) == ("store", "path"):
                        _refuse_no_store_file(str(value))
                    if kind == "path":
                        written, value = str(value), resolve_path(str(value), where)
                        if (name, fname) == ("store", "path") and value != written:
                            self.refuse_a_store_left_behind(written, value)
                    if spec.metadata.get("secret"):  # a URL with a password too
                        self.refuse_spaced_secrets(origin, value)
                    values[fname] = value
            except (ValueError, tomllib.TOMLDecodeError) as exc:
                self.problem(origin, str(exc))
            except RecursionError:  # an environment list nested past tomllib's stack
                self.problem(origin, "not valid TOML here: nested too deeply")
            except OSError as exc:
                self.problem(origin, _unreadable(exc))
        return cls(**values, **fixed)

    def unused_section_env(self) -> None:
        """`SMS_BRIDGE_HTTP_LISTN` is a typo that would leave the default in force: name
        it, as the routes' overrides are. Other `SMS_BRIDGE_*` variables (a sender's
        `$SMS_BRIDGE_TOKEN` in the same shell, the tests' switches) are not the
        bridge's to refuse: a name outside every section is judged only when it is a
        near miss of one followed by one of that section's keys (`PROVIDR_BASE_URL`)."""
        keys = {
            section.upper(): {f.name.upper() for f in dataclasses.fields(cls)}
            for section, cls in SECTIONS.items()
        }
        # A collection's override is `<NAME>_<KEY>`: `ROUTE_AM_TOKEN` is a near miss too.
        named = {
            "ROUTES": {f.name.upper() for f in dataclasses.fields(RouteConfig)} - {"NAME"},
            "TOKENS": set(TOKEN_ENV_KEYS),
        }
        for env_name in self.env:
            rest = env_name.removeprefix(ENV_PREFIX)
            if rest == env_name or rest.startswith(("ROUTES_", "GROUPS_", "TOKENS_")):
                continue  # judged by their own readers
            section = next((s for s in keys if rest.startswith(f"{s}_")), None)
            if section is not None:
                key = rest.removeprefix(f"{section}_")
                if key.removesuffix("_FILE") not in keys[section]:
                    hint = _did_you_mean(key, keys[section], f"{ENV_PREFIX}{section}_")
                    self.problem(env_name, f"no such [{section.lower()}] key{hint}")
                continue
            for cut in (i for i, c in enumerate(rest) if c == "_"):
                head, key = rest[:cut], rest[cut + 1 :]
                bare = key.removesuffix("_FILE")
                near = [s for s in keys if bare in keys[s]]
                near += [c for c in named if any(bare.endswith(f"_{k}") for k in named[c])]
                close = difflib.get_close_matches(head, near, n=1)
                if close:
                    self.problem(
                        env_name, f"no such section (did you mean {ENV_PREFIX}{close[0]}_{key}?)"
                    )
                    break

    def groups(self, raw: object) -> dict[str, tuple[str, ...]]:
        if not isinstance(raw, dict):
            self.problem("groups", "expected a table of name = [numbers]")
            raw = {}
        raw = dict(raw)
        for env_name in self.env:
            if env_name.startswith(f"{ENV_PREFIX}GROUPS_"):
                spelt = env_name.removeprefix(f"{ENV_PREFIX}GROUPS_")
                # The file's group so spelt, in whatever case and with - . as written there:
                # read by its lower case alone, `..._ON_CALL` added a group on_call beside
                # the file's on-call, whose members stayed the old ones.
                name = next((n for n in raw if _env_spelling(str(n)) == spelt.upper()), None)
                name = spelt.lower() if name is None else name
                members = self.env_list(env_name)
                if members is not None:
                    raw[name] = members
        groups: dict[str, tuple[str, ...]] = {}
        seen: dict[str, str] = {}  # lower case -> the name as first written
        spellings: dict[str, str] = {}  # the environment's spelling -> the name
        for name, members in raw.items():
            key = f"groups.{name}"
            if not GROUP_NAME.match(name):
                self.problem(key, "a group name starts with a letter: letters, digits, _ . -")
                continue
            if name.lower() in seen:
                self.problem(
                    key,
                    f"the same name as groups.{seen[name.lower()]} but for case: group names "
                    "are case-blind (as the local part of a mail address is); merge or rename",
                )
                continue
            seen[name.lower()] = name
            if self.env_twin("groups", name, spellings):
                continue
            if isinstance(members, str):
                members = [members]
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                self.problem(key, "expected a list of phone numbers")
                continue
            if not members:
                # GROUP@ was answered 250 "stored as message" and a route or the API 202,
                # with nothing stored: acknowledged, texted to no one, and no row saying so.
                self.problem(
                    key, "no members: a mail or request to it would be acknowledged and lost"
                )
                continue
            groups[name] = tuple(members)
        return groups

    def routes(self, raw: object) -> dict[str, RouteConfig]:
        if not isinstance(raw, dict):
            self.problem("routes", "expected tables [routes.NAME]")
            return {}
        routes: dict[str, RouteConfig] = {}
        seen: dict[str, str] = {}  # the environment's spelling -> the name as first written
        for name, table in raw.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                self.problem(f"routes.{name}", "a route name is letters, digits, _ . - only")
                continue
            if self.env_twin("routes", name, seen):
                continue
            route = self.section(
                f"routes.{name}",
                RouteConfig,
                table,
                env_prefix=route_env_prefix(name),
                fixed={"name": name},
            )
            if route.format not in ROUTE_FORMATS:
                self.problem(f"routes.{name}.format", f"must be one of {', '.join(ROUTE_FORMATS)}")
            routes[name] = route
        self._unused_route_env(routes)
        return routes

    def _unused_route_env(self, routes: Mapping[str, RouteConfig]) -> None:
        """An override that names no route or no key is a typo: say so, never ignore it."""
        keys = {f.name.upper() for f in dataclasses.fields(RouteConfig) if f.name != "name"}
        for env_name in self.env:
            if not env_name.startswith(f"{ENV_PREFIX}ROUTES_"):
                continue
            rests = [
                env_name.removeprefix(route_env_prefix(name))
                for name in routes
                if env_name.startswith(route_env_prefix(name))
            ]
            if any(rest.removesuffix("_FILE") in keys for rest in rests):
                continue
            if rests:
                self.problem(env_name, "no such route key (see config.example.toml)")
            else:
                known = ", ".join(sorted(routes)) or "none"
                self.problem(
                    env_name,
                    "names no route in the config file (routes: "
                    f"{known}); the environment overrides a route's keys, it cannot add a route",
                )

    def tokens(self, raw: object) -> dict[str, TokenConfig]:
        if not isinstance(raw, dict):
            self.problem("tokens", "expected tables [tokens.NAME]")
            return {}
        raw = self._tokens_from_env({k: v for k, v in raw.items()})
        tokens: dict[str, TokenConfig] = {}
        seen: dict[str, str] = {}  # the environment's spelling -> the name as first written
        for name, table in raw.items():
            if not GROUP_NAME.match(name):
                self.problem(
                    f"tokens.{name}", "a token name starts with a letter: letters, digits, _ . -"
                )
                continue
            if self.env_twin("tokens", name, seen):
                continue
            tokens[name] = self.section(
                f"tokens.{name}",
                TokenConfig,
                table,
                env=False,
                fixed={"name": name},
                names_from_env=name in self.env_token_files,
            )
        return tokens

    def _tokens_from_env(self, raw: dict[str, Any]) -> dict[str, Any]:
        """`SMS_BRIDGE_TOKENS_<NAME>_TOKEN[_FILE]`, `..._SCOPES` and `..._TEXTS_PER_DAY`:
        tokens for containers configured by environment and secrets alone. The
        environment wins over the file."""
        pattern = re.compile(rf"{ENV_PREFIX}TOKENS_(.+)_(TOKEN_FILE|{'|'.join(TOKEN_ENV_KEYS)})")
        for env_name, text in sorted(self.env.items()):
            match = pattern.fullmatch(env_name)
            if not match:
                if env_name.startswith(f"{ENV_PREFIX}TOKENS_"):  # a typo, never silence
                    self.problem(
                        env_name,
                        "no such token key: SMS_BRIDGE_TOKENS_<NAME>_ then TOKEN, "
                        "TOKEN_FILE, SCOPES or TEXTS_PER_DAY",
                    )
                continue
            key = match.group(2).lower()
            # The file's token of that name however it is written there (`Deploy`,
            # `ci-bot`): read as a new token, a rotation left the file's (leaked) one valid.
            name = next(
                (n for n in raw if _env_spelling(str(n)) == match.group(1).upper()),
                match.group(1).lower(),
            )
            table = raw.get(name)
            table = dict(table) if isinstance(table, dict) else {}
            if key == "scopes":
                scopes = self.env_list(env_name)
                if scopes is not None:
                    table["scopes"] = scopes
            elif key == "texts_per_day":  # not a number: left as text, refused by its key
                # isdecimal, not isdigit: "²" is a digit int() cannot read (a traceback)
                table[key] = int(text) if text.strip().isdecimal() else text
            else:  # token and token_file replace each other's file value
                if key == "token_file" and env_name.removesuffix("_FILE") in self.env:
                    continue  # both in the environment: the plain one wins, as for keys
                table.pop("token_file" if key == "token" else "token", None)
                table[key] = text
                if key == "token_file":  # read from the current directory, not the file's
                    self.env_token_files.add(name)
            raw[name] = table
        return raw


def _unreadable(exc: OSError) -> str:
    """Which file could not be read, and where. A name the config file wrote is already
    joined to the file's directory; one still relative came from the environment and was
    looked for in the current directory (the unit's WorkingDirectory): say which."""
    name = exc.filename
    if not isinstance(name, str):
        return f"cannot read secret file: {exc.strerror or exc}"
    where = "" if os.path.isabs(name) else f" (relative to the current directory {os.getcwd()})"
    return f"cannot read secret file {name!r}{where}: {exc.strerror or exc}"


def _did_you_mean(key: str, known: Iterable[str], prefix: str = "") -> str:
    """` (did you mean listen?)` for a near miss of a known key, else nothing."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _env_spelling(name: str) -> str:
    """A route's or token's name as an environment variable spells it: upper-cased,
    `-` and `.` as `_`."""
    return re.sub(r"[.-]", "_", name).upper()


def route_env_prefix(name: str) -> str:
    """`SMS_BRIDGE_ROUTES_<NAME>_`: the name as the environment spells it."""
    return f"{ENV_PREFIX}ROUTES_{_env_spelling(name)}_"


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Read `path` (None: built-in defaults) with environment overrides; raise ConfigError."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    loader = _Loader(env, config_dir(path) if path is not None else None)
    if path is not None:
        try:
            raw = tomllib.loads(read_regular_file(os.fspath(path), CONFIG_FILE_MAX))
        except OSError as exc:
            raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}")]) from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([(str(path), f"not valid TOML: {exc}")]) from exc
        except ValueError as exc:  # not a regular file, too large, not UTF-8
            raise ConfigError([(str(path), f"cannot read: {exc}")]) from exc
        except RecursionError as exc:  # tomllib recurses per nested array or inline table
            why = "not valid TOML here: arrays or inline tables nested too deeply"
            raise ConfigError([(str(path), why)]) from exc
    tables = (*SECTIONS, "groups", "routes", "tokens")
    for key in raw:
        if key not in tables:
            loader.problem(key, "unknown section" + _did_you_mean(key, tables))
    loader.unused_section_env()
    sections = {
        name: loader.section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()
    }
    config = Config(
        **sections,
        groups=loader.groups(raw.get("groups", {})),
        routes=loader.routes(raw.get("routes", {})),
        tokens=loader.tokens(raw.get("tokens", {})),
        source=str(path) if path is not None else "built-in defaults",
    )
    validate(config, loader.problem)
    if loader.problems:
        raise ConfigError(loader.problems)
    return config


def config_path_from(arg: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """`--config` wins, then `$SMS_BRIDGE_CONFIG`, else no file at all."""
    env = os.environ if env is None else env
    return arg or env.get(f"{ENV_PREFIX}CONFIG") or None

"""The docs work when pasted: README and recipe snippets, read from the docs themselves,
through the real tools (sms-bridge check-config, amtool, systemd-analyze, postconf, bash).

A snippet that stops working fails here, not in a new user's terminal. Tools that are not
installed skip their check with the reason; nothing is copied out of the docs by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import SECTIONS, Config, RouteConfig, TokenConfig, load_config
from bridge.config.sections import MailRule
from tests.helpers import pump, running_bridge, write_config
from tests.processes import clean_env, free_port, process, run_command, wait_for
from tests.test_hooks import HOOKS

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
RECIPES = ROOT / "docs" / "recipes.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
SECURITY = ROOT / "docs" / "security.md"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Keys naming a file that must exist: secrets (`*_file`) and TLS certificates and keys.
_SECRET_FILE = re.compile(r'^(\s*(?:\w+_file|tls_cert|tls_key)\s*=\s*)"([^"]+)"', re.MULTILINE)


def blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(path.read_text(encoding="utf-8")) if kind == lang]


def section_of(path: Path, heading: str) -> str:
    """The text under `## heading` up to the next `## `."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def toml_snippets(path: Path) -> list[str]:
    """Each TOML block; one that opens with a bare key (no [table]) continues the one
    before it, as the text says ("add a template to the route")."""
    snippets: list[str] = []
    for body in blocks(path, "toml"):
        first = next((ln for ln in body.splitlines() if ln.strip() and not ln.startswith("#")), "")
        if snippets and not first.startswith("["):
            snippets[-1] += body
        else:
            snippets.append(body)
    return snippets


def with_secret_files(snippet: str, tmp_path: Path) -> str:
    """Every `*_file = "/etc/..."` pointed at a file of ours holding a 24-character
    secret of its own (two tokens may not share one: check-config asks only that such
    files exist), and `tls_cert`, `tls_key` at a certificate and its key (check-config
    loads them as the listener would)."""
    import trustme

    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    pair = trustme.CA().issue_cert("127.0.0.1")

    def replace(match: re.Match[str]) -> str:
        target = secrets / Path(match.group(2)).name
        if "tls_cert" in match.group(1):
            pair.cert_chain_pems[0].write_to_path(str(target))
        elif "tls_key" in match.group(1):
            pair.private_key_pem.write_to_path(str(target))
        else:
            target.write_text(hashlib.sha256(target.name.encode()).hexdigest()[:24] + "\n")
        return f'{match.group(1)}"{target}"'

    return _SECRET_FILE.sub(replace, snippet)


def check_config(text: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(with_secret_files(text, tmp_path), encoding="utf-8")
    return run_command(["check-config", str(path)], env=clean_env())


def _snippet_cases() -> list[tuple[str, int]]:
    return [
        (path.name, i)
        for path in (README, RECIPES, SECURITY)
        for i in range(len(toml_snippets(path)))
    ]


@pytest.mark.parametrize(("doc", "index"), _snippet_cases())
@pytest.mark.slow  # runs a subprocess
def test_every_toml_snippet_passes_check_config(doc: str, index: int, tmp_path) -> None:
    [path] = [p for p in (README, RECIPES, SECURITY) if p.name == doc]
    snippet = toml_snippets(path)[index]
    if path == RECIPES and "[groups]" not in snippet:
        # "Each recipe assumes ... a group named oncall": the first block.
        snippet = toml_snippets(RECIPES)[0] + snippet
    result = check_config(snippet, tmp_path, f"{doc}-{index}.toml")
    assert result.returncode == 0, f"{doc} snippet {index}:\n{snippet}\n{result.stderr}"
    if "[routes.jenkins]" in snippet:  # the text promises a warning, and acceptance
        assert "warning: routes.jenkins.template" in result.stderr


def test_the_snippets_cover_every_recipe() -> None:
    recipes = "".join(toml_snippets(RECIPES))
    for table in ("alertmanager", "grafana", "github", "gitlab", "jenkins", "uptime-kuma"):
        assert f"[routes.{table}]" in recipes
    assert "[tokens.ci]" in recipes
    assert "[tokens.scripts]" in recipes and "[smtp]" in recipes


@pytest.mark.slow  # runs a subprocess
def test_the_images_own_config_passes_check_config(tmp_path) -> None:
    text = (ROOT / "docker" / "config.toml").read_text(encoding="utf-8")
    result = check_config(text, tmp_path, "image.toml")
    assert result.returncode == 0, result.stderr


def test_the_dockerfile_reads_a_mounted_config_and_no_env_overrides_it() -> None:
    """A key set by ENV wins over the file: the image sets only the file's location, and
    the recipe mounts its file at that very place."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    env_block = re.search(r"^ENV (.*?)(?<!\\)$", dockerfile, re.MULTILINE | re.DOTALL)
    assert env_block is not None
    names = re.findall(r"(\w+)=", env_block.group(1))
    assert [n for n in names if n.startswith("SMS_BRIDGE_")] == ["SMS_BRIDGE_CONFIG"]
    config_path = re.search(r"SMS_BRIDGE_CONFIG=(\S+)", dockerfile)
    assert config_path is not None
    assert f"COPY docker/config.toml {config_path.group(1)}" in dockerfile
    docker = section_of(RECIPES, "Docker")
    assert f"dst={config_path.group(1)},readonly" in docker
    assert "dst=/run/secrets" in docker  # what the config's *_file keys name is mounted
    for name in re.findall(r"/run/secrets/([\w.-]+)", docker):
        assert f"secrets/{name}" in docker, f"nothing puts {name} in ./secrets"


def images_healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, in its exec form."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    found = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", dockerfile, re.MULTILINE | re.DOTALL)
    assert found is not None
    command: list[str] = json.loads(found.group(1))
    return command


def run_as_docker(
    command: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """`command` as docker runs an exec form: no shell, the image's environment."""
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env, cwd=cwd)


@pytest.mark.slow  # runs the bridge
@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_the_images_healthcheck_asks_a_mail_only_bridge_for_its_smtp_greeting(
    tmp_path, scheme: str
) -> None:
    """With `http.listen = ""` (a bridge that only takes mail) the HEALTHCHECK exited 1
    ("no HTTP listener to ask"): the container was "unhealthy" for ever, and the recipe
    said to run it with --no-healthcheck. It asks the SMTP listener for its greeting.
    smtps: `smtp.listen = ""` too, mail over implicit TLS only (`smtp.tls_listen`), said
    "both empty" and exited 1 the same; it is asked over TLS, the certificate not
    verified (issued here for the public name, as a real one is, not the 127.0.0.1 the
    probe dials)."""
    import trustme

    port = free_port()  # the check reads the port from the config: port 0 would not do
    listeners = f'listen = "0.0.0.0:{port}"'
    if scheme == "smtps":
        pem = tmp_path / "mail.pem"
        cert = trustme.CA().issue_cert("mail.example.org")
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        listeners = (
            f'listen = ""\ntls_listen = "0.0.0.0:{port}"\ntls_cert = "{pem}"\ntls_key = "{pem}"'
        )
    config = write_config(
        tmp_path,
        f"""
[http]
listen = ""
[smtp]
{listeners}
[store]
path = "{tmp_path / "bridge.db"}"
""",
    )
    env = _env_of_the_image(config)
    with process(["serve"], tmp_path, env, tmp_path / "serve.log") as proc:
        proc.address(scheme.upper())
        healthy = run_as_docker(images_healthcheck(), env, tmp_path)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"{scheme}://127.0.0.1:{port}: 220 " in healthy.stdout
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert "Traceback" not in proc.output() and "ERROR" not in proc.output()
    down = run_as_docker(images_healthcheck(), env, tmp_path)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert f"{scheme}://127.0.0.1:{port}: " in down.stderr
    # Docker knows 0 and 1 (2 is reserved): a file edited into one serve refuses said 78.
    config.write_text(config.read_text() + "[limits]\nmax_parts = 0\n")
    refused = run_as_docker(images_healthcheck(), env, tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert "  limits.max_parts: " in refused.stderr and "unhealthy" in refused.stderr


@pytest.mark.slow  # runs the bridge
def test_the_images_healthcheck_asks_where_the_config_listens(tmp_path) -> None:
    """The HEALTHCHECK as the image runs it (its CMD, with SMS_BRIDGE_CONFIG) against a
    bridge on HTTPS on a port of its own: it asked http://127.0.0.1:8080 whatever the
    config said, so such a container was "unhealthy" for ever (restarted, with an
    orchestrator that acts on it). Run as docker runs an exec form: no shell."""
    import trustme

    command = images_healthcheck()
    pem = tmp_path / "bridge.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    port = free_port()  # the check reads the port from the config: port 0 would not do
    config = write_config(
        tmp_path,
        f"""
        [http]
        listen = "127.0.0.1:{port}"
        tls_cert = "{pem}"
        tls_key = "{pem}"
        [smtp]
        listen = ""
        [store]
        path = "{tmp_path / "bridge.db"}"
        """,
    )
    env = _env_of_the_image(config)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path
        )

    with process(["serve"], tmp_path, env, tmp_path / "serve.log") as proc:
        proc.address("HTTP")
        healthy = check()
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    down = check()
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert f"https://127.0.0.1:{port}/healthz" in down.stderr


def images_command(*args: str) -> list[str]:
    """What `docker run IMAGE ARGS` runs: the ENTRYPOINT then ARGS, or the CMD without
    them, both in their exec form."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    [entrypoint] = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.MULTILINE)
    [cmd] = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    return [*json.loads(entrypoint), *(args or json.loads(cmd))]


@contextlib.contextmanager
def as_pid_1(command: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[Any, int]]:
    """`command` as a container's first process: PID 1 of a PID namespace of its own (a
    user namespace too, so no root is needed), and its pid as the host sees it, which is
    where `docker stop` signals it from: the kernel then drops a signal PID 1 has no
    handler for, as it does in a container. Skips where namespaces are not allowed."""
    unshare = shutil.which("unshare")
    if (
        unshare is None
        or subprocess.run(
            [unshare, "--user", "--map-root-user", "--pid", "--fork", "true"], capture_output=True
        ).returncode
    ):
        pytest.skip("no unshare, or no user and PID namespaces here")
    if os.path.isabs(command[0]) and not os.path.exists(command[0]):
        pytest.skip(f"{command[0]} (the image's init; Debian: tini) is not installed here")
    with open(log, "ab") as out:
        outer = subprocess.Popen(
            [unshare, "--user", "--map-root-user", "--pid", "--fork", "--kill-child", *command],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        wait_for(lambda: children.read_text().split(), timeout=10)
        yield outer, int(children.read_text().split()[0])
    finally:
        if outer.poll() is None:
            outer.kill()  # --kill-child: PID 1 and its namespace go with it
        outer.wait(timeout=10)


@pytest.mark.slow  # runs sh
def test_the_dockerfiles_run_lines_parse_and_install_the_init_the_entrypoint_names() -> None:
    """No docker here: each RUN (its continuation lines joined) parses as /bin/sh reads
    it, and the ENTRYPOINT's init is what a RUN installs (Debian's tini: /usr/bin/tini)."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    runs = re.findall(r"^RUN ((?:[^\n]*\\\n)*[^\n]*)$", dockerfile, re.MULTILINE)
    assert len(runs) >= 3
    for command in runs:
        parsed = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{command}\n{parsed.stderr}"
    init = images_command()[0]
    assert init == "/usr/bin/tini" and any(
        "install -y --no-install-recommends tini" in r for r in runs
    )


DOCKER_STOP_TIMEOUT = 10  # seconds `docker stop` waits before SIGKILL, by default


@pytest.mark.slow  # runs the bridge
@pytest.mark.parametrize("when", ["at once", "once serving"])
def test_the_image_stops_on_sigterm_at_any_moment(tmp_path, when: str) -> None:
    """The image's ENTRYPOINT and CMD as PID 1, as `docker run` starts them, and SIGTERM
    as `docker stop` sends it. Python as PID 1 has no SIGTERM handler until `serve`
    installs its own, so a stop while it started was dropped by the kernel: the
    container ran on until SIGKILL. Once serving, the stop is the bridge's clean one."""
    config = write_config(
        tmp_path,
        f"""
        [http]
        listen = "127.0.0.1:0"
        [smtp]
        listen = ""
        [store]
        path = "{tmp_path / "bridge.db"}"
        """,
    )
    log = tmp_path / "container.log"
    with as_pid_1(images_command(), _env_of_the_image(config), log) as (container, pid_1):
        if when == "once serving":
            wait_for(lambda: "HTTP listening on" in log.read_text(), timeout=60)
        else:
            # As soon as the init has started the bridge (and set its own signals up:
            # before that, PID 1 drops a signal whatever it runs, tini too; a stop in
            # the microseconds of an exec is not what this holds, and a loaded machine
            # made the test meet it), while the bridge itself is still starting.
            if os.path.isabs(images_command()[0]):  # an init that starts the bridge
                children = Path(f"/proc/{pid_1}/task/{pid_1}/children")
                wait_for(lambda: children.read_text().split(), timeout=10)
        os.kill(pid_1, signal.SIGTERM)
        try:
            status = container.wait(timeout=DOCKER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {DOCKER_STOP_TIMEOUT} s after SIGTERM:\n{log.read_text()}")
    output = log.read_text()
    if when == "once serving":
        assert status == 0, output
        assert "stopped" in output and "Traceback" not in output, output
    else:  # ended by the signal as it started, or stopped by serve: either is prompt
        assert status in (0, 128 + signal.SIGTERM), output


def test_every_stop_grace_outlasts_the_bridges_own_shutdown() -> None:
    """On SIGTERM the bridge drains mail and requests (SHUTDOWN_GRACE) while the
    dispatcher finishes the provider request under way (connect, then the timeout).
    Docker's default 10 s, and the unit's 15 s, cut such a send with SIGKILL: the text
    went, and only the provider's /logs said so later. Each stop grace the docs and the
    unit give is longer, with room for the store's last write."""
    from bridge.config import ProviderConfig
    from bridge.service import SHUTDOWN_GRACE

    provider = ProviderConfig()
    shutdown = max(SHUTDOWN_GRACE, provider.connect_timeout + provider.timeout) + 5
    docker = section_of(RECIPES, "Docker")
    # Each `docker run -d` with its continuation lines.
    runs = re.findall(r"docker run -d(?:[^\n]*\\\n)*[^\n]*", "\n".join(blocks_in(docker, "sh")))
    assert len(runs) == 3
    # The Dockerfile's own header shows a `docker run` too (in comments: read them bare).
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    header = "\n".join(
        line.lstrip("#").strip() for line in dockerfile.splitlines() if line.startswith("#")
    )
    header_runs = re.findall(r"^docker run (?:[^\n]*\\\n)*[^\n]*", header, re.MULTILINE)
    assert len(header_runs) == 1
    for command in runs + header_runs:
        grace = re.search(r"--stop-timeout (\d+)", command)
        assert grace and int(grace.group(1)) >= shutdown, command
    import yaml

    [compose] = [yaml.safe_load(b) for b in blocks_in(docker, "yaml") if "services:" in b]
    assert int(compose["services"]["sms-bridge"]["stop_grace_period"].rstrip("s")) >= shutdown
    unit = (ROOT / "systemd" / "sms-bridge.service").read_text(encoding="utf-8")
    [unit_grace] = re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert int(unit_grace) >= shutdown


def _env_of_the_image(config: Path) -> dict[str, str]:
    """What the image's HEALTHCHECK runs with: its config by name, `sms-bridge` on PATH."""
    return clean_env(
        SMS_BRIDGE_CONFIG=str(config),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )


def _docker_env(block: str) -> dict[str, str]:
    """The `-e NAME=VALUE` options of a `docker run` block."""
    return dict(re.findall(r"-e (SMS_BRIDGE_\w+)=(\S+)", block))


@pytest.mark.slow  # runs a subprocess
def test_the_docker_environment_block_protects_the_images_config(tmp_path) -> None:
    """Docker's "The same protection without a file": the block's `-e` settings over the image's
    own config pass check-config (the secrets where the block mounts them); its real
    provider alone is refused, naming each open listener, as the text says."""
    docker = section_of(RECIPES, "Docker")
    [block] = [b for b in blocks_in(docker, "sh") if "SMS_BRIDGE_TOKENS_SCRIPTS" in b]
    env = _docker_env(block)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in env.items():
        if key.endswith("_FILE"):
            assert value.startswith("/run/secrets/"), value  # what the block mounts
            target = secrets / value.removeprefix("/run/secrets/")
            target.write_text("0123456789abcdef01234567\n")
            target.chmod(0o600)
            env[key] = str(target)
    image = (ROOT / "docker" / "config.toml").read_text(encoding="utf-8")
    config = tmp_path / "image.toml"
    config.write_text(image.replace("/data/", f"{tmp_path}/"), encoding="utf-8")
    protected = run_command(["check-config", str(config)], env=clean_env(**env))
    assert protected.returncode == 0, protected.stderr
    assert "0123456789abcdef" not in protected.stdout + protected.stderr  # secrets unprinted
    provider_only = {k: v for k, v in env.items() if k.startswith("SMS_BRIDGE_PROVIDER_")}
    refused = run_command(["check-config", str(config)], env=clean_env(**provider_only))
    assert refused.returncode == 78, refused.stderr
    assert "http.listen: 0.0.0.0:8080" in refused.stderr
    assert "smtp.listen: 0.0.0.0:2525" in refused.stderr


async def test_the_docker_recipes_config_serves_the_name_clients_use(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The recipe's own config.toml (mounted over the image's): a client of another host
    that calls the bridge by name with the scripts token is served. Without
    `allowed_hosts` a 0.0.0.0 listener serves IP addresses and localhost only: 400."""
    [snippet] = [s for s in toml_snippets(RECIPES) if s.startswith("# ./config.toml")]
    snippet = with_secret_files(snippet, tmp_path).replace("/data/", f"{tmp_path}/")
    snippet = re.sub(
        r"^base_url = .*$", f'base_url = "{sandbox_url}/api/v1"', snippet, flags=re.MULTILINE
    )
    config = load_config(write_config(tmp_path, toml_snippets(RECIPES)[0] + snippet), env={})
    token = (tmp_path / "secrets" / "scripts.token").read_text().strip()
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:
        response = await http.post(
            f"{url}/api/v1/messages",
            json={"to": ["oncall"], "message": "backup of nas-1 failed"},
            headers={"Host": "sms-bridge.example.org", "Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 202, response.text


@pytest.mark.slow  # runs bash
def test_every_shell_block_parses() -> None:
    """The blocks this machine cannot run (apt-get, systemctl, docker) at least parse
    as the shell reads them; the others are run by the tests above."""
    for doc in (README, RECIPES, SECURITY):
        for block in blocks(doc, "sh"):
            result = subprocess.run(
                ["bash", "-n"], input=block, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, f"{doc.name}:\n{block}\n{result.stderr}"


def test_the_prometheus_scrape_config_reads_the_metrics_token() -> None:
    """No promtool here: the YAML parses, and it sends the `metrics` token as a bearer
    over the scheme and to the port the recipe's bridge serves."""
    import yaml

    section = section_of(RECIPES, "Prometheus scraping /metrics")
    [block] = blocks_in(section, "yaml")
    [job] = yaml.safe_load(block)["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].endswith(".token")
    assert job["scheme"] == "https"
    [target] = job["static_configs"][0]["targets"]
    assert target.endswith(":8080")
    assert 'scopes = ["metrics"]' in section


@pytest.mark.slow  # runs a subprocess
def test_the_alertmanager_config_passes_amtool(tmp_path) -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian: prometheus-alertmanager)")
    [yaml] = blocks_in(section_of(RECIPES, "Prometheus Alertmanager"), "yaml")
    token = tmp_path / "sms-bridge.token"
    token.write_text("0123456789abcdef01234567\n")
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.replace("/etc/alertmanager/sms-bridge.token", str(token)))
    result = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "/hooks/alertmanager" in yaml and "[routes.alertmanager]" in section_of(
        RECIPES, "Prometheus Alertmanager"
    )


@pytest.mark.slow  # runs a subprocess
def test_the_postfix_snippet_passes_postconf(tmp_path) -> None:
    postconf = shutil.which("postconf") or (
        "/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None
    )
    [block] = blocks_in(section_of(RECIPES, "Postfix relaying a domain to the bridge"), "")
    main_cf, transport = block.split("# /etc/postfix/transport")
    assert "relay_domains = sms.example.org" in main_cf  # else 454 Relay access denied
    if postconf is None:
        pytest.skip("postconf not installed (Debian: postfix)")
    (tmp_path / "main.cf").write_text(main_cf)
    (tmp_path / "master.cf").write_text("")
    result = subprocess.run(
        [postconf, "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "relay_domains = sms.example.org" in result.stdout
    assert "transport_maps = hash:/etc/postfix/transport" in result.stdout
    # the transport line, compiled by postmap as the comment says to
    (tmp_path / "transport").write_text(transport.split("\n", 1)[1])
    postmap = Path(postconf).with_name("postmap")
    made = subprocess.run(
        [str(postmap), "-c", str(tmp_path), f"hash:{tmp_path / 'transport'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0 and not made.stderr, made.stderr
    looked_up = subprocess.run(
        [
            str(postmap),
            "-c",
            str(tmp_path),
            "-q",
            "sms.example.org",
            f"hash:{tmp_path / 'transport'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert looked_up.stdout.strip() == "smtp:[127.0.0.1]:2525"


def blocks_in(text: str, lang: str) -> list[str]:
    return [body for kind, body in _FENCE.findall(text) if kind == lang]


@pytest.mark.slow  # runs a subprocess
def test_the_unit_passes_systemd_analyze_and_starts_the_recipes_venv(tmp_path) -> None:
    analyze = shutil.which("systemd-analyze")
    unit = (ROOT / "systemd" / "sms-bridge.service").read_text(encoding="utf-8")
    systemd = section_of(RECIPES, "systemd")
    venv = re.search(r"python3 -m venv (\S+)", systemd)
    assert venv is not None
    executable = f"{venv.group(1)}/bin/sms-bridge"
    assert f"ExecStart={executable} serve" in unit
    assert f"{venv.group(1)}/bin/pip install" in systemd
    # The unit's own comment gives the install the recipe gives, command for command.
    recipe = {
        command.strip()
        for line in blocks_in(systemd, "sh")[0].splitlines()
        for command in line.partition("#")[0].split("&&")
    }
    header = unit[: unit.index("# The provider key")]
    for line in re.findall(r"^#   (\S.*)$", header, re.MULTILINE):
        for command in line.split("&&"):
            assert command.strip() in recipe, command
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify wants the ExecStart binary to exist: a stand-in of ours, at a path we own.
    stand_in = tmp_path / "sms-bridge"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    [drop_in] = blocks_in(systemd, "ini")
    service = unit.replace(executable, str(stand_in)).replace(
        "[Install]", drop_in.replace("[Service]\n", "") + "\n[Install]"
    )
    path = tmp_path / "sms-bridge.service"
    path.write_text(service)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.slow  # runs a subprocess
def test_the_systemd_credentials_reach_the_config_the_recipe_installs(tmp_path) -> None:
    """The drop-in as systemd applies it to the installed config.example.toml: each
    LoadCredential= file in the credentials directory (`%d`), each Environment= setting
    with `%d` expanded, and the unit's own Environment=. check-config accepts it, and
    the route and the token read the credentials' secrets, not the config's."""
    systemd = section_of(RECIPES, "systemd")
    assert "cp config.example.toml /etc/sms-bridge/config.toml" in systemd
    [drop_in] = blocks_in(systemd, "ini")
    unit = (ROOT / "systemd" / "sms-bridge.service").read_text(encoding="utf-8")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    env: dict[str, str] = {}
    for line in (unit + drop_in).splitlines():
        if line.startswith("LoadCredential="):
            name, _, source = line.removeprefix("LoadCredential=").partition(":")
            assert source.startswith("/etc/sms-bridge/"), source
            secret = hashlib.sha256(name.encode()).hexdigest()[:24]
            (credentials / name).write_text(secret + "\n")
        elif line.startswith("Environment="):
            for setting in line.removeprefix("Environment=").split():
                key, _, value = setting.partition("=")
                env[key] = value.replace("%d", str(credentials))
    env["SMS_BRIDGE_STORE_PATH"] = str(tmp_path / "sms-bridge.db")  # /var/lib is not ours
    result = run_command(["check-config", str(EXAMPLE)], cwd=tmp_path, env=clean_env(**env))
    assert result.returncode == 0, result.stderr
    config = load_config(EXAMPLE, env=env)
    secret = (credentials / "alertmanager.token").read_text().strip()
    assert config.routes["alertmanager"].token == secret
    assert config.tokens["scripts"].token == (credentials / "scripts.token").read_text().strip()
    assert config.tokens["scripts"].scopes == ("send",)


def test_every_config_key_the_docs_name_exists() -> None:
    """`section.key` anywhere in the docs, and every key of every TOML snippet."""
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    fields["routes.NAME"] = {f.name for f in dataclasses.fields(RouteConfig)}
    fields["tokens.NAME"] = {f.name for f in dataclasses.fields(TokenConfig)}
    # not inside a file or host name: console-phone.png, sms.example.org
    named = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_]+)\b")
    seen = 0
    for doc in (README, RECIPES, TROUBLESHOOTING, ROOT / "config.example.toml"):
        text = doc.read_text(encoding="utf-8")
        for section, key in named.findall(text):
            if key in ("md", "db", "toml", "example", "localhost", "internal"):
                continue  # file and host names: sms-bridge.db, sms.example.org
            seen += 1
            assert key in fields[section], f"{doc.name} names {section}.{key}: no such key"
    assert seen > 20


EXAMPLE = ROOT / "config.example.toml"


def _uncommented(text: str, start: str) -> str:
    """The example table that starts at `start` (its header, commented or not) with its
    `# key = value` lines uncommented, up to the first blank line; comment-only lines
    (a key's explanation going on) are left out."""
    lines = text[text.index(start) :].splitlines()
    kept = []
    for line in lines:
        if not line.strip():
            break
        if found := re.match(r"^(?:# ?)?((?:\[|[a-z_]+ = ).*)$", line):
            kept.append(found.group(1))
        else:
            assert line.lstrip().startswith("#"), line
    return "\n".join(kept) + "\n"


def test_config_example_shows_every_route_token_and_rule_key() -> None:
    """Each route, token and mail-rule key at least in a commented example (the sections'
    keys at their defaults: tests/test_config.py; the examples load: the next test)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    route = _uncommented(text, "[routes.alertmanager]")
    for key in {f.name for f in dataclasses.fields(RouteConfig)} - {"name"}:
        assert re.search(rf"^{key} = ", route, re.MULTILINE), f"routes.NAME.{key}"
    rule = _uncommented(text, "# [[smtp.rules]]")
    for key in {f.name for f in dataclasses.fields(MailRule)}:
        assert re.search(rf"^{key} = ", rule, re.MULTILINE), f"smtp.rules.{key}"
    token = _uncommented(text, "# [tokens.deploy]")
    for key in {f.name for f in dataclasses.fields(TokenConfig)} - {"name", "token"}:
        assert re.search(rf"^{key} = ", token, re.MULTILINE), f"tokens.NAME.{key}"
    assert re.search(r"^token_file = .*# or token = ", token, re.MULTILINE)


@pytest.mark.slow  # runs a subprocess
def test_config_examples_commented_keys_pass_check_config(tmp_path) -> None:
    """Uncommented, as a reader would, the example's route keys, rule and tokens load
    through check-config: no key the loader refuses."""
    text = EXAMPLE.read_text(encoding="utf-8")
    head = text[: text.index("[routes.alertmanager]")]
    rule_start = head.index("# [[smtp.rules]]")
    rule_end = head.index("\n\n", rule_start) + 1
    body = (
        head[:rule_start]
        + _uncommented(text, "# [[smtp.rules]]")
        + head[rule_end:]
        + _uncommented(text, "# [tokens.deploy]")
        + _uncommented(text, "[routes.alertmanager]").replace(
            'secret = ""', 'secret = "0123456789abcdef0123"'
        )
    )
    result = check_config(body, tmp_path, "uncommented.toml")
    assert result.returncode == 0, f"{body}\n{result.stderr}"
    config = load_config(tmp_path / "uncommented.toml", env={})
    assert [rule.name for rule in config.smtp.rules] == ["proxmox vzdump"]
    assert set(config.tokens) == {"deploy", "prometheus"}


def test_the_docs_name_every_override_form_the_loader_reads() -> None:
    text = README.read_text(encoding="utf-8")
    assert "SMS_BRIDGE_ROUTES_<NAME>_<KEY>" in text
    assert "SMS_BRIDGE_ROUTES_ALERTMANAGER_TOKEN" in text
    assert "(webhooks: coming)" not in (ROOT / "config.example.toml").read_text()


def _readme_first_block() -> tuple[str, str]:
    """The README's first lines: its first block, right under the title, of two commands
    (install and serve, install the test extras and test), each under its comment."""
    text = README.read_text(encoding="utf-8")
    first = _FENCE.search(text)
    assert first is not None and first.group(1) == "sh"
    assert text[: first.start()].strip() == "# sms-bridge"  # nothing to read before it
    lines = first.group(2).strip().splitlines()
    serve, test = [line for line in lines if not line.startswith("#")]
    return serve, test


def test_the_readmes_test_command_is_what_ci_runs() -> None:
    """The second line, as .ci/run runs it in a fresh virtualenv (CI's own install is the
    proof that the line installs; this test does not run pytest inside pytest)."""
    _serve, test = _readme_first_block()
    assert test == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && pytest"
    )
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'python3 -m venv "$venv"' in ci and 'source "$venv/bin/activate"' in ci
    assert "pip install --quiet -e '.[test]'" in ci
    assert re.search(r"^SMS_BRIDGE_NO_SKIPS=1 pytest$", ci, re.MULTILINE)


# A fresh Debian 12 / Ubuntu 23.04+: python3 and a pip that refuses to install outside a
# virtualenv (PEP 668), as /usr/bin/pip on this machine does.
_SYSTEM_PIP = """#!/bin/sh
echo "error: externally-managed-environment" >&2
exit 1
"""
# python3 -m venv DIR, for real (its activate script), but with a pip that records what
# it was asked (CI installs for real) and the bridge of this checkout as `sms-bridge`.
_PYTHON3 = """#!{python}
import subprocess, sys
from pathlib import Path
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
venv = Path(sys.argv[3])
subprocess.run(["{python}", "-m", "venv", "--without-pip", str(venv)], check=True)
(venv / "bin" / "pip").write_text('#!/bin/sh\\necho "$@" > {asked}\\n')
(venv / "bin" / "sms-bridge").write_text('#!/bin/sh\\nexec {python} -m bridge "$@"\\n')
for name in ("pip", "sms-bridge"):
    (venv / "bin" / name).chmod(0o755)
"""


@pytest.mark.slow  # runs the bridge
def test_the_readmes_first_line_serves_on_built_in_defaults(tmp_path) -> None:
    """The first line, run by bash as pasted in a new directory of a fresh machine
    (python3, a system pip that refuses, no sms-bridge): the virtualenv is made and
    activated for real, the install is a stand-in, `sms-bridge serve` is real and takes
    a message on its defaults (sandbox, no key, SQLite in ./sms-bridge.db). Only the
    ports change (8080 may be taken). "pip install -e . && sms-bridge serve" alone was
    refused by the system's pip."""
    serve, _test = _readme_first_block()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "pip-args"
    (bin_dir / "pip").write_text(_SYSTEM_PIP)
    (bin_dir / "python3").write_text(_PYTHON3.format(python=sys.executable, asked=asked))
    for name in ("pip", "python3"):
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(
        SMS_BRIDGE_HTTP_LISTEN="127.0.0.1:0",
        SMS_BRIDGE_SMTP_LISTEN="127.0.0.1:0",
        PATH=os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]),
    )
    env.pop("VIRTUAL_ENV", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", serve],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        found = wait_for(
            lambda: (
                re.search(r"HTTP listening on (\S+)", log.read_text()) or shell.poll() is not None
            ),
            what="the bridge to listen",
        )
        assert isinstance(found, re.Match), log.read_text()
        url = f"http://{found.group(1)}"
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        sent = httpx.post(
            f"{url}/api/v1/messages",
            json={"to": "+12025550143", "message": "disk full on db-2"},
            timeout=10,
        )
        assert sent.status_code == 202, sent.text
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(timeout=30)
    assert asked.read_text().split() == ["install", "-e", "."]
    output = log.read_text()
    assert "using the in-process sandbox provider" in output
    assert "bridge: stopped" in output, output  # drained on SIGTERM
    assert (work / "sms-bridge.db").exists()
    assert (work / ".venv" / "bin" / "activate").exists()


@pytest.mark.slow
def test_the_readme_try_it_block_runs_pasted_as_one_script(tmp_path) -> None:
    """The README's own block, run by bash in an empty directory. Only the ports change
    (other tests may hold 8080 and 2525); every line runs as written. The one place a
    port is picked before the bridge starts: the pasted block must name its ports."""
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed (Debian: swaks)")
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    [script] = blocks_in(section_of(README, "Try it"), "sh")
    http, smtp = free_port(), free_port()
    script = script.replace("localhost:8080", f"localhost:{http}").replace(
        "127.0.0.1:2525", f"127.0.0.1:{smtp}"
    )
    env = clean_env(
        SMS_BRIDGE_HTTP_LISTEN=f"127.0.0.1:{http}",
        SMS_BRIDGE_SMTP_LISTEN=f"127.0.0.1:{smtp}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    work = tmp_path / "work"  # the empty directory the text asks for
    returncode, out, err = run_pasted(script, work, env, timeout=90)
    assert returncode == 0, err
    promised = re.search(r"^# (\{\"ids\".*\})$", script, re.MULTILINE)
    assert promised is not None
    lines = out.splitlines()
    assert lines[0] == promised.group(1)  # the POST answered what the comment says
    assert '"state":"delivered"' in lines[1]  # the GET after the wait
    table = [ln for ln in lines if ln.startswith("1 ")]
    assert table and "delivered" in table[0] and "disk full on db-2" in table[0]
    assert "250 2.0.0 OK: stored as message 2" in out  # swaks took the number
    assert f"store: {work / 'sms-bridge.db'}" in err


def run_pasted(
    script: str, work: Path, env: dict[str, str], timeout: float
) -> tuple[int, str, str]:
    """`script` run by `bash -e` in the new empty directory `work`, as a reader pastes it;
    whatever it left running (`serve &`) is stopped after. Exit code, stdout, stderr."""
    work.mkdir()
    out_path, err_path = work.parent / "out", work.parent / "err"
    with open(out_path, "w") as out_file, open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=work,
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,  # the block's `serve &` is in our process group
        )
        try:
            proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):  # a block that left nothing running
                os.killpg(proc.pid, signal.SIGTERM)
    return proc.returncode, out_path.read_text(), err_path.read_text()


def recipe_route(name: str, tmp_path: Path, sandbox_url: str) -> Config:
    """The recipe's `[routes.NAME]` snippet (with the oncall group), as a bridge config."""
    [snippet] = [s for s in toml_snippets(RECIPES) if f"[routes.{name}]" in s]
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + toml_snippets(RECIPES)[0]
        + with_secret_files(snippet, tmp_path)
    )
    return load_config(write_config(tmp_path, body), env={})


async def test_the_grafana_recipe_accepts_what_grafana_sends_by_default(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Grafana signs the body and sends no timestamp header unless told to: the recipe's
    route must take such a request (it answered 401 to every one)."""
    config = recipe_route("grafana", tmp_path, sandbox_url)
    secret = (tmp_path / "secrets" / "grafana.hmac").read_text().strip().encode()
    body = (HOOKS / "grafana-firing.json").read_bytes()
    signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:
        response = await http.post(
            f"{url}/hooks/grafana",
            content=body,
            headers={"content-type": "application/json", "X-Grafana-Alerting-Signature": signature},
        )
    assert response.status_code == 202, response.text


async def test_the_alertmanager_yaml_authenticates_to_the_recipes_route(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """What the recipe's alertmanager.yml makes Alertmanager send (the `authorization`
    type and the credentials file's text, which the text says is the route's token, to
    the URL's path) is taken by the recipe's route; without it, 401."""
    import yaml

    config = recipe_route("alertmanager", tmp_path, sandbox_url)
    [block] = blocks_in(section_of(RECIPES, "Prometheus Alertmanager"), "yaml")
    [receiver] = yaml.safe_load(block)["receivers"]
    [webhook] = receiver["webhook_configs"]
    authorization = webhook["http_config"]["authorization"]
    # "copy the token to /etc/alertmanager/sms-bridge.token"; Alertmanager trims it
    credentials = (tmp_path / "secrets" / "alertmanager.token").read_text().strip()
    path = httpx.URL(webhook["url"]).path
    body = (HOOKS / "alertmanager-firing.json").read_bytes()
    headers = {"content-type": "application/json"}
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:
        refused = await http.post(f"{url}{path}", content=body, headers=headers)
        assert refused.status_code == 401
        response = await http.post(
            f"{url}{path}",
            content=body,
            headers={**headers, "Authorization": f"{authorization['type']} {credentials}"},
        )
    assert response.status_code == 202, response.text
    assert len(response.json()["ids"]) == 2  # the oncall group


async def test_the_uptime_kuma_recipe_texts_its_webhook_with_the_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Uptime Kuma's webhook (its JSON: `heartbeat`, `monitor`, `msg`) with the header the
    recipe puts in its Additional Headers; the route named in the recipe's URL."""
    config = recipe_route("uptime-kuma", tmp_path, sandbox_url)
    section = section_of(RECIPES, "Uptime Kuma, Netdata, Synology, QNAP")
    headers = json.loads(re.search(r"`(\{\"Authorization\": .*?\})`", section).group(1))  # type: ignore[union-attr]
    token = (tmp_path / "secrets" / "uptime-kuma.token").read_text().strip()
    headers["Authorization"] = headers["Authorization"].replace("TOKEN", token)
    path = httpx.URL(re.search(r"`(https://\S+/hooks/\S+)`", section).group(1)).path  # type: ignore[union-attr]
    down = "[NAS web UI] [\U0001f534 Down] connect ECONNREFUSED nas.example.org:443"
    notification = {
        "heartbeat": {
            "monitorID": 3,
            "status": 0,
            "time": "2026-11-30 22:14:05.123",
            "msg": "connect ECONNREFUSED nas.example.org:443",
            "important": True,
        },
        "monitor": {
            "id": 3,
            "name": "NAS web UI",
            "url": "https://nas.example.org",
            "type": "http",
        },
        "msg": down,
    }
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        refused = await http.post(f"{url}{path}", json=notification)
        assert refused.status_code == 401
        response = await http.post(f"{url}{path}", json=notification, headers=headers)
        assert response.status_code == 202, response.text
        texts = {(await bridge.store.get(i)).text for i in response.json()["ids"]}
    assert texts == {down}


async def test_the_jenkins_recipe_texts_a_jenkins_notification(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The template check-config only warns about works on what Jenkins' Notification
    plugin posts, with the recipe's basic auth."""
    config = recipe_route("jenkins", tmp_path, sandbox_url)
    password = (tmp_path / "secrets" / "jenkins.password").read_text().strip()
    notification = {
        "name": "nightly",
        "url": "job/nightly/",
        "build": {
            "full_url": "https://ci.example.org/job/nightly/42/",
            "number": 42,
            "phase": "COMPLETED",
            "status": "FAILURE",
        },
    }
    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        refused = await http.post(f"{url}/hooks/jenkins", json=notification)
        assert refused.status_code == 401
        response = await http.post(
            f"{url}/hooks/jenkins", json=notification, auth=("jenkins", password)
        )
        assert response.status_code == 202, response.text
        texts = {(await bridge.store.get(i)).text for i in response.json()["ids"]}
    assert texts == {"Jenkins nightly #42: FAILURE"}
    assert len(response.json()["ids"]) == 2  # the oncall group's two phones


def test_senders_are_pointed_at_an_address_the_bridge_serves() -> None:
    """No plain-HTTP address the bridge does not listen on: https (the TLS proxy), the
    loopback, or the host of the "listening on the network directly" setting."""
    text = RECIPES.read_text(encoding="utf-8")
    for url in re.findall(r"https?://[^\s`)\"'>]+", text):
        assert url.startswith(("https://", "http://127.0.0.1:", "http://THIS-HOST:")), url
    reach = section_of(RECIPES, "Reaching the bridge from other hosts")
    assert 'listen = "0.0.0.0:8080"' in reach and "[tokens." in reach
    assert "reverse_proxy 127.0.0.1:8080" in reach  # TLS in front of the loopback bridge
    # No nginx here: its block proxies to where the section's bridge listens, passes the
    # Host its allowed_hosts judges and the client address its trusted_proxies believes.
    behind = section_of(RECIPES, "Behind a reverse proxy")
    [nginx] = blocks_in(behind, "nginx")
    [toml] = blocks_in(behind, "toml")
    listen = tomllib.loads(toml)["http"]["listen"]
    assert f"proxy_pass http://{listen};" in nginx
    assert "proxy_set_header Host $host;" in nginx
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in nginx
    assert tomllib.loads(toml)["http"]["trusted_proxies"] == ["127.0.0.1/32"]


@pytest.mark.slow  # runs a subprocess
def test_the_secret_security_md_makes_is_long_enough_for_a_token(tmp_path) -> None:
    """security.md's one-liner, run as written, makes a token check-config accepts."""
    [command] = blocks(SECURITY, "sh")
    made = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True
    )
    secret = made.stdout.strip()
    assert len(secret) == int(re.search(r"# (\d+) characters", command).group(1))  # type: ignore[union-attr]
    result = check_config(
        f'[tokens.ci]\ntoken = "{secret}"\nscopes = ["send"]\n', tmp_path, "made.toml"
    )
    assert result.returncode == 0, result.stderr


async def _curl_block(block: str, curl_options: str, cwd: Path, home: Path) -> list[str]:
    """A doc's curl block run by bash as pasted, each curl given `curl_options` (where to
    connect, which CA) and told to print its status code: the output's lines."""
    script = block.replace("curl -s ", f"curl -s {curl_options} -w '\\n%{{http_code}}\\n' ")
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-e",
        "-c",
        script,
        cwd=cwd,
        env=clean_env(HOME=str(home)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


def _tls_bridge_config(tmp_path: Path, sandbox_url: str, snippet: str) -> Path:
    """`snippet` (the doc's [http] and [tokens.*]) served over HTTPS with a test CA's
    certificate, on the sandbox, with the recipes' oncall group."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("sms-bridge.example.org", "sms.example.org")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "bridge.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    snippet = with_secret_files(snippet, tmp_path)
    snippet = re.sub(r"^(tls_cert|tls_key) = .*$", "", snippet, flags=re.MULTILINE)
    pem = tmp_path / "bridge.pem"
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + toml_snippets(RECIPES)[0]
        + snippet.replace("[http]\n", f'[http]\ntls_cert = "{pem}"\ntls_key = "{pem}"\n')
    )
    return write_config(tmp_path, body)


@pytest.mark.slow  # runs bash and curl
async def test_the_recipes_remote_curl_sends_with_the_scripts_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """ "Any script" from another host, against the bridge of "Reaching the bridge from
    other hosts" (the TLS proxy's port stands in for 443): 202 with the scripts token in
    the file the block reads, 401 with a wrong one, and nothing stored for it."""
    [snippet] = [s for s in toml_snippets(RECIPES) if "[tokens.scripts]" in s][:1]
    config = load_config(_tls_bridge_config(tmp_path, sandbox_url, snippet), env={})
    token = (tmp_path / "secrets" / "scripts.token").read_text()
    [_local, remote] = blocks_in(section_of(RECIPES, "Any script"), "sh")
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    async with running_bridge(config, clock) as (bridge, url):
        options = (
            f"--connect-to sms-bridge.example.org:443:127.0.0.1:{url.rpartition(':')[2]} "
            f"--cacert {tmp_path / 'ca.pem'}"
        )
        (home / ".config" / "sms-bridge.token").write_text("not-the-scripts-token-at-all\n")
        *_, refused = await _curl_block(remote, options, tmp_path, home)
        assert refused == "401"
        (home / ".config" / "sms-bridge.token").write_text(token)
        *answer, code = await _curl_block(remote, options, tmp_path, home)
        assert code == "202", answer
        assert json.loads(" ".join(answer))["ids"] == [1, 2]  # the oncall group's phones
        assert (await bridge.store.get(1)).text == "backup of nas-1 failed"


@pytest.mark.slow  # runs bash
async def test_the_recipes_curl_on_the_proxied_bridges_own_host(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The "Any script" token block on the bridge's own host (`http://127.0.0.1:8080`, as
    the text says), against the bridge of "A TLS proxy in front": its `allowed_hosts`
    names only the proxy's name, and loopback names are served whatever the list (when a
    list replaced them, every local script and the console got 400 "Host '127.0.0.1:8080'
    is not served here")."""
    [snippet] = [s for s in toml_snippets(RECIPES) if "[tokens.scripts]" in s][:1]
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + toml_snippets(RECIPES)[0]
        + with_secret_files(snippet, tmp_path)
    )
    config = load_config(write_config(tmp_path, body), env={})
    token = (tmp_path / "secrets" / "scripts.token").read_text()
    [local, remote] = blocks_in(section_of(RECIPES, "Any script"), "sh")
    assert "`http://127.0.0.1:8080` in place of\n`https://sms-bridge.example.org`" in (
        section_of(RECIPES, "Any script")
    )
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "sms-bridge.token").write_text(token)
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:
        port = url.rpartition(":")[2]
        block = remote.replace("https://sms-bridge.example.org", f"http://127.0.0.1:{port}")
        *answer, code = await _curl_block(block, "", tmp_path, home)
        assert code == "202", answer
        console = await http.get(f"http://localhost:{port}/ui/", follow_redirects=True)
        assert console.status_code == 200, console.text  # the sign-in page
        *answer, code = await _curl_block(
            local.replace("http://127.0.0.1:8080", url), "", tmp_path, home
        )
    assert code == "401", answer  # "every API call needs one, from the bridge's own host too"


# What each CI sets for its job (names as GitLab and GitHub document them).
_CI_VARIABLES = {
    "gitlab": {
        "CI_PROJECT_PATH": "octo-group/api",
        "CI_PIPELINE_ID": "4211",
        "CI_COMMIT_REF_NAME": "main",
    },
    "github": {
        "GITHUB_REPOSITORY": "octo-org/api",
        "GITHUB_WORKFLOW": "test",
        "GITHUB_REF_NAME": "main",
        "GITHUB_RUN_ID": "9912",
    },
}


def _ci_scripts() -> dict[str, str]:
    """The shell each CI block runs on failure, as the CI reads it from the YAML."""
    import yaml

    gitlab, github = (
        yaml.safe_load(block)
        for block in blocks_in(section_of(RECIPES, "A CI job (GitLab CI, GitHub Actions)"), "yaml")
    )
    job = gitlab["sms-on-failure"]
    assert job["when"] == "on_failure" and job["stage"] == ".post"
    assert job["image"]["entrypoint"] == [""]
    [gitlab_script] = job["script"]
    *_, step = github["jobs"]["test"]["steps"]
    assert step["if"] == "failure()"
    assert step["env"] == {"SMS_BRIDGE_TOKEN": "${{ secrets.SMS_BRIDGE_TOKEN }}"}
    return {"gitlab": gitlab_script, "github": step["run"]}


@pytest.mark.slow  # runs bash
async def test_the_ci_jobs_text_oncall_with_the_ci_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """Each CI block's script, run by bash with the variables its CI sets and the token
    in SMS_BRIDGE_TOKEN, against the bridge of the recipe's [tokens.ci] (HTTPS, as the
    URL says): the text reaches the oncall group; a wrong token fails the job (curl -f)
    and stores nothing."""
    # The bridge of "A TLS proxy in front" (the name the URL uses), with the CI's token.
    [proxied] = [s for s in toml_snippets(RECIPES) if "[tokens.scripts]" in s][:1]
    [snippet] = [s for s in toml_snippets(RECIPES) if "[tokens.ci]" in s]
    config = load_config(_tls_bridge_config(tmp_path, sandbox_url, proxied + snippet), env={})
    token = (tmp_path / "secrets" / "ci.token").read_text().strip()
    async with running_bridge(config, clock) as (bridge, url):
        options = (
            f"--connect-to sms-bridge.example.org:443:127.0.0.1:{url.rpartition(':')[2]} "
            f"--cacert {tmp_path / 'ca.pem'}"
        )
        for ci, script in _ci_scripts().items():
            script = script.replace("curl ", f"curl {options} ", 1)
            for secret, expected in (("wrong-token-wrong-token", 22), (token, 0)):
                proc = await asyncio.create_subprocess_exec(
                    "bash",
                    "-e",
                    "-c",
                    script,
                    cwd=tmp_path,
                    env=clean_env(SMS_BRIDGE_TOKEN=secret, **_CI_VARIABLES[ci]),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
                assert proc.returncode == expected, (ci, out, err)
            ids = json.loads(out)["ids"]
            assert len(ids) == 2, out  # the oncall group's phones
            message = await bridge.store.get(ids[0])
            assert message.token == "ci"
            texts = {
                "gitlab": "octo-group/api: pipeline 4211 failed on main",
                "github": "octo-org/api: test failed on main",
            }
            assert message.text == texts[ci]
        assert await bridge.store.get(5) is None  # the refused calls stored nothing


@pytest.mark.slow  # runs bash and curl
async def test_the_readme_remote_curl_sends_with_the_deploy_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The README's curl beside its [tokens.deploy] example, with the token file the
    comment makes, on the HTTPS listener the example configures. The comment, the config
    and the curl name one file (the curl read `deploy-token` in the current directory,
    the config /run/secrets/deploy-token); /run/secrets/ is the test's directory."""
    [snippet] = [s for s in toml_snippets(README) if "[tokens.deploy]" in s]
    path = _tls_bridge_config(tmp_path, sandbox_url, snippet)
    [block] = [b for b in blocks(README, "sh") if "deploy-token" in b]
    named = re.search(r'^token_file = "(\S+)"', snippet, re.MULTILINE)
    assert named is not None and f"$(cat {named.group(1)})" in block
    secrets = tmp_path / "secrets"
    block = block.replace("/run/secrets/", f"{secrets}/")
    # The token as the comment makes it, in the file the config names.
    made = re.search(r"# \((umask 077; openssl rand -hex 24 > (\S+))\)", snippet)
    assert made is not None and made.group(2) == named.group(1)
    (secrets / "deploy-token").unlink()  # with_secret_files' stand-in, made anew here
    maker = await asyncio.create_subprocess_exec(
        "bash", "-c", made.group(1).replace("/run/secrets/", f"{secrets}/"), cwd=tmp_path
    )
    assert await asyncio.wait_for(maker.wait(), timeout=60) == 0
    assert (secrets / "deploy-token").stat().st_mode & 0o077 == 0  # no warning for it
    config = load_config(path, env={})
    async with running_bridge(config, clock) as (_bridge, url):
        options = (
            f"--connect-to sms.example.org:8080:127.0.0.1:{url.rpartition(':')[2]} "
            f"--cacert {tmp_path / 'ca.pem'}"
        )
        *answer, code = await _curl_block(block, options, tmp_path, tmp_path)
    assert code == "202", answer
    assert len(json.loads(" ".join(answer))["ids"]) == 2  # "oncall"


@pytest.mark.slow  # runs bash and curl
async def test_the_recipes_local_curl_needs_no_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """ "On the bridge's own host, with no tokens configured": the first block as written
    (only the port changes), and again: the repeat is stored as a duplicate."""
    [local, _remote] = blocks_in(section_of(RECIPES, "Any script"), "sh")
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + toml_snippets(RECIPES)[0]
    )
    config = load_config(write_config(tmp_path, body), env={})
    async with running_bridge(config, clock) as (_bridge, url):
        block = local.replace("http://127.0.0.1:8080", url)
        *first, code = await _curl_block(block, "", tmp_path, tmp_path)
        assert code == "202", first
        *again, code = await _curl_block(block, "", tmp_path, tmp_path)
        assert code == "202", again
    states = [m["state"] for m in json.loads(" ".join(again))["messages"]]
    assert states == ["suppressed", "suppressed"]


@pytest.mark.slow  # runs bash and curl
async def test_the_recipes_storm_cancel_curl_cancels_with_an_admin_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """ "Cancelling a storm from a script" as pasted (only the port changes), with an
    `admin` token in the file the block reads: that phone's queued texts are cancelled
    and the answer counts them; with a `read` token in the file, a 403 and nothing
    cancelled."""
    from bridge.models import NewMessage, State
    from tests.stores import seed

    [block] = blocks_in(section_of(RECIPES, "Cancelling a storm from a script"), "sh")
    admin, reader = "storm-admin-0123456789abcdef", "storm-reader-0123456789abcdef"
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        f'[tokens.oncall]\ntoken = "{admin}"\nscopes = ["admin"]\n'
        f'[tokens.grafana]\ntoken = "{reader}"\nscopes = ["read"]\n'
    )
    config = load_config(write_config(tmp_path, body), env={})
    token_file = tmp_path / ".config" / "sms-bridge-admin.token"
    token_file.parent.mkdir()
    queued = NewMessage("+12025550143", "disk full", "http", "SMS", 1, 1)
    async with running_bridge(config, clock) as (bridge, url):
        ids = await seed(bridge.store, [queued, queued, queued._replace(state=State.HELD)], 1.0)
        block = block.replace("http://127.0.0.1:8080", url)
        token_file.write_text(reader + "\n")
        *refused, code = await _curl_block(block, "", tmp_path, tmp_path)
        assert code == "403", refused
        token_file.write_text(admin + "\n")
        *answer, code = await _curl_block(block, "", tmp_path, tmp_path)
        assert code == "200", answer
        assert json.loads(" ".join(answer)) == {
            "cancelled": 2,
            "in_flight": 0,
            "in_flight_more": False,
            "gone": 0,
            "more": False,
        }
        cancelled = [await bridge.store.get(i) for i in ids]
    assert [m.reason for m in cancelled] == ["cancelled by oncall"] * 2 + [None]


async def test_the_prometheus_recipes_token_reads_metrics_and_nothing_else(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    [snippet] = [s for s in toml_snippets(RECIPES) if "[tokens.prometheus]" in s]
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + with_secret_files(snippet, tmp_path)
    )
    config = load_config(write_config(tmp_path, body), env={})
    token = (tmp_path / "secrets" / "prometheus.token").read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    async with running_bridge(config, clock) as (_bridge, url), httpx.AsyncClient() as http:
        metrics = await http.get(f"{url}/metrics", headers=bearer)
        assert metrics.status_code == 200
        assert "sms_bridge_provider_ready" in metrics.text  # what the recipe alerts on
        assert (await http.get(f"{url}/metrics")).status_code == 401
        assert (await http.get(f"{url}/api/v1/messages", headers=bearer)).status_code == 403


async def test_every_metric_the_docs_name_is_served(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """An alert written from the docs (`increase(sms_bridge_budget_cap_mismatch_total[1h])`
    and the like) must name a series `/metrics` has: a renamed metric left in a doc is an
    alert that never fires. Every series is there from the start, at 0."""
    named: set[str] = set()
    labelled: set[tuple[str, str]] = set()  # (metric, label) of a selector: `{outcome!=...}`
    for doc in [README, ROOT / "config.example.toml", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text("utf-8")
        named |= set(re.findall(r"\bsms_bridge_[a-z0-9_]*[a-z0-9]", text))
        for metric, selector in re.findall(r"\b(sms_bridge_\w+)\{([^}]*)\}", text):
            labelled |= {(metric, label) for label in re.findall(r"(\w+)\s*[!=]~?", selector)}
    assert "sms_bridge_budget_cap_mismatch_total" in named  # the docs are read
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
    )
    config = load_config(write_config(tmp_path, body), env={})

    def unserved(metrics: str) -> list[str]:
        served = set(re.findall(r"^(sms_bridge_\w+)(?:\{| )", metrics, re.MULTILINE))
        # A histogram is named by its family (`_seconds`), served as `_bucket`, `_sum`...
        families = set(re.findall(r"^# TYPE (sms_bridge_\w+) ", metrics, re.MULTILINE))
        return sorted(named - served - families)

    async with running_bridge(config, clock) as (bridge, url), httpx.AsyncClient() as http:
        # The balance is served once the provider told it: in a send's answer.
        text = {"to": "+12025550143", "message": "disk full on db-2"}
        assert (await http.post(f"{url}/api/v1/messages", json=text)).status_code == 202
        await pump(bridge, clock, until=lambda: bridge.dispatcher.balance is not None)
        metrics = (await http.get(f"{url}/metrics")).text
        assert unserved(metrics) == []
    series = set(re.findall(r"^(sms_bridge_\w+)\{([^}]*)\}", metrics, re.MULTILINE))
    served_labels = {(m, label) for m, labels in series for label in re.findall(r"(\w+)=", labels)}
    # A loop's series come with its loop (not started here): judged where one is served.
    judged = {(m, label) for m, label in labelled if any(m == s for s, _ in series)}
    assert judged and sorted(judged - served_labels) == []


def _caddy_bridge(tmp_path: Path, sandbox_url: str, snippet: str, name: str) -> Path:
    """The bridge of "A TLS proxy in front": the recipe's [http] and [tokens.scripts], and
    config.example.toml's [routes.alertmanager] as it ships (token "", allowed_networks
    of loopback), with a provider that counts as real (base_url set)."""
    shipped = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["routes"]["alertmanager"]
    route = "".join(f"{key} = {json.dumps(value)}\n" for key, value in shipped.items())
    body = (
        f'[store]\npath = "{tmp_path / "bridge.db"}"\n'
        f'[provider]\nbase_url = "{sandbox_url}/api/v1"\napi_key = "test-key"\n'
        + toml_snippets(RECIPES)[0]
        + with_secret_files(snippet, tmp_path)
        + "\n[routes.alertmanager]\n"
        + route
    )
    path = write_config(tmp_path, body, name)
    path.chmod(0o600)
    return path


@pytest.mark.slow  # runs check-config
async def test_the_caddy_recipe_lets_no_one_through_the_example_route(
    tmp_path, clock: ManualClock, sandbox_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind Caddy every caller is 127.0.0.1: the recipe without `trusted_proxies` let
    anyone on the Internet through config.example.toml's loopback-only alertmanager route
    (token "") to text the on-call group, and check-config said OK. Refused now, naming
    the route and the fix; the recipe as written passes, and judges the client Caddy
    names in X-Forwarded-For: an Internet caller refused (401, as every hook refusal
    is answered; the log says it was the address), a local Alertmanager 202."""
    [snippet] = [s for s in toml_snippets(RECIPES) if "[tokens.scripts]" in s][:1]
    assert 'trusted_proxies = ["127.0.0.1/32"]' in snippet
    without = re.sub(r"^trusted_proxies = .*\n", "", snippet, flags=re.MULTILINE)
    open_config = _caddy_bridge(tmp_path, sandbox_url, without, "open.toml")
    for command in ("check-config", "serve"):
        refused = run_command([command, "--config", str(open_config)], env=clean_env())
        assert refused.returncode == 78, (command, refused.stderr)
        [said] = [line for line in refused.stderr.splitlines() if "routes.alertmanager" in line]
        assert "'sms-bridge.example.org' with no http.trusted_proxies" in said
        assert 'set http.trusted_proxies to the proxy\'s address (e.g. ["127.0.0.1/32"])' in said
    assert not (tmp_path / "bridge.db").exists()  # refused before anything opened

    config = _caddy_bridge(tmp_path, sandbox_url, snippet, "recipe.toml")
    accepted = run_command(["check-config", str(config)], env=clean_env())
    assert accepted.returncode == 0, accepted.stderr
    body = (HOOKS / "alertmanager-firing.json").read_bytes()
    headers = {"content-type": "application/json", "host": "sms-bridge.example.org"}
    async with (
        running_bridge(load_config(config, env={}), clock) as (bridge, url),
        httpx.AsyncClient() as http,
    ):
        hook = f"{url}/hooks/alertmanager"
        # What Caddy passes on for a caller on the Internet (it sets X-Forwarded-For).
        outside = await http.post(
            hook, content=body, headers={**headers, "x-forwarded-for": "203.0.113.9"}
        )
        assert outside.status_code == 401, outside.text
        assert "client 203.0.113.9 is not allowed on this route" in caplog.text
        assert await bridge.store.get(1) is None
        local = await http.post(hook, content=body, headers=headers)  # Alertmanager here
        assert local.status_code == 202, local.text


@pytest.mark.slow  # runs install
@pytest.mark.parametrize(
    ("heading", "unit"),
    [
        ("Prometheus Alertmanager", "prometheus-alertmanager.service"),
        ("Prometheus scraping /metrics", "prometheus.service"),
    ],
)
def test_the_token_copy_is_readable_by_the_reader_and_no_one_else(
    tmp_path, heading: str, unit: str
) -> None:
    """Alertmanager and Prometheus read the bridge's token from a copy of their own: the
    recipe said "copy the token", and the copy root made stayed root's 0600 while
    Debian runs both as `prometheus`: every notification failed to read it. The
    install line copies what the bridge's config names to what the YAML reads, 0640, in
    the group of the user Debian's unit runs as (checked where that unit is installed)."""
    section = section_of(RECIPES, heading)
    [install] = [b for b in blocks_in(section, "sh") if b.startswith("install ")]
    words = install.split()
    assert words[:5] == ["install", "-m", "640", "-g", "prometheus"], install
    source, target = words[5:]
    assert any(f'token_file = "{source}"' in toml for toml in blocks_in(section, "toml"))
    assert any(
        re.search(rf"credentials_file: {re.escape(target)}\s", yaml)
        for yaml in blocks_in(section, "yaml")
    )
    installed = Path("/lib/systemd/system") / unit
    if installed.exists():
        user = re.search(r"^User=(\S+)$", installed.read_text(), re.MULTILINE)
        assert user is not None and user.group(1) == "prometheus"
    try:
        group = grp.getgrnam("prometheus")
    except KeyError:
        pytest.skip("no group prometheus here to install into")
    if os.geteuid() != 0:
        pytest.skip("install -g needs root here")
    (tmp_path / "src").write_text("a-token-of-24-characters\n")
    os.chmod(tmp_path / "src", 0o600)  # as the bridge's own copy is
    script = install.replace(source, str(tmp_path / "src")).replace(target, str(tmp_path / "dst"))
    subprocess.run(["bash", "-e", "-c", script], check=True, timeout=30)
    made = (tmp_path / "dst").stat()
    assert stat.S_IMODE(made.st_mode) == 0o640 and made.st_gid == group.gr_gid


@pytest.mark.slow  # runs check-config
def test_the_systemd_check_config_line_sees_the_units_store(tmp_path) -> None:
    """The recipe's check-config on the installed config (config.example.toml in
    /etc/sms-bridge): the store it shows is the one the unit keeps (its
    SMS_BRIDGE_STORE_PATH), run by the venv's sms-bridge. Only the tree's root and the
    venv change."""
    [line] = [b for b in blocks_in(section_of(RECIPES, "systemd"), "sh") if "check-config" in b]
    unit = (ROOT / "systemd" / "sms-bridge.service").read_text(encoding="utf-8")
    kept = re.search(r"^Environment=SMS_BRIDGE_STORE_PATH=(\S+)$", unit, re.MULTILINE)
    assert kept is not None and f"SMS_BRIDGE_STORE_PATH={kept.group(1)} " in line
    assert "/opt/sms-bridge/venv/bin/sms-bridge check-config /etc/sms-bridge/config.toml" in line
    root = tmp_path / "root"
    (root / "etc" / "sms-bridge").mkdir(parents=True)
    (root / "var" / "lib" / "sms-bridge").mkdir(parents=True)
    shutil.copy(EXAMPLE, root / "etc" / "sms-bridge" / "config.toml")
    script = (
        line.replace("/opt/sms-bridge/venv/bin/", f"{Path(sys.executable).parent}/")
        .replace("=/var/lib/", f"={root}/var/lib/")
        .replace(" /etc/", f" {root}/etc/")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert f'"path": "{root}{kept.group(1)}"' in result.stdout

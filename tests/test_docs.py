"""The docs work when pasted: README and recipe snippets, read from the docs themselves,
through the real tools (sms-bridge check-config, amtool, systemd-analyze, postconf, bash).

A snippet that stops working fails here, not in a new user's terminal. Tools that are not
installed skip their check with the reason; nothing is copied out of the docs by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bridge.clock import ManualClock
from bridge.config import SECTIONS, Config, RouteConfig, TokenConfig, load_config
from tests.helpers import running_bridge, write_config
from tests.processes import clean_env, free_port, process, run_command
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
    secret (check-config asks only that such files exist), and `tls_cert`, `tls_key` at
    a certificate and its key (check-config loads them as the listener would)."""
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
            target.write_text("0123456789abcdef01234567\n")
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
    for table in ("alertmanager", "grafana", "github", "gitlab", "jenkins"):
        assert f"[routes.{table}]" in recipes
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
def test_the_images_healthcheck_asks_a_mail_only_bridge_for_its_smtp_greeting(tmp_path) -> None:
    """With `http.listen = ""` (a bridge that only takes mail) the HEALTHCHECK exited 1
    ("no HTTP listener to ask"): the container was "unhealthy" for ever, and the recipe
    said to run it with --no-healthcheck. It asks the SMTP listener for its greeting."""
    port = free_port()  # the check reads the port from the config: port 0 would not do
    config = write_config(
        tmp_path,
        f"""
        [http]
        listen = ""
        [smtp]
        listen = "0.0.0.0:{port}"
        [store]
        path = "{tmp_path / "bridge.db"}"
        """,
    )
    env = clean_env(
        SMS_BRIDGE_CONFIG=str(config),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )
    with process(["serve"], tmp_path, env, tmp_path / "serve.log") as proc:
        proc.address("SMTP")
        healthy = run_as_docker(images_healthcheck(), env, tmp_path)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"smtp://127.0.0.1:{port}: 220 " in healthy.stdout
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert "Traceback" not in proc.output() and "ERROR" not in proc.output()
    down = run_as_docker(images_healthcheck(), env, tmp_path)
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
    assert f"smtp://127.0.0.1:{port}: " in down.stderr
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
    env = clean_env(
        SMS_BRIDGE_CONFIG=str(config),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )

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


def test_the_docs_name_every_override_form_the_loader_reads() -> None:
    text = README.read_text(encoding="utf-8")
    assert "SMS_BRIDGE_ROUTES_<NAME>_<KEY>" in text
    assert "SMS_BRIDGE_ROUTES_ALERTMANAGER_TOKEN" in text
    assert "(webhooks: coming)" not in (ROOT / "config.example.toml").read_text()


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


async def test_the_readme_remote_curl_sends_with_the_deploy_token(
    tmp_path, clock: ManualClock, sandbox_url: str
) -> None:
    """The README's curl beside its [tokens.deploy] example, with the token file the
    comment makes, on the HTTPS listener the example configures."""
    [snippet] = [s for s in toml_snippets(README) if "[tokens.deploy]" in s]
    path = _tls_bridge_config(tmp_path, sandbox_url, snippet)
    [block] = [b for b in blocks(README, "sh") if "deploy-token" in b]
    # The token as the comment makes it, in the file the config names.
    made = re.search(r"# \((umask 077; openssl rand -hex 24 > deploy-token)\)", snippet)
    assert made is not None
    maker = await asyncio.create_subprocess_exec("bash", "-c", made.group(1), cwd=tmp_path)
    assert await asyncio.wait_for(maker.wait(), timeout=60) == 0
    assert (tmp_path / "deploy-token").stat().st_mode & 0o077 == 0  # no warning for it
    (tmp_path / "secrets" / "deploy-token").write_text((tmp_path / "deploy-token").read_text())
    config = load_config(path, env={})
    async with running_bridge(config, clock) as (_bridge, url):
        options = (
            f"--connect-to sms.example.org:8080:127.0.0.1:{url.rpartition(':')[2]} "
            f"--cacert {tmp_path / 'ca.pem'}"
        )
        *answer, code = await _curl_block(block, options, tmp_path, tmp_path)
    assert code == "202", answer
    assert len(json.loads(" ".join(answer))["ids"]) == 2  # "oncall"


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

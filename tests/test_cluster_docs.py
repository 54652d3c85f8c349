"""docs/cluster.md works as written: its "Try it on one machine" block run by bash
against a real PostgreSQL (two instances, one killed, its alert still sent once), the
Kubernetes manifests parsed and checked against the bridge's defaults (probes, ports,
secrets), every TOML block through check-config, every shell block through `bash -n`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bridge.clock import ManualClock
from bridge.config import StoreConfig, load_config
from bridge.config.sections import DEFAULT_HTTP_LISTEN
from bridge.models import NewMessage, State
from bridge.store import open_store
from bridge.store.copy import CopySummary
from tests.helpers import running_bridge, write_config
from tests.postgres import admin, find_binaries, fresh_database, new_database_name
from tests.processes import clean_env, free_port, run_command
from tests.stores import seed
from tests.test_docs import blocks, blocks_in, check_config, run_pasted, section_of

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "docs" / "cluster.md"


def _manifests() -> list[dict[str, Any]]:
    [block] = blocks_in(section_of(CLUSTER, "Kubernetes"), "yaml")
    return [doc for doc in yaml.safe_load_all(block) if doc]


def _kind(kind: str) -> dict[str, Any]:
    [found] = [m for m in _manifests() if m["kind"] == kind]
    return found


def _secret_block() -> str:
    [block] = blocks_in(section_of(CLUSTER, "Kubernetes"), "sh")
    return block


def _secret_keys() -> list[str]:
    """The keys the `kubectl create secret` line gives the Secret."""
    return re.findall(r"--from-(?:literal|file)=([\w-]+)=", _secret_block())


# `kubectl` for the block: the Secret's keys written as files where the pod mounts them
# (the directory in $SECRETS), `get secret ... jsonpath='{.data.KEY}'` their base64.
_KUBECTL = r"""
kubectl() {
  case "$1 $2" in
    "create secret")
      shift 4
      for arg in "$@"; do
        arg=${arg#--from-}; kind=${arg%%=*}; rest=${arg#*=}; key=${rest%%=*}; value=${rest#*=}
        if [ "$kind" = file ]; then cp "$value" "$SECRETS/$key"; else printf %s "$value" > "$SECRETS/$key"; fi
      done ;;
    "get secret")
      key=${5#*data.}; base64 < "$SECRETS/${key%\}}" ;;
    *) echo "kubectl $*: not simulated" >&2; return 1 ;;
  esac
}
"""


def _made_secret(tmp_path: Path) -> tuple[Path, str]:
    """The Secret's files as the block makes them (the provider's key file beside it),
    and what the block prints for the callers."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "sms-api-key.txt").write_text("live-key-0123456789\n")
    result = subprocess.run(
        ["bash", "-e", "-c", _KUBECTL + _secret_block()],
        cwd=work,
        env=clean_env(SECRETS=str(secrets)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return secrets, result.stdout


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def test_the_kubernetes_probes_and_ports_are_the_bridges() -> None:
    deployment = _kind("Deployment")
    config = tomllib.loads(_kind("ConfigMap")["data"]["config.toml"])
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    [container] = spec["containers"]
    http = _port(config["http"]["listen"])
    assert http == _port(DEFAULT_HTTP_LISTEN)  # the port the bridge's own docs name
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": http, "smtp": _port(config["smtp"]["listen"])}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http}
    assert container["args"] == ["serve"]
    [init] = spec["initContainers"]
    assert init["args"] == ["migrate"] and init["image"] == container["image"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SMS_BRIDGE_CLUSTER_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.name"
    )
    # What the config reads from files is what the Secret holds, where it is mounted.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert init["volumeMounts"] == container["volumeMounts"]
    secret_dir = mounts["secrets"]
    named = re.findall(
        rf'_file = "{secret_dir}/([\w-]+)"', _kind("ConfigMap")["data"]["config.toml"]
    )
    assert sorted(named) == sorted(_secret_keys())
    assert "store-url" in named
    assert not [m for m in _manifests() if m["kind"] == "Secret"]  # no placeholder to apply
    # The image's user (Dockerfile: uid 10001) reads the Secret's root-owned files
    # through their group: fsGroup, and a mode with the group's read bit.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile)
    assert uid is not None
    security = spec["securityContext"]
    assert security["runAsUser"] == security["fsGroup"] == int(uid.group(1))
    [secret_volume] = [v for v in spec["volumes"] if v["name"] == "secrets"]
    mode = secret_volume["secret"]["defaultMode"]
    assert mode & 0o040 and not mode & 0o007, oct(mode)
    config_path = env["SMS_BRIDGE_CONFIG"]["value"]
    assert config_path == f"{mounts['config']}/config.toml"
    service = _kind("Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


@pytest.mark.slow  # runs a subprocess
def test_the_kubernetes_config_passes_check_config(tmp_path: Path) -> None:
    """With the files the block's `kubectl create secret` makes (as the mount puts
    them): the API token a random one of 48 characters, printed for the callers (the
    manifest's placeholder passed the 16-character minimum and would have been used)."""
    text = _kind("ConfigMap")["data"]["config.toml"]
    secrets, printed = _made_secret(tmp_path)
    assert sorted(p.name for p in secrets.iterdir()) == sorted(_secret_keys())
    token = (secrets / "api-token").read_text()
    assert re.fullmatch(r"[0-9a-f]{48}", token) and printed.strip() == token
    text = re.sub(r'(_file = ")/run/secrets/sms-bridge/', rf"\g<1>{secrets}/", text)
    path = tmp_path / "k8s.toml"
    path.write_text(text)
    result = run_command(["check-config", str(path)], env=clean_env())
    assert result.returncode == 0, result.stderr
    config = load_config(path, env={})
    assert config.store.url == (secrets / "store-url").read_text()
    assert config.tokens["alerting"].token == token
    assert config.cluster.instance == ""  # each pod names itself through the environment


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks(CLUSTER, "toml"))))
def test_every_toml_block_passes_check_config(index: int, tmp_path: Path) -> None:
    result = check_config(blocks(CLUSTER, "toml")[index], tmp_path, f"cluster-{index}.toml")
    assert result.returncode == 0, result.stderr


def test_every_shell_block_parses_and_the_haproxy_backend_checks_readyz() -> None:
    for block in blocks(CLUSTER, "sh"):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    front = section_of(CLUSTER, "In front: a load balancer, or two MX records")
    haproxy = blocks_in(front, "")[0]
    assert "option httpchk GET /readyz" in haproxy
    # The bridges' trusted_proxies believe an X-Forwarded-For HAProxy only sends with it.
    assert re.search(r"^\s*option forwardfor\b", haproxy, re.MULTILINE)
    assert "http.trusted_proxies" in front
    assert all(
        _port(s.split()[2]) == _port(DEFAULT_HTTP_LISTEN)
        for s in re.findall(r"^\s*server .*$", haproxy, re.MULTILINE)
    )


def test_the_copy_summary_the_doc_shows_is_the_commands() -> None:
    move = section_of(CLUSTER, "Moving from SQLite: `sms-bridge store copy`")
    shown = re.search(r"`(copied .*?)`", move, re.DOTALL)
    assert shown is not None
    line = CopySummary(
        "/var/lib/sms-bridge/sms-bridge.db",
        "postgresql://bridge@db.example.org/sms_bridge",
        messages=1234,
        events=5678,
        bookings=12,
        top_id=1234,
    ).line()
    assert " ".join(shown.group(1).split()) == line


@pytest.mark.slow
def test_the_copy_block_reads_the_store_the_systemd_unit_keeps(
    tmp_path: Path, postgres_server: str
) -> None:
    """The copy block pasted on the install docs/recipes.md makes: the example config in
    /etc/sms-bridge, the store where the unit's SMS_BRIDGE_STORE_PATH puts it. Without
    that variable in the shell, `--config` alone named /etc/sms-bridge/sms-bridge.db
    ("no SQLite store at ..."). Only the root of the tree, the server and the database
    change; `systemctl stop` is left out (nothing runs here)."""
    [script] = blocks_in(section_of(CLUSTER, "Moving from SQLite: `sms-bridge store copy`"), "sh")
    unit = (ROOT / "systemd" / "sms-bridge.service").read_text(encoding="utf-8")
    kept = re.search(r"^Environment=SMS_BRIDGE_STORE_PATH=(\S+)$", unit, re.MULTILINE)
    assert kept is not None
    root = tmp_path / "root"
    (root / "etc" / "sms-bridge").mkdir(parents=True)
    shutil.copy(ROOT / "config.example.toml", root / "etc" / "sms-bridge" / "config.toml")
    db = root / kept.group(1).lstrip("/")
    db.parent.mkdir(parents=True)

    async def seeded() -> None:
        store = open_store(StoreConfig(path=str(db)))
        await store.open()
        message = NewMessage("+12025550143", "moved", "http", "SMS", 1, 1, state=State.DELIVERED)
        await seed(store, [message], 1_700_000_000.0)
        await store.close()

    asyncio.run(seeded())
    env = clean_env(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    with fresh_database(postgres_server) as url:
        assert "/opt/sms-bridge/venv/bin/pip install '.[postgres]'" in script
        script = (
            script.replace("systemctl stop sms-bridge", ":")
            .replace("/opt/sms-bridge/venv/bin/pip install", ": ")  # installed here already
            .replace("/opt/sms-bridge/venv/bin/", f"{Path(sys.executable).parent}/")
            .replace("postgresql://bridge@db.example.org/sms_bridge", url)
            .replace(" /etc/", f" {root}/etc/")
            .replace(" /var/lib/", f" {root}/var/lib/")
        )
        returncode, output, err = run_pasted(script, tmp_path / "work", env, timeout=120)
    assert returncode == 0, output + err
    assert f"copied 1 messages, 1 events and 0 rate-window bookings from {db}" in output


@pytest.mark.slow
def test_the_set_up_block_migrates_as_the_role_it_creates(
    tmp_path: Path, postgres_server: str
) -> None:
    """The block pasted on a PostgreSQL 15 server: it once ran `createdb` as postgres
    and `migrate` as a role `bridge` nobody created (and that, created, did not own the
    database: `permission denied for schema public`). The pip line is left out (the
    tests run in the installed checkout); the server, the role and the database change.
    (The private test server is the newest PostgreSQL installed: 15 here.)"""
    [script] = blocks_in(section_of(CLUSTER, "Set up"), "sh")
    assert "createuser" in script and "-O bridge" in script
    server = urllib.parse.urlsplit(postgres_server)
    host, port = server.hostname or "127.0.0.1", server.port or 5432
    name = new_database_name()
    role = name + "_role"
    script = "\n".join(line for line in script.splitlines() if not line.startswith("pip "))
    script = (
        script.replace("-h db.example.org -U postgres", f"-h {host} -p {port} -U {server.username}")
        .replace("bridge@db.example.org/sms_bridge", f"{role}@{host}:{port}/{name}")
        .replace("-O bridge sms_bridge", f"-O {role} {name}")
        .replace(" bridge ", f" {role} ")
    )
    path = [str(Path(sys.executable).parent)]
    if binaries := find_binaries():
        path.append(str(binaries))  # createuser and createdb, beside the fixture's initdb
    env = clean_env(PATH=os.pathsep.join([*path, os.environ["PATH"]]))
    try:
        returncode, output, err = run_pasted(script, tmp_path / "work", env, timeout=120)
    finally:
        admin(postgres_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin(postgres_server, f"DROP ROLE IF EXISTS {role}")
    assert returncode == 0, output + err
    assert (
        output.splitlines()[-1]
        == f"store postgresql://{role}@{host}:{port}/{name}: schema up to date"
    )


@pytest.mark.slow
def test_the_try_it_block_runs_as_written(tmp_path: Path, postgres_server: str) -> None:
    """Two instances on one database, one killed while its send is in flight: the other
    takes the alert over, finds it in /logs, and it reaches the sandbox exactly once. Only the ports, the
    server and the database name change (other tests hold 8081, 5432's database)."""
    [script] = blocks_in(section_of(CLUSTER, "Try it on one machine"), "sh")
    server = urllib.parse.urlsplit(postgres_server)
    host, port = server.hostname or "127.0.0.1", server.port or 5432
    name = new_database_name()
    ports = {8081: free_port(), 8082: free_port(), 8099: free_port()}
    for old, new in ports.items():
        script = script.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    script = (
        script.replace(
            "-h 127.0.0.1 -p 5432 -U postgres", f"-h {host} -p {port} -U {server.username}"
        )
        .replace("postgres@127.0.0.1:5432", f"{server.username}@{host}:{port}")
        .replace("sms_bridge", name)
    )
    path = [str(Path(sys.executable).parent)]
    if binaries := find_binaries():
        path.append(str(binaries))  # createdb, beside the fixture's initdb
    env = clean_env(PATH=os.pathsep.join([*path, os.environ["PATH"]]))
    work = tmp_path / "work"
    try:
        returncode, output, err = run_pasted(script, work, env, timeout=120)
    finally:
        subprocess.run(
            [sys.executable, "-c", _DROP, postgres_server, name], check=False, timeout=60
        )
    logs = err + "".join(p.read_text() for p in work.glob("*.log"))
    assert returncode == 0, output + logs
    *_, message_line, entries_line = output.strip().splitlines()
    message = json.loads(message_line)
    assert message["state"] in ("sent", "delivered"), message
    states = [e["state"] for e in message["events"]]
    assert states[:2] == ["queued", "sending"] and "sent" in states
    entries = json.loads(entries_line)
    assert [e["to"] for e in entries] == ["+12025550123"], entries  # once, not twice
    assert "a.log" in script and (work / "b.log").exists()
    # b took a's claim over and found the send in /logs: the path the doc describes.
    # (With b running before the alert came, b often claimed it itself and the kill
    # showed nothing.)
    assert (
        "reconciled 1 messages the provider had already accepted" in (work / "b.log").read_text()
    ), logs


_DROP = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute(f"DROP DATABASE IF EXISTS {sys.argv[2]} WITH (FORCE)")
    await conn.close()
asyncio.run(main())
"""


@pytest.mark.slow  # runs haproxy
async def test_haproxy_passes_the_client_to_trusted_proxies(
    tmp_path: Path, clock: ManualClock
) -> None:
    """The HAProxy backend as written (its servers one bridge on loopback), behind a
    frontend of ours: without `option forwardfor` the bridge saw every caller as
    HAProxy's address and a route's allowed_networks could only admit all or none. The
    client here is 127.0.0.2; the route admits it alone."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy not installed (Debian: haproxy)")
    front = section_of(CLUSTER, "In front: a load balancer, or two MX records")
    backend = blocks_in(front, "")[0]
    bridge_port, front_port = free_port(), free_port()
    backend = re.sub(r"^\s*server b .*\n", "", backend, flags=re.MULTILINE)
    backend = re.sub(r"server a \S+", f"server a 127.0.0.1:{bridge_port}", backend)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n"
        f"    timeout server 30s\nfrontend f\n    bind 127.0.0.1:{front_port}\n"
        "    default_backend sms_bridge\n" + backend
    )
    checked = await asyncio.create_subprocess_exec(
        haproxy,
        "-c",
        "-f",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(checked.communicate(), timeout=30)
    assert checked.returncode == 0, said.decode()
    body = (
        f'[store]\npath = "{tmp_path / "b.db"}"\n[groups]\noncall = ["+12025550101"]\n'
        '[http]\ntrusted_proxies = ["127.0.0.1/32"]\n'
        '[routes.n]\nformat = "generic"\nto = ["oncall"]\nallowed_networks = ["127.0.0.2/32"]\n'
    )
    config = load_config(write_config(tmp_path, body), env={})
    proxy = await asyncio.create_subprocess_exec(
        haproxy, "-db", "-f", str(cfg), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with running_bridge(config, clock, listen=f"127.0.0.1:{bridge_port}"):
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
            async with httpx.AsyncClient(transport=transport) as http:
                for _ in range(100):  # until HAProxy listens and counts the server up
                    with contextlib.suppress(httpx.TransportError):
                        answer = await http.post(
                            f"http://127.0.0.1:{front_port}/hooks/n", json={"message": "via lb"}
                        )
                        if answer.status_code != 503:
                            break
                    await asyncio.sleep(0.1)
    finally:
        proxy.terminate()
        await asyncio.wait_for(proxy.wait(), timeout=10)
    assert answer.status_code == 202, answer.text

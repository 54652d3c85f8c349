"""The console's view of webhook routes: how each authenticates, what to paste into the
sender, and a preview of the SMS a payload would make.

Nothing here shows a secret: the snippets name where the secret goes and leave a
placeholder. The preview runs the route's real parsing, template and text shaping (the
same functions a `POST /hooks/NAME` runs) but skips the signature check and stores
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.config import Config, Recipients, RouteConfig
from bridge.errors import BridgeError, HttpError
from bridge.ingress.formats import HookRequest, Ignored, registry
from bridge.ingress.http.bodies import parse_json
from bridge.ingress.http.hooks import hook_recipients, route_text
from bridge.ingress.ingest import Ingestor
from bridge.policy.shaping import Draft
from bridge.text import TYPE_GSM, split_parts

# The header that names the event, for formats whose parsing depends on it.
EVENT_HEADERS = {"github": "X-GitHub-Event", "gitlab": "X-Gitlab-Event"}
MAX_PREVIEW_BYTES = 256 * 1024


def encoding_name(message_type: int) -> str:
    return "GSM-7" if message_type == TYPE_GSM else "UCS-2"


def authentication(route: RouteConfig) -> list[str]:
    """How a caller proves itself to this route, in words, without the secrets."""
    ways = []
    if route.token:
        ways.append("bearer token (Authorization: Bearer ...)")
    if route.username:
        ways.append(f"HTTP basic auth as {route.username!r}")
    if route.secret:
        ways.append(
            {
                "github": "HMAC-SHA256 signature in X-Hub-Signature-256",
                "gitlab": "secret token in X-Gitlab-Token",
                "grafana": f"HMAC-SHA256 signature in {route.signature_header}"
                + (f" over {route.timestamp_header}:body" if route.timestamp_header else ""),
            }.get(route.format, "shared secret")
        )
    if route.allowed_networks:
        ways.append("clients from " + ", ".join(route.allowed_networks))
    return ways or ["none: anyone who can reach the bridge may post"]


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def snippets(route: RouteConfig, url: str) -> list[tuple[str, str]]:
    """(title, text) to paste into the sender's configuration for this route."""
    fmt = route.format
    out: list[tuple[str, str]] = []
    if fmt == "alertmanager":
        auth = ""
        if route.token:
            auth = (
                "http_config:\n  authorization:\n    type: Bearer\n"
                "    credentials_file: /etc/alertmanager/sms-bridge.token  # the route's token\n"
            )
        elif route.username:
            auth = (
                f"http_config:\n  basic_auth:\n    username: {route.username}\n"
                "    password_file: /etc/alertmanager/sms-bridge.password\n"
            )
        out.append(
            (
                "alertmanager.yml",
                "receivers:\n  - name: sms\n    webhook_configs:\n"
                f"      - url: {url}\n        send_resolved: true\n        max_alerts: 30\n"
                + _indent(auth, 8)
                + ("\n" if auth else ""),
            )
        )
    elif fmt == "grafana":
        settings = f"url: {url}\nhttpMethod: POST\n"
        if route.token:
            settings += (
                "authorization_scheme: Bearer\nauthorization_credentials: $SMS_BRIDGE_TOKEN\n"
            )
        if route.username:
            settings += f"username: {route.username}\npassword: $SMS_BRIDGE_PASSWORD\n"
        if route.secret:
            settings += f"hmacConfig:\n  secret: $SMS_BRIDGE_HMAC_SECRET\n  header: {route.signature_header}\n"
            if route.timestamp_header:
                settings += f"  timestampHeader: {route.timestamp_header}\n"
        out.append(
            (
                "Grafana contact point (provisioning, or the same fields under "
                "Alerting > Contact points > Webhook)",
                "apiVersion: 1\ncontactPoints:\n  - orgId: 1\n    name: sms-bridge\n"
                "    receivers:\n      - uid: sms-bridge\n        type: webhook\n"
                "        settings:\n" + _indent(settings, 10) + "\n",
            )
        )
    elif fmt == "github":
        # One level of CI events (docs/recipes.md, "Pick one level"): a failed Actions run
        # also completes its check suite (app github-actions), so runs and suites both
        # texted each failure twice.
        out.append(
            (
                "GitHub: Settings > Webhooks > Add webhook",
                f"Payload URL:   {url}\nContent type:  application/json\n"
                "Secret:        the route's secret\n"
                "Events:        Workflow runs, Deployment statuses\n",
            )
        )
        out.append(
            (
                "or with the gh CLI",
                "gh api repos/OWNER/REPO/hooks -f name=web -F active=true \\\n"
                "  -f 'events[]=workflow_run' -f 'events[]=deployment_status' \\\n"
                f"  -f 'config[url]={url}' -f 'config[content_type]=json' \\\n"
                '  -f "config[secret]=$SMS_BRIDGE_SECRET"\n',
            )
        )
    elif fmt == "gitlab":
        # Pipelines alone, as above: a failed pipeline's text names its failed jobs, and
        # job events texted each of them besides.
        out.append(
            (
                "GitLab: Settings > Webhooks > Add new webhook",
                f"URL:           {url}\nSecret token:  the route's secret\n"
                "Trigger:       Pipeline events, Deployment events\n",
            )
        )
        out.append(
            (
                "or with the GitLab API",
                'curl --request POST --header "PRIVATE-TOKEN: $GITLAB_TOKEN" \\\n'
                f'  --data-urlencode "url={url}" --data-urlencode "token=$SMS_BRIDGE_SECRET" \\\n'
                '  --data "pipeline_events=true&job_events=false&deployment_events=true'
                '&push_events=false" \\\n'
                '  "https://gitlab.example.org/api/v4/projects/PROJECT_ID/hooks"\n',
            )
        )
    module = registry()[fmt]
    headers = "-H 'content-type: application/json'"
    if route.token:
        headers += ' -H "Authorization: Bearer $SMS_BRIDGE_TOKEN"'
    if route.username:
        headers += f' -u "{route.username}:$SMS_BRIDGE_PASSWORD"'
    for name, value in getattr(module, "SAMPLE_HEADERS", {}).items():
        headers += f" -H '{name}: {value}'"
    sample = json.dumps(module.SAMPLE, separators=(",", ":")).replace("'", "'\\''")
    signed = " (the real sender signs the body; a test by hand needs the signature too)"
    out.append(
        (
            "test with curl" + (signed if route.secret and fmt != "gitlab" else ""),
            f"curl -s {url} {headers} \\\n  -d '{sample}'\n",
        )
    )
    return out


def postfix_snippet(config: Config) -> str | None:
    """Postfix transport for mail to the bridge's SMTP listener; None when SMTP is off."""
    if not config.smtp.listen:
        return None
    host, _, port = config.smtp.listen.rpartition(":")
    host = host.strip("[]")
    target = f"[{host if host not in ('0.0.0.0', '::', '') else '127.0.0.1'}]:{port}"
    lines = "\n".join(f"{domain:<24}smtp:{target}" for domain in config.smtp.domains)
    return (
        "# /etc/postfix/main.cf\ntransport_maps = hash:/etc/postfix/transport\n\n"
        "# /etc/postfix/transport   (then: postmap /etc/postfix/transport && postfix reload)\n"
        f"{lines}\n"
    )


@dataclass
class PreviewText:
    recipients: list[str]
    text: str
    encoding: str
    parts: list[str]
    estimated_cost: float | None
    template_problem: str | None = None  # why the route's template was not used
    missing: list[str] = field(default_factory=list)  # what it printed as "": not in the payload


@dataclass
class Preview:
    payload: str
    event: str = ""  # as typed: shown again beside the result it was made for
    error: str | None = None
    ignored: str | None = None
    texts: list[PreviewText] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "ignored": self.ignored,
            "texts": [t.__dict__ for t in self.texts],
        }


def sample_payload(route: RouteConfig) -> str:
    return json.dumps(registry()[route.format].SAMPLE, indent=2, ensure_ascii=False)


def preview(
    route: RouteConfig,
    payload: str,
    *,
    event: str,
    config: Config,
    resolver: Recipients,
    ingestor: Ingestor,
    secrets: Sequence[str],
) -> Preview:
    """The SMS `payload` would produce on `route`: texts, parts, costs. Stores nothing.
    What it says of the template is masked with `secrets` (it may quote the payload)."""
    result = Preview(payload=payload, event=event)
    body = payload.encode("utf-8", "surrogatepass")
    if len(body) > MAX_PREVIEW_BYTES:
        result.error = f"payload larger than {MAX_PREVIEW_BYTES} bytes"
        return result
    try:  # the webhook's own reading: same depth and surrogate limits, same words
        data = parse_json(body, config.http.max_json_items)
    except HttpError as exc:
        result.error = exc.message
        return result
    module = registry()[route.format]
    headers = dict(getattr(module, "SAMPLE_HEADERS", {}))
    if route.format in EVENT_HEADERS and event:
        headers[EVENT_HEADERS[route.format]] = event
    hook = HookRequest(
        route=route,
        headers={k.lower(): v for k, v in headers.items()},
        body=body,
        payload=data,
    )
    try:
        for message in module.parse(hook):
            recipients = hook_recipients(route, message, (), config, resolver)
            routed = route_text(route, message, secrets)
            text, template_problem = routed.text, routed.default_text
            shaped = ingestor.preview(
                [
                    Draft(
                        recipients=recipients,
                        text=text,
                        source="hook",
                        sender_id=route.sender_id or config.provider.sender_id,
                        route=route.name,
                    )
                ]
            )
            first = shaped[0]
            costs = [m.estimated_cost for m in shaped]
            result.texts.append(
                PreviewText(
                    recipients=recipients,
                    text=first.text,
                    encoding=encoding_name(first.message_type),
                    parts=split_parts(first.text),
                    estimated_cost=None if None in costs else sum(c or 0.0 for c in costs),
                    template_problem=template_problem,
                    missing=list(routed.missing),
                )
            )
    except Ignored as exc:
        result.ignored = str(exc)
    except BridgeError as exc:
        result.error = str(exc)
    return result

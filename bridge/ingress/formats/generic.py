"""Any JSON: the text, recipients and dedupe key taken by dotted paths, or a template.

Recipients are read from the payload only on a route with `allow_payload_to`; elsewhere
whatever sits at `to_path` is just data (a route texts its own `to`).
"""

from __future__ import annotations

from bridge.errors import InputError
from bridge.ingress.formats.base import HookMessage, HookRequest, dig, obj, text_field
from bridge.text import is_blank

SAMPLE = {"to": ["+12025550143"], "message": "Backup failed on nas-1", "host": "nas-1"}
# Any JSON may arrive here: check-config warns, not refuses, when a template fails on it.
SAMPLE_IS_EXAMPLE = True


def parse(request: HookRequest) -> list[HookMessage]:
    route = request.route
    payload = obj(request.payload, "body")
    raw_text = dig(payload, route.text_path)
    if raw_text is not None and not isinstance(raw_text, str):
        if not route.template:
            raise InputError(route.text_path, "must be a string (the SMS text)")
        # With a template, what sits there is the template's to read (`message.title`),
        # not a text: refusing it refused every payload of that shape.
        raw_text = None
    text = raw_text or ""
    if is_blank(text) and not route.template:
        raise InputError(route.text_path, "is required (the SMS text)")
    targets = dig(payload, route.to_path) if route.allow_payload_to else None
    if targets is None:
        recipients: tuple[str, ...] = ()
    elif isinstance(targets, str):
        recipients = (targets,)
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        recipients = tuple(targets)
    else:
        raise InputError(route.to_path, "must be a phone number, a group or a list of them")
    path = route.dedupe_path
    key = text_field(dig(payload, path), path) if path else ""  # dig(x, "") is all of x
    return [
        HookMessage(
            text=text,
            context=payload,
            recipients=recipients,
            # A blank key is none, as the API's `dedupe_key: ""`: kept, "generic:" made
            # every payload of an incident with no id yet a repeat of the first.
            dedupe_key=None if is_blank(key) else f"generic:{key}",
        )
    ]

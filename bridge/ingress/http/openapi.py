"""`GET /openapi.json`: the generic API and the configured hooks, described for clients.

Once a `[tokens.*]` exists the document itself needs a token with `read` (the app
guards it): it names every route (which integrations exist, which take recipients
from the payload) and the sender ids a caller may use, a map no anonymous caller
needs. Security schemes are declared: bearer for the API, and per hook what it takes.
"""

from __future__ import annotations

from typing import Any

from bridge import __version__
from bridge.config import Config
from bridge.firewall import SENDER_ID_RULE

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
}
_ACCEPTED = {
    "type": "object",
    "properties": {
        "ids": {"type": "array", "items": {"type": "integer"}},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "to": {"type": "string"},
                    # held: over limits.per_recipient, waiting for the storm digest
                    "state": {"type": "string", "enum": ["queued", "held", "suppressed"]},
                    "reason": {"type": ["string", "null"]},
                },
            },
        },
    },
}
_RECIPIENTS = {
    "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
    "description": "E.164 numbers or group names",
}


def _errors(*codes: int) -> dict[str, dict[str, Any]]:
    reasons = {
        400: "bad input, naming the field",
        401: "missing or wrong credentials",
        403: "the token lacks the scope",
        404: "no such route or message",
        409: "the message's state does not allow it",
        413: "body too large",
        415: "not JSON",
        503: "not stored (store, overload, or phone metadata that fails on a recipient): retry",
    }
    return {
        str(c): {
            "description": reasons[c],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for c in codes
    }


def _hook_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {
        "202": {
            "description": "stored",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
        },
        "200": {"description": "valid, nothing to send (ping, filtered event)"},
    }
    responses.update(_errors(400, 401, 413, 415, 503))
    return responses


_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "[tokens.NAME] or a route's token",
    },
    "basic": {"type": "http", "scheme": "basic", "description": "a route's username and password"},
}
_OPEN: list[dict[str, list[str]]] = []  # no credential


def _hook_security(route: Any) -> list[dict[str, list[str]]]:
    """What a hook takes: bearer and/or basic; a signature `secret` or `allowed_networks`
    (not OpenAPI schemes) or nothing at all show as open."""
    schemes: list[dict[str, list[str]]] = [{"bearer": []}] if route.token else []
    return schemes + ([{"basic": []}] if route.username else [])


def openapi_spec(config: Config) -> dict[str, Any]:
    message_request = {
        "type": "object",
        "required": ["to", "message"],
        "additionalProperties": True,
        "properties": {
            "to": {
                **_RECIPIENTS,
                "description": str(_RECIPIENTS["description"])
                + (
                    f"; at most {config.http.max_recipients} per request"
                    if config.http.max_recipients
                    else ""
                )
                + "; a number the bridge may not text (phone.allowed_countries,"
                " phone.allow_premium) is a 400 naming it",
            },
            "message": {"type": "string", "minLength": 1, "maxLength": 5000},
            "sender_id": {
                "type": "string",
                "maxLength": 11,
                "description": f"{SENDER_ID_RULE}; one of "
                + ", ".join([config.provider.sender_id, *config.provider.allowed_sender_ids])
                + " (provider.sender_id and provider.allowed_sender_ids)",
            },
            "dedupe_key": {
                "type": "string",
                "maxLength": 256,
                "description": "suppresses a repeat to the same recipient within the dedupe"
                " window; scoped to the API, so it never meets a webhook's or a mail's key",
            },
            "schedule_time": {
                "type": "string",
                "description": "YYYY-MM-DD HH:MM:SS in provider.timezone, or ISO 8601"
                " with an offset; must be in the future",
            },
        },
    }
    hooks = {
        f"/hooks/{name}": {
            "post": {
                "summary": f"{route.format} webhook",
                "parameters": [
                    {"name": "to", "in": "query", "required": False, "schema": {"type": "string"}}
                ]
                if route.allow_query_to or route.allow_payload_to
                else [],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": _hook_responses(),
                "security": _hook_security(route),
            }
        }
        for name, route in config.routes.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sms-bridge", "version": __version__},
        # With tokens every API call needs one (scopes: send, read, admin); without,
        # the bridge is open, as on a loopback install.
        "security": [{"bearer": []}] if config.tokens else _OPEN,
        "paths": {
            "/api/v1/messages": {
                "post": {
                    "summary": "queue an SMS to one or more recipients",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/MessageRequest"}
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "stored",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        **_errors(400, 401, 403, 413, 415, 503),
                    },
                },
                "get": {
                    "summary": "stored messages, newest first",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                        {"name": "before", "in": "query", "schema": {"type": "integer"}},
                        {"name": "route", "in": "query", "schema": {"type": "string"}},
                        {"name": "source", "in": "query", "schema": {"type": "string"}},
                        {"name": "recipient", "in": "query", "schema": {"type": "string"}},
                        {"name": "q", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": {"description": "messages"}, **_errors(400, 401, 403)},
                },
            },
            "/api/v1/messages/{id}": {
                "get": {
                    "summary": "one message with its state changes",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the message"},
                        **_errors(400, 401, 403, 404),
                    },
                }
            },
            **{
                f"/api/v1/messages/{{id}}/{action}": {
                    "post": {
                        "summary": summary,
                        "parameters": [
                            {
                                "name": "id",
                                "in": "path",
                                "required": True,
                                "schema": {"type": "integer"},
                            }
                        ],
                        "responses": {
                            "200": {"description": "the message"},
                            **_errors(400, 401, 403, 404, 409),
                        },
                    }
                }
                for action, summary in (
                    ("retry", "queue a failed message again (admin)"),
                    (
                        "cancel",
                        "end a queued or held message as failed, 'cancelled by NAME' (admin)",
                    ),
                )
            },
            "/healthz": {
                "get": {
                    "summary": "liveness",
                    "security": _OPEN,
                    "responses": {"200": {"description": "up"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "readiness: store writable, provider usable",
                    "security": _OPEN,
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            **hooks,
        },
        "components": {
            "schemas": {"Error": _ERROR, "Accepted": _ACCEPTED, "MessageRequest": message_request},
            "securitySchemes": _SCHEMES,
        },
    }

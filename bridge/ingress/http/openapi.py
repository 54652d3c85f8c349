"""`GET /openapi.json`: the generic API and the configured hooks, described for clients.

Once a `[tokens.*]` exists the document itself needs a token with `read` (the app
guards it): it names every route (which integrations exist, which take recipients
from the payload) and the sender ids a caller may use, a map no anonymous caller
needs. Security schemes are declared: bearer for the API, and per hook what it takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge import __version__
from bridge.config import Config
from bridge.firewall import SENDER_ID_RULE
from bridge.models import OTHER_REASON, REASON_KINDS, SOURCES, State

LIST_LIMIT = 100  # GET /api/v1/messages: the page size unless `limit` says
MAX_LIST_LIMIT = 1000

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "field": {"type": "string"},
        "state": {"type": "string", "description": "a 409's: the message's state now"},
    },
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
                    "template": {
                        "type": "object",
                        "description": "on a route with a template only: what became of it",
                        "properties": {
                            "default_text": {
                                "type": ["string", "null"],
                                "description": "why the route's default text went out"
                                " instead of the template's (null: the template's did)",
                            },
                            "missing": {
                                "type": "array",
                                "items": {"type": "string"},
                                "description": "fields the payload lacked, printed as empty",
                            },
                        },
                    },
                },
            },
        },
    },
}
_TIME = {
    "type": "string",
    "format": "date-time",
    "description": "ISO 8601 in UTC with milliseconds: 2027-01-15T08:00:00.000+00:00",
}
_OPTIONAL_TIME = {**_TIME, "type": ["string", "null"]}
_STATES = [str(s) for s in State]
_MESSAGE = {
    "type": "object",
    "required": ["id", "recipient", "state", "created_at", "updated_at"],
    "properties": {
        "id": {"type": "integer"},
        "recipient": {"type": "string"},
        "text": {"type": "string"},
        "source": {"type": "string", "enum": list(SOURCES)},
        "sender_id": {"type": "string"},
        "route": {"type": ["string", "null"]},
        "token": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": _STATES},
        "reason": {"type": ["string", "null"]},
        "reason_kind": {"type": ["string", "null"]},
        "last_error": {"type": ["string", "null"]},
        "attempts": {"type": "integer"},
        "parts": {"type": "integer"},
        "provider_message_id": {"type": ["string", "null"]},
        "cost": {"type": ["number", "null"]},
        "estimated_cost": {"type": ["number", "null"]},
        "created_at": _TIME,
        "updated_at": _TIME,
        "next_attempt_at": _TIME,
        "sent_at": _OPTIONAL_TIME,
        "schedule_time": {**_OPTIONAL_TIME, "description": "when it is to be sent, in UTC"},
    },
}
_EVENT = {
    "type": "object",
    "required": ["at", "state"],
    "properties": {
        "at": _TIME,
        "state": {"type": "string", "enum": _STATES},
        "attempts": {"type": "integer"},
        "detail": {"type": ["string", "null"]},
    },
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_STATS = {
    "type": "object",
    "required": ["states", "reasons"],
    "properties": {
        "states": {**_COUNTS, "description": "stored messages by state; states with none absent"},
        "reasons": {
            "type": "object",
            "description": "held, suppressed and failed messages by reason kind"
            " ('other': none recorded)",
            "additionalProperties": _COUNTS,
        },
    },
}
_CANCEL_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "description": "one or more of recipient, route and q; each given narrows the selection",
    "properties": {
        "recipient": {"type": "string", "description": "one phone number, any spacing"},
        "route": {"type": "string", "description": "a route's name"},
        "q": {"type": "string", "description": "text the message holds (any case)"},
        "state": {
            "type": "string",
            "enum": ["queued", "held"],
            "description": "only these; absent: both",
        },
    },
}
_CANCELLED = {
    "type": "object",
    "required": ["cancelled", "in_flight", "in_flight_more", "gone", "more"],
    "properties": {
        "cancelled": {"type": "integer", "minimum": 0},
        "in_flight": {
            "type": "integer",
            "minimum": 0,
            "description": "selected but being handed to the provider (sending, up to 500"
            " counted, besides those this call found waiting and the dispatcher took before"
            " its write): not cancelled",
        },
        "in_flight_more": {
            "type": "boolean",
            "description": "more were being handed to the provider than in_flight counts"
            " (it stopped at 500): in_flight is at least, not exactly, how many",
        },
        "gone": {
            "type": "integer",
            "minimum": 0,
            "description": "found waiting, taken (or, held, folded into the phone's digest,"
            " or ended) before the write, and not sending: sent already, or ended; not"
            " counted in in_flight too",
        },
        "more": {"type": "boolean", "description": "messages may be left: post again"},
    },
}
_RECIPIENTS = {
    "oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
    "description": "E.164 numbers or group names",
}


def _filter(name: str, description: str, values: Sequence[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if values is not None:
        schema["enum"] = list(values)
    return {"name": name, "in": "query", "description": description, "schema": schema}


_LIST_PARAMETERS = [
    _filter("state", "only messages in this state", _STATES),
    _filter("status", "the same as state (give one of the two)", _STATES),
    _filter(
        "reason",
        "only messages with this reason kind; 'other': held, suppressed or failed"
        " with none recorded (as /api/v1/stats counts them)",
        [*REASON_KINDS, OTHER_REASON],
    ),
    {
        "name": "limit",
        "in": "query",
        "description": f"page size; a value outside 1-{MAX_LIST_LIMIT} is a 400",
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_LIST_LIMIT,
            "default": LIST_LIMIT,
        },
    },
    {
        "name": "before",
        "in": "query",
        "description": "the next page: messages older than this id (the last one listed)",
        "schema": {"type": "integer", "minimum": 1},
    },
    _filter(
        "not_reason",
        "leave out messages with this reason kind ('cancelled': what the console's"
        " delivery figures leave out)",
        list(REASON_KINDS),
    ),
    {
        "name": "since",
        "in": "query",
        "description": "only messages created at or after this time (ISO 8601 with its zone)",
        "schema": {"type": "string", "format": "date-time"},
    },
    _filter(
        "route",
        "only messages from this webhook route: a configured one, or one removed whose"
        " messages are still stored; any other name is a 400",
    ),
    _filter("source", "only messages from this ingress", SOURCES),
    _filter(
        "recipient",
        "recipients that contain this text (a leading '+' and spaces ignored; nothing else is a 400)",
    ),
    _filter("q", "texts that contain this text (any case)"),
    _filter(
        "_",
        "a cache-buster (jQuery's `cache: false`): ignored; any other name not listed here"
        " is a 400",
    ),
]


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, dict[str, Any]]:
    reasons = {
        400: "bad input, naming the field",
        401: "missing or wrong credentials",
        403: "the token lacks the scope",
        404: "no such route or message",
        409: "the message's state does not allow it: the error says which state (also as"
        " `state`) and what can be done instead",
        413: "body too large: more bytes than http.max_body_bytes, or more JSON items than"
        " http.max_json_items",
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
                " window; scoped to the API, so it never meets a webhook's or a mail's key."
                " Without it the text is the key, and a repeat is suppressed only while it is"
                " still the API's last text to that phone",
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
                    "parameters": _LIST_PARAMETERS,
                    "responses": {
                        "200": _json("messages", {"$ref": "#/components/schemas/MessageList"}),
                        **_errors(400, 401, 403),
                    },
                },
            },
            "/api/v1/messages/cancel": {
                "post": {
                    "summary": "end every queued or held message a filter selects as failed,"
                    " 'cancelled by NAME' (admin)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _CANCEL_REQUEST}},
                    },
                    "responses": {
                        "200": _json("how many were cancelled", _CANCELLED),
                        **_errors(400, 401, 403, 413, 415, 503),
                    },
                }
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
                        "200": _json(
                            "the message and its state changes",
                            {"$ref": "#/components/schemas/MessageWithEvents"},
                        ),
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
                            "200": _json("the message", {"$ref": "#/components/schemas/Message"}),
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
            "/api/v1/stats": {
                "get": {
                    "summary": "stored messages by state, and by reason kind (read)",
                    "responses": {
                        "200": _json("counts", {"$ref": "#/components/schemas/Stats"}),
                        **_errors(401, 403),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "liveness",
                    "security": _OPEN,
                    "responses": {
                        "200": {"description": "up"},
                        "503": {"description": "a background loop keeps failing (named)"},
                    },
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
            "schemas": {
                "Error": _ERROR,
                "Accepted": _ACCEPTED,
                "MessageRequest": message_request,
                "Message": _MESSAGE,
                "MessageWithEvents": {
                    "allOf": [
                        {"$ref": "#/components/schemas/Message"},
                        {
                            "type": "object",
                            "required": ["events"],
                            "properties": {"events": {"type": "array", "items": _EVENT}},
                        },
                    ]
                },
                "MessageList": {
                    "type": "object",
                    "required": ["messages"],
                    "properties": {
                        "messages": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Message"},
                        }
                    },
                },
                "Stats": _STATS,
            },
            "securitySchemes": _SCHEMES,
        },
    }

"""What a retry or a cancel of a message whose state allows neither answers (the API's
409 and the console's), in one place so both say the same.

"message 7 is delivered: only failed can retry" told an operator what the rule was, not
what had happened to their message or what they could do now; each state says both.
"""

from __future__ import annotations

from bridge.models import State

RETRY, CANCEL = "retry", "cancel"
_SEND_AGAIN = "to text it again, send it as a new message"

# (action, state) -> what the state means for the action and what can be done instead
_WHY_NOT: dict[tuple[str, State], str] = {
    (RETRY, State.QUEUED): "it is already waiting to be sent; only a failed message is retried",
    (RETRY, State.HELD): (
        "storm control holds it for this phone's digest; only a failed message is retried"
        " (cancel it to send neither it nor the digest)"
    ),
    (RETRY, State.SENDING): (
        "it is being handed to the provider now; only a failed message is retried"
    ),
    (RETRY, State.SENT): (
        f"the provider accepted it and its delivery report is awaited; {_SEND_AGAIN}"
    ),
    (RETRY, State.DELIVERED): f"it was delivered; {_SEND_AGAIN}",
    (RETRY, State.SUPPRESSED): (
        f"it was never sent (its reason says why: a duplicate, a storm's digest, a loop);"
        f" {_SEND_AGAIN} (a duplicate: with another dedupe_key)"
    ),
    (CANCEL, State.SENDING): (
        "it is being handed to the provider now: too late to cancel;"
        " only a queued or held message is cancelled"
    ),
    (CANCEL, State.SENT): "the provider has it: too late to cancel",
    (CANCEL, State.DELIVERED): "it was delivered: too late to cancel",
    (CANCEL, State.FAILED): (
        "it already ended without being sent (its reason says why): nothing to cancel;"
        " a retry queues it again"
    ),
    (CANCEL, State.SUPPRESSED): "it was never sent and will not be: nothing to cancel",
}


def why_not(action: str, message_id: int | str, state: State) -> str:
    """Why `action` ("retry" or "cancel") did not change message `message_id`, in
    `state`, and what can be done instead."""
    doing = "retried" if action == RETRY else "cancelled"
    # Not in the table: a state that allows it, changed by someone else meanwhile.
    why = _WHY_NOT.get((action, state), "it changed meanwhile (another operator?): look again")
    return f"message {message_id} is {state} and cannot be {doing}: {why}"

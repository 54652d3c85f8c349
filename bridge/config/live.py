"""The live view: the config in force for the parts that read it per request.

The HTTP side (API, webhook routes, console, connection limits, allowed hosts) needs
most sections at once, and a reload must reach its next request without rebuilding the
app, so it reads this view instead of taking sections. Everything else takes its own
sections and has `reload(...)` (see `bridge.service.Bridge.reload`).
"""

from __future__ import annotations

from bridge.config.masking import secret_values
from bridge.config.recipients import Recipients
from bridge.config.sections import Config


class LiveConfig:
    """The config in force and its recipient resolver; `update` swaps both at once.

    A request handler reads `current` (and `recipients`) once, before its first await,
    so a reload never changes the rules under a request being handled and never drops a
    connection.
    """

    def __init__(self, config: Config, recipients: Recipients | None = None) -> None:
        self.update(config, recipients)

    def update(self, config: Config, recipients: Recipients | None = None) -> None:
        self.current = config
        self.secrets = tuple(secret_values(config))  # masked in what HTTP answers show
        self.recipients = recipients or Recipients.from_config(config)

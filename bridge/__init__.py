"""sms-bridge: email and webhook to SMS gateway."""

__version__ = "0.1.0"

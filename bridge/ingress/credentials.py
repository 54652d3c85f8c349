"""Whether a presented secret is a configured one, with nothing in the time it takes.

`hmac.compare_digest` takes the same time wherever the first wrong byte is, but not
whatever the lengths: on unequal lengths it may answer at once, so comparing raw secrets
told a guesser how long the route's token, an SMTP password or the console's CSRF token
is. Both sides are hashed to SHA-256 first and the 32-byte digests compared: the time
then says nothing of the secret, its length included. Every comparison of a secret the
bridge makes (API and route tokens, basic auth, GitLab's token, webhook signatures, SMTP
AUTH passwords, the console's CSRF token) goes through `same_secret`.
"""

from __future__ import annotations

import hashlib
import hmac


def digest(value: str | bytes) -> bytes:
    """The SHA-256 of a secret; text as UTF-8 (a lone surrogate kept, not an error)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).digest()


def same_secret(presented: str | bytes, expected: str | bytes) -> bool:
    """Whether `presented` is `expected`, in a time that tells neither nor their lengths."""
    return hmac.compare_digest(digest(presented), digest(expected))

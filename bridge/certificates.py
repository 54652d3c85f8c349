"""A listener's certificate and key: loaded without a passphrase prompt, and read for
a reload as a context or the reason it did not load (`TlsFiles`), for SMTP and HTTPS
alike.

The bridge has no passphrase to give for an encrypted key. Asked for one, OpenSSL reads
it from the terminal: `serve` in a foreground shell or `docker run -it` blocked there,
and a SIGHUP's read of a renewed key hung until its bound and left a thread waiting on
the terminal for good (another with each SIGHUP); without a terminal the error said
"[Errno 22] Invalid argument". Here such a key fails at once, saying what it is.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class TlsFiles:
    """A listener's certificate and key as read for a reload: their context (None: no
    certificate configured), or why they did not load (`problem`)."""

    context: ssl.SSLContext | None
    problem: str | None = None


def read_pair(build: Callable[[str, str], ssl.SSLContext], cert: str, key: str) -> TlsFiles:
    """`build(cert, key)` as TlsFiles (nothing when `cert` is empty; a file that does not
    load, its reason). Blocking file reads: a reload calls this off the event loop."""
    if not cert:
        return TlsFiles(None)
    try:
        return TlsFiles(build(cert, key))
    except (OSError, ssl.SSLError) as exc:
        return TlsFiles(None, str(exc))


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """`context.load_cert_chain(cert, key)` (the key in `cert` when `key` is empty),
    never asking for a passphrase; ssl.SSLError naming an encrypted key."""
    asked = False

    def no_passphrase() -> bytes:
        nonlocal asked
        asked = True
        return b""

    try:
        context.load_cert_chain(cert, key or None, password=no_passphrase)
    except ssl.SSLError as exc:
        if not asked:
            raise
        raise ssl.SSLError(
            f"the key {key or cert} is encrypted, and the bridge has no passphrase for it:"
            " give it the key decrypted (openssl pkey -in KEY -out PLAIN)"
        ) from exc

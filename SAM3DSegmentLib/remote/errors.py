"""What can go wrong talking to a remote server, as exception classes a user interface can tell apart.

Every message is one line naming the problem and the fix (the Slicer module shows ``str(err)`` as is).
All derive from :class:`RemoteError`, itself a ``RuntimeError`` (the CLI reports those with exit status 1).
"""
from __future__ import annotations

from typing import Optional


class RemoteError(RuntimeError):
    """Base class; ``url`` is the server concerned (None when several were tried)."""

    def __init__(self, message: str, url: Optional[str] = None):
        super().__init__(" ".join(str(message).split()))
        self.url = url


class AuthError(RemoteError):
    """The server refused the key (HTTP 401/403)."""


class VersionMismatch(RemoteError):
    """Client and server speak different protocol versions, or serve a different model than expected."""


class ServerBusy(RemoteError):
    """Every server answered 'busy' (503) or 'rate limited' (429)."""

    def __init__(self, message: str, url: Optional[str] = None, retry_after_s: float = 1.0):
        super().__init__(message, url)
        self.retry_after_s = retry_after_s


class RemoteTimeout(RemoteError):
    """No answer within the configured time limit."""


class ProxyError(RemoteError):
    """Something between client and server (a reverse proxy or load balancer) answered instead of a
    sam3d server: 502/504, or a body that is not this protocol (e.g. an HTML error page)."""


class BadRequest(RemoteError):
    """The server refused a request as malformed or over its limits (4xx with a reason)."""


class ServerUnavailable(RemoteError):
    """No server could be reached (connection refused, reset, unknown host, TLS failure)."""


class UnknownEmbedding(RemoteError):
    """The server does not hold the embedding a decode named (evicted, restarted, another server); the
    client resends the region. Not shown to users."""


def user_message(err: BaseException) -> str:
    """One line for a status bar: remote errors as they are, anything else with its type."""
    if isinstance(err, RemoteError):
        return str(err)
    return f"unexpected {type(err).__name__}: {' '.join(str(err).split())}"

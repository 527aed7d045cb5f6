"""A URL as it may be shown: where it points, without what it may carry for credentials."""

from __future__ import annotations

from urllib.parse import urlsplit


def outline(url: str) -> str:
    """`scheme://host:port/…` (`/…` when there was more), or "" when `url` names no host.

    A hook URL's credentials can be its user and password, its path (a Make or Zapier hook's
    token is the path) and its query; the origin is enough to tell which URL it was.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" in the host
        return ""
    host = parts.netloc.rpartition("@")[2]
    if not host:
        return ""
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{rest}"

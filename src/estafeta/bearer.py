"""`Authorization: Bearer <key>`, as the API and generic sources with an `api_key` read it."""

from __future__ import annotations

# Every 401 of a bearer key says how to authenticate (RFC 9110 §11.6.1, RFC 6750 §3): no
# error code when the request carried no bearer key, `invalid_token` when it carried one the
# hub refuses.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="estafeta"'}
INVALID_KEY_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="estafeta", error="invalid_token"'}


def bearer_key(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None for another scheme or none.
    HTTP allows one or more spaces after the scheme (`1*SP`, RFC 9110 §11.4)."""
    scheme, _, rest = header.partition(" ")
    key = rest.lstrip(" ")
    return key if scheme.lower() == "bearer" and key else None

"""FastAPI dependencies shared by the API's routers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from estafeta.api.auth import Principal
from estafeta.errors import HttpError
from estafeta.ingress.endpoint import require_json_type
from estafeta.ingress.providers.base import media_type

if TYPE_CHECKING:
    from estafeta.hub import Hub


def hub_of(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


# Only documents the key in the OpenAPI description (so that /docs has "Authorize" and sends
# it); the Authenticator reads and judges the header itself, answering in the API's format.
_BEARER_KEY = HTTPBearer(
    scheme_name="apiKey",
    description="A tenant's API key (`estafeta keys create`) or the admin key",
    auto_error=False,
)


async def principal(
    request: Request,
    _documented: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER_KEY)],
) -> Principal:
    """The authenticated caller (401 otherwise)."""
    found: Principal = await request.app.state.auth.principal(request)
    return found


# Any authenticated caller (a tenant's key or the admin key), as a route parameter.
Caller = Annotated[Principal, Depends(principal)]


async def tenant_principal(found: Caller) -> Principal:
    """A tenant's key (publishing belongs to a tenant, not to the operator)."""
    if found.tenant_id is None:
        raise HttpError(403, "tenant_key_required", "publish with a tenant's API key")
    return found


# A tenant's key, as a route parameter: what the tenant's own routes (publish, send, a
# conversation's actions) take.
TenantCaller = Annotated[Principal, Depends(tenant_principal)]

# The `Idempotency-Key` header, bounded as the body's `idempotency_key` is.
IdempotencyKeyHeader = Annotated[str | None, Header(min_length=1, max_length=255)]


async def admin_principal(found: Caller) -> Principal:
    if not found.admin:
        raise HttpError(403, "admin_key_required", "this needs the admin key")
    return found


def json_body(request: Request, _caller: Caller) -> None:
    """A JSON body, from a caller with a usable key: 401 comes before 415 (the caller is
    found once a request, whichever dependency asks first)."""
    require_json_type(media_type(request.headers))

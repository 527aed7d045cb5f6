"""How events come in: `/in/{source}`, its generic and provider sources, the per-tenant
rate limit, and the spool that accepts events while the store is unreachable."""

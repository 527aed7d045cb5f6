"""The configuration (DESIGN §3.2): frozen pydantic models and the loader that checks them.

`load_config(path)` is the entry point; it raises `ConfigError` carrying every problem found,
each located at its key (`routes[2].destinations[0]`). `check_config(path)` returns them.
"""

from estafeta.config.loader import ENV_OVERRIDES, check_config, load_config, load_config_dict
from estafeta.config.models import (
    BackoffConfig,
    CircuitConfig,
    Config,
    DestinationConfig,
    DestinationKind,
    RedisConfig,
    RouteConfig,
    SecurityConfig,
    ServerConfig,
    SourceConfig,
    SourceKind,
    StorageConfig,
    TenantConfig,
    WorkerConfig,
    default_route_id,
)

__all__ = [
    "ENV_OVERRIDES",
    "BackoffConfig",
    "CircuitConfig",
    "Config",
    "DestinationConfig",
    "DestinationKind",
    "RedisConfig",
    "RouteConfig",
    "SecurityConfig",
    "ServerConfig",
    "SourceConfig",
    "SourceKind",
    "StorageConfig",
    "TenantConfig",
    "WorkerConfig",
    "check_config",
    "default_route_id",
    "load_config",
    "load_config_dict",
]

"""API keys, tenants and per-tenant limits (docs/security.md). No server imports: the CLI, the
config parser and the server all use it."""
from .keys import DEFAULT_TENANT, SCOPES, KeyStore, Principal
from .settings import AccessConfig, AuthConfig, TenantConfig, parse_access

__all__ = ["DEFAULT_TENANT", "SCOPES", "AccessConfig", "AuthConfig", "KeyStore", "Principal", "TenantConfig",
           "parse_access"]

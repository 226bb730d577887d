"""Settings of authentication, tenant limits and TLS: frozen, built once from flags and the environment.

Environment (flags win): DIFFLENS_AUTH_KEYS (the key file; unset: no keys), DIFFLENS_TENANT_RATE (calls per second
per tenant, 0: no limit), DIFFLENS_TENANT_BURST, DIFFLENS_TENANT_MAX_IN_FLIGHT (jobs queued + running per tenant,
0: no limit), DIFFLENS_TENANT_LABELS (comma-separated tenants with a metric label of their own),
DIFFLENS_AUTH_RELOAD_S (how often the key file is checked for changes), DIFFLENS_TLS_CERT, DIFFLENS_TLS_KEY,
DIFFLENS_TLS_CLIENT_CA. A tenant's own limits in the key file win over the rate, burst and in-flight defaults.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from difflens.errors import InvalidArgument

TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
TENANT_ALLOWED = "allowed: 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
# The metric label of every tenant that --tenant-labels does not list: the label's values stay a known, small set.
OTHER_TENANTS = "other"

S = TypeVar("S")


def check_tenant(field: str, tenant: str) -> str:
    """`tenant` when it is a valid tenant name (it becomes part of Redis keys and a metric label value)."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(field, f"got {tenant!r}; {TENANT_ALLOWED}")
    return tenant


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may do. rate_per_s: calls per second (a token bucket of `burst` calls; 0: no limit);
    max_in_flight: its jobs queued or running at once (0: no limit)."""

    rate_per_s: float = 20.0
    burst: int = 40
    max_in_flight: int = 100

    def __post_init__(self) -> None:
        if not (isinstance(self.rate_per_s, int | float) and self.rate_per_s >= 0):
            raise InvalidArgument("rate_per_s", f"got {self.rate_per_s!r}; must be a number >= 0 (0: no limit)")
        for name in ("burst", "max_in_flight"):
            value, least = getattr(self, name), 1 if name == "burst" else 0
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise InvalidArgument(name, f"got {value!r}; must be an integer >= {least}"
                                            + (" (0: no limit)" if least == 0 else ""))


@dataclass(frozen=True)
class AuthSettings:
    """keys_file None: no authentication (the CLI allows that only with --no-auth, or for an embedded server on a
    loopback address). The limits are every tenant's unless the key file gives it its own."""

    keys_file: str | None = None
    rate_per_s: float = TenantLimits.rate_per_s
    burst: int = TenantLimits.burst
    max_in_flight: int = TenantLimits.max_in_flight
    tenant_labels: tuple[str, ...] = ()
    reload_s: float = 5.0

    def __post_init__(self) -> None:
        self.limits  # noqa: B018 - validates them
        for tenant in self.tenant_labels:
            check_tenant("tenant_labels", tenant)
            if tenant == OTHER_TENANTS:
                raise InvalidArgument("tenant_labels", f"{OTHER_TENANTS!r} is the label of the tenants not listed")
        if not self.reload_s > 0:
            raise InvalidArgument("reload_s", f"got {self.reload_s}; must be > 0 (seconds)")

    @property
    def enabled(self) -> bool:
        return self.keys_file is not None

    @property
    def limits(self) -> TenantLimits:
        return TenantLimits(self.rate_per_s, self.burst, self.max_in_flight)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> AuthSettings:
        return _from_env(cls, env, overrides, (
            ("keys_file", "DIFFLENS_AUTH_KEYS", str), ("rate_per_s", "DIFFLENS_TENANT_RATE", float),
            ("burst", "DIFFLENS_TENANT_BURST", int), ("max_in_flight", "DIFFLENS_TENANT_MAX_IN_FLIGHT", int),
            ("tenant_labels", "DIFFLENS_TENANT_LABELS", split_list), ("reload_s", "DIFFLENS_AUTH_RELOAD_S", float)))


@dataclass(frozen=True)
class TlsSettings:
    """The gRPC port's certificate and key (PEM files; both or neither) and, for mutual TLS, the CA that client
    certificates must chain to. Files are read again when they change (a renewed certificate needs no restart)."""

    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("key" if self.key is None else "cert",
                                  "TLS needs both the certificate and its private key")
        if self.client_ca is not None and self.cert is None:
            raise InvalidArgument("client_ca", "mutual TLS needs the server's own certificate and key too")

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> TlsSettings:
        return _from_env(cls, env, overrides, (("cert", "DIFFLENS_TLS_CERT", str), ("key", "DIFFLENS_TLS_KEY", str),
                                               ("client_ca", "DIFFLENS_TLS_CLIENT_CA", str)))


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _from_env(cls: type[S], env: Mapping[str, str], overrides: Mapping[str, object],
              table: tuple[tuple[str, str, Callable[[str], Any]], ...]) -> S:
    """cls from the variables of `table` (field, variable, conversion), then the flag overrides that are not None;
    a bad value names its variable."""
    from difflens.config import _build  # config imports this module

    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    for key, var, conv in table:
        if var in env:
            try:
                values[key] = conv(env[var])
            except ValueError as e:
                raise InvalidArgument(var, f"got {env[var]!r}: {e}") from e
            origin[key] = var
    return _build(cls, values, origin, overrides)

"""``[http]`` and ``[webhooks]``: the settings that decide what the server accepts from the network
and where it is willing to send (docs/configuration.md, docs/security.md).

```toml
[http]
max_body_bytes = 1048576              # request bodies above this: 413, refused while reading
max_upload_bytes = 41943040           # the same for multipart/form-data bodies (image uploads)
public_url = "https://gen.example.com/" # base of every URL the API returns (default: the address
                                        #   the request arrived on, never the Host header)
trusted_proxies = ["10.0.0.5/32"]      # X-Forwarded-Proto/-Host are believed only from these

[webhooks]
allow_private = false                  # true: deliver to loopback/private/link-local addresses too
allow = ["10.1.2.0/24", "hooks.internal"]  # or only to these networks / host names
```
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .values import _check_table

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MIB = 1 << 20


class _Err(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass(frozen=True)
class HttpConfig:
    max_body_bytes: int = MIB
    max_upload_bytes: int = 40 * MIB  # multipart bodies: an image and a mask of up to 16 MiB each, and the fields
    public_url: str | None = None  # with a trailing slash
    trusted_proxies: tuple[Network, ...] = ()


@dataclass(frozen=True)
class WebhookPolicy:
    """Which webhook destinations beyond the public internet are allowed. The default allows
    none: an internal receiver needs ``allow_private`` or an entry in ``allow``."""

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()
    allow_hosts: frozenset[str] = frozenset()  # lower-case names, matched exactly


def _table(key: str, raw: Any, known: set[str]) -> dict[str, Any]:
    _check_table(key, raw, known)  # a ConfigError naming the key, with "did you mean"
    return raw


def _network(key: str, v: Any) -> Network:
    if not isinstance(v, str):
        raise _Err(key, f"must be an address or CIDR string, got {v!r}")
    try:
        return ipaddress.ip_network(v.strip(), strict=False)
    except ValueError:
        raise _Err(key, f"{v!r} is not an IP address or CIDR network") from None


def parse_http(raw: Any) -> HttpConfig:
    """``[http]``; raises ``genserve.config.load.ConfigError`` through the caller's wrapper."""
    t = _table("http", raw, {"max_body_bytes", "max_upload_bytes", "public_url", "trusted_proxies"})
    kw: dict[str, Any] = {}
    for key in ("max_body_bytes", "max_upload_bytes"):
        if key in t:
            v = t[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1024:
                raise _Err(f"http.{key}", f"must be an integer ≥ 1024, got {v!r}")
            kw[key] = v
    if "public_url" in t:
        v = t["public_url"]
        url = urlsplit(v) if isinstance(v, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment \
                or url.username is not None:
            raise _Err("http.public_url", f"must be an http(s) URL like https://gen.example.com/, got {v!r}")
        kw["public_url"] = v if v.endswith("/") else v + "/"
    if "trusted_proxies" in t:
        v = t["trusted_proxies"]
        if not isinstance(v, list):
            raise _Err("http.trusted_proxies", "must be a list of addresses or CIDR networks")
        kw["trusted_proxies"] = tuple(_network(f"http.trusted_proxies[{i}]", x) for i, x in enumerate(v))
    return HttpConfig(**kw)


def parse_webhooks(raw: Any) -> WebhookPolicy:
    t = _table("webhooks", raw, {"allow_private", "allow"})
    kw: dict[str, Any] = {}
    if "allow_private" in t:
        if not isinstance(t["allow_private"], bool):
            raise _Err("webhooks.allow_private", f"must be true or false, got {t['allow_private']!r}")
        kw["allow_private"] = t["allow_private"]
    if "allow" in t:
        v = t["allow"]
        if not isinstance(v, list):
            raise _Err("webhooks.allow", "must be a list of CIDR networks, addresses or host names")
        nets, hosts = [], set()
        for i, x in enumerate(v):
            key = f"webhooks.allow[{i}]"
            if not isinstance(x, str) or not x.strip():
                raise _Err(key, f"must be a CIDR network, an address or a host name, got {x!r}")
            try:
                nets.append(ipaddress.ip_network(x.strip(), strict=False))
            except ValueError:
                name = x.strip().lower().rstrip(".")
                if not all(c.isalnum() or c in "-." for c in name) or name.replace(".", "").isdigit():
                    raise _Err(key, f"{x!r} is not a CIDR network, an address or a host name") from None
                hosts.add(name)
        kw["allow_networks"], kw["allow_hosts"] = tuple(nets), frozenset(hosts)
    return WebhookPolicy(**kw)


def parse_net_sections(data: dict[str, Any], error: Callable[[str, str], Exception]) -> tuple[HttpConfig, WebhookPolicy]:
    """``[http]`` and ``[webhooks]`` of a config file; a bad value raises ``error(key, message)``
    (config/load.py passes its ConfigError: this module cannot import it without a cycle)."""
    try:
        return parse_http(data.get("http", {})), parse_webhooks(data.get("webhooks", {}))
    except _Err as e:
        raise error(e.key, e.message) from None

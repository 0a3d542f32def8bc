"""Where webhooks may go: the server-side request forgery (SSRF) defence.

A webhook makes the server send a POST wherever a client says, from inside the network it runs
in. So by default a webhook may only go to the public internet: a URL whose host is, or resolves
to, a loopback, private, shared (CGNAT), link-local (cloud metadata at 169.254.169.254),
multicast, reserved, documentation or unspecified address is refused — at submit (400 naming
``webhook``) and again at every delivery. Hosts are compared as addresses, never as text, so every
spelling is caught: ``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` are 127.0.0.1 (the
inet_aton forms browsers and curl accept); ``[::1]``, ``[::ffff:127.0.0.1]`` (IPv4-mapped), IPv4
inside IPv4-compatible, 6to4, NAT64 and Teredo addresses are checked as the IPv4 they carry;
``localhost`` and ``*.localhost`` never leave the machine. URLs with credentials are refused.
The server's own address and port are refused even when private receivers are allowed.

Delivery resolves the host again and connects to the address it just checked (the URL's host goes
in the ``Host`` header and the TLS server name), so DNS cannot answer "public" to the check and
"127.0.0.1" to the connection (rebinding). One disallowed address among a name's answers refuses
the name. ``[webhooks] allow_private = true`` or an ``allow`` list of networks and host names
admits internal receivers.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from ...config.network import WebhookPolicy

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses

RESOLVE_TIMEOUT_S = 5.0
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_TEREDO = ipaddress.ip_network("2001::/32")


class Refused(ValueError):
    """The URL may not receive webhooks; ``reason`` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
    return [info[4][0] for info in infos]


# ---- spelling: a URL host -> an address, when it is one --------------------------------------------


def _ipv4_number(part: str) -> int | None:
    """One inet_aton component: decimal, 0x hex or 0-prefixed octal; None if not a number."""
    p = part.lower()
    try:
        if p.startswith("0x"):
            return int(p[2:] or "0", 16)
        if len(p) > 1 and p.startswith("0"):
            return int(p[1:], 8)
        return int(p, 10) if p.isdigit() else None
    except ValueError:
        return None


def _ipv4_like(host: str) -> ipaddress.IPv4Address | None:
    """The address a numeric host stands for, in any inet_aton spelling (``2130706433``,
    ``0x7f.1``, ``127.1``, ``0177.0.0.1``). Like the WHATWG URL standard: a host whose last label
    is numeric is an IPv4 address or invalid — never a name to resolve."""
    labels = host.split(".")
    if labels and labels[-1] == "":
        labels.pop()  # "127.0.0.1." is 127.0.0.1
    if not labels or _ipv4_number(labels[-1]) is None:
        return None
    nums = [_ipv4_number(p) for p in labels]
    if len(nums) > 4 or any(n is None for n in nums):
        raise Refused("has a host that is neither a name nor a valid IPv4 address")
    *head, last = nums  # type: ignore[misc]
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(nums)):
        raise Refused("has a host that is neither a name nor a valid IPv4 address")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def literal_address(host: str) -> IP | None:
    """The host as an address when it is one (any spelling), else None (a name)."""
    h = host.strip("[]")
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])  # a zone id names an interface, not an address
        except ValueError:
            raise Refused("has an invalid IPv6 address") from None
    return _ipv4_like(h)


def embedded_ipv4(ip: IP) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address delivers to: mapped, compatible, 6to4, NAT64, Teredo."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client behind the relay
    if any(ip in n for n in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        return ipaddress.IPv4Address(int(ip))
    return None


def is_public(ip: IP) -> bool:
    """Globally routable unicast: none of loopback, private, shared, link-local, multicast,
    reserved, documentation, unspecified — for IPv6 also none of that in the IPv4 it carries."""
    v4 = embedded_ipv4(ip)
    if v4 is not None:
        return is_public(v4)
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified
                                 or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local))


def is_local(ip: IP) -> bool:
    """An address of this machine: loopback, unspecified, or one it can bind (no packet is sent)."""
    ip = embedded_ipv4(ip) or ip
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError as e:
        return e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


# ---- the policy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: ``url`` with the checked address in place of the host, and the
    ``host`` header / TLS server name the receiver expects."""

    url: str
    host_header: str
    server_name: str | None  # TLS: the name the certificate must match


class WebhookGuard:
    def __init__(self, policy: WebhookPolicy, *, resolve: Resolver = system_resolve,
                 own_port: int | None = None) -> None:
        self.policy = policy
        self.resolve = resolve
        self.own_port = own_port  # the server's port: with a local address, the server itself

    def parse(self, url: str) -> tuple[SplitResult, str, int]:
        """Syntax: an http(s) URL with a host and no credentials. -> (parts, host, port)."""
        try:
            u = urlsplit(url)
            port = u.port
        except ValueError:
            raise Refused("is not a valid URL") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise Refused("must be an http:// or https:// URL")
        if u.username is not None or u.password is not None or "@" in u.netloc:
            raise Refused("must not carry credentials (user:password@)")
        return u, u.hostname.lower(), port or (443 if u.scheme == "https" else 80)

    def allowed(self, ip: IP, host: str, port: int) -> bool:
        if self.own_port is not None and port == self.own_port and is_local(ip):
            return False  # the server's own API, whatever else is allowed
        p = self.policy
        if host.rstrip(".") in p.allow_hosts:
            return True
        candidates = [ip] + ([embedded_ipv4(ip)] if embedded_ipv4(ip) else [])
        if any(c.version == n.version and c in n for c in candidates for n in p.allow_networks):
            return True
        return p.allow_private or is_public(ip)

    async def addresses(self, url: str) -> tuple[SplitResult, str, int, list[IP]]:
        """Every address ``url`` would reach, each allowed; raises Refused otherwise."""
        u, host, port = self.parse(url)
        literal = literal_address(host)
        if literal is not None:
            ips: list[IP] = [literal]
        else:
            name = host.rstrip(".")
            if (name == "localhost" or name.endswith(".localhost")) and name not in self.policy.allow_hosts \
                    and not self.policy.allow_private:
                raise Refused("points at this machine (localhost)")
            try:
                found = await self.resolve(name, port)
            except (OSError, asyncio.TimeoutError, UnicodeError):
                raise Refused("has a host name that does not resolve") from None
            ips = []
            for a in found:
                try:
                    ips.append(ipaddress.ip_address(a.split("%", 1)[0]))
                except ValueError:
                    raise Refused("has a host name that does not resolve to an address") from None
            if not ips:
                raise Refused("has a host name that does not resolve")
        if not all(self.allowed(ip, host, port) for ip in ips):
            raise Refused("points at an address webhooks may not reach (loopback, private, link-local, "
                          "reserved or this server; see [webhooks] in the configuration)")
        return u, host, port, ips

    async def check(self, url: str) -> None:
        """At submit: raises Refused for a URL no delivery would be made to."""
        await self.addresses(url)

    async def target(self, url: str) -> Target:
        """At delivery: resolve again, check again, and pin the connection to a checked address."""
        u, host, port, ips = await self.addresses(url)
        ip = ips[0]
        ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
        default = 443 if u.scheme == "https" else 80
        netloc = ip_host if port == default else f"{ip_host}:{port}"
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        pinned = u._replace(netloc=netloc).geturl()
        server_name = host if u.scheme == "https" and literal_address(host) is None else None
        return Target(pinned, host_header, server_name)

"""Which addresses posttrain may call on a user's behalf: webhooks and RL jobs' tools.

Every outbound call to a URL a user gave (a webhook endpoint, a tool's HTTP endpoint)
goes through the same policy, so one rule protects the server's own network:

- the URL is ``http://`` or ``https://`` with a host, and carries no credentials
  (a tool's secrets travel as headers, which are kept out of job records);
- its host resolves only to public addresses (not loopback, private, link-local,
  multicast, reserved or unspecified), unless the address lies in a network the
  operator allows (``POSTTRAIN_WEBHOOK_ALLOWED_NETWORKS`` for webhooks,
  ``POSTTRAIN_TOOL_ALLOWED_NETWORKS`` for tools);
- for tools, the URL also starts with one of the operator's allowed prefixes when
  ``POSTTRAIN_TOOL_URL_PREFIXES`` names any.

A tenant's entry in the API key file may add its own rules for the URLs its jobs call
(tools, environments, endpoint graders): ``tool_url_prefixes`` (the URL must also start
with one of these) and ``tool_allowed_networks`` (non-public networks this tenant's
calls may reach besides the server's, e.g. the tenant's own subnet). The API applies
them at creation and records them on the job (``outbound``); the worker puts them in
the run plan's ``ToolPolicy``, so the training process applies them before every call.

The check runs when the URL is registered (a 400 naming the field) and again before
every call, since a name can change what it resolves to.

Pinning: a call connects to an address the check approved, never to what a second
lookup answers. Checking a name and then letting the HTTP client resolve it again would
let a hostile DNS server answer a public address to the check and 127.0.0.1 or
169.254.169.254 to the connection (DNS rebinding). So every call goes through a client
from ``pinned_client`` (``async_pinned_client``): its transport runs the check on each
request's URL, which resolves the host once and returns the approved addresses, and its
network backend connects only to those (in order, the next on a refused connection)
and refuses any other host. The URL itself is untouched: the Host header, TLS SNI and
certificate verification all use the host name, and kept-alive connections are pooled
per host name, so a connection verified for one name never carries another name's
request. Such a client never follows redirects and ignores proxy variables.

Torch-free: the API, the workers and the training process all import it.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from pydantic import BaseModel, Field, field_validator

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(ValueError):
    """A URL the outbound policy refuses; the message says why and which setting allows it."""


def allowed_networks(spec: str) -> list[Network]:
    """The networks of a comma-separated CIDR list (a setting's value)."""
    return [ipaddress.ip_network(x.strip(), strict=False) for x in spec.split(",") if x.strip()]


def check_url(url: str, credentials_hint: str = "the signature authenticates") -> tuple[str, int]:
    """The URL's host and port; ``AddressRefused`` unless it is an http(s) URL with a host
    and no user name or password in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AddressRefused("the url must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise AddressRefused(f"the url may not carry credentials; {credentials_hint}")
    try:
        port = parts.port
    except ValueError:
        raise AddressRefused("the url has an invalid port") from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_addresses(
    host: str,
    port: int,
    allowed: list[Network],
    setting: str = "POSTTRAIN_WEBHOOK_ALLOWED_NETWORKS",
) -> list[str]:
    """The addresses ``host`` resolves to, all of them approved; ``AddressRefused`` naming
    the address when one is non-public and outside ``allowed`` (or the host does not
    resolve). ``setting`` is what an operator sets to allow it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressRefused(f"the host '{host}' does not resolve: {exc}") from None
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        addr = ipaddress.ip_address(address.split("%")[0])
        if address not in addresses:
            addresses.append(address)
        if any(addr in net for net in allowed):
            continue
        if not addr.is_global or addr.is_multicast:
            raise AddressRefused(
                f"the host '{host}' resolves to {addr}, a non-public address; an operator "
                f"may allow its network with {setting}"
            )
    return addresses


class TenantOutbound(BaseModel):
    """One tenant's rules for the URLs its jobs call, from its API key-file entry."""

    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDR networks this tenant's calls may reach besides public addresses "
        "and the server's allowed networks.",
    )
    url_prefixes: list[str] = Field(
        default_factory=list,
        description="This tenant's URLs must start with one of these (as well as with one "
        "of the server's, when it names any); empty = no rule of its own.",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net.strip(), strict=False)
            except ValueError:
                raise ValueError(f"'{net}' is not a CIDR network (like 10.1.0.0/16)") from None
        return [n.strip() for n in value]

    @field_validator("url_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            check_url(prefix, "a prefix names no credentials")
        return value

    @property
    def empty(self) -> bool:
        return not self.allowed_networks and not self.url_prefixes


class ToolPolicy(BaseModel):
    """What the server lets an RL job's tools call (from the worker's settings; the API
    applies the same at creation). Handed to the training process in its run plan."""

    allowed_networks: str = Field(
        "",
        description="Comma-separated CIDR networks tool hosts may resolve to besides public ones.",
    )
    url_prefixes: list[str] = Field(
        default_factory=list,
        description="A tool URL must start with one of these; empty = any URL the address "
        "rule allows.",
    )
    max_reply_bytes: int = Field(
        65536, ge=1, description="The largest tool reply the server reads (a job may ask less)."
    )
    tenant: TenantOutbound | None = Field(
        None, description="The job's tenant's own rules (its key-file entry), if it has any."
    )

    def for_tenant(self, rules: TenantOutbound | None) -> ToolPolicy:
        """This server policy with a tenant's rules on top (None or empty: unchanged)."""
        return self.model_copy(update={"tenant": rules if rules and not rules.empty else None})

    def check(self, url: str) -> list[str]:
        """The addresses ``url``'s host resolves to now, all approved; ``AddressRefused``
        unless ``url`` may be called. A call connects to one of these (``pinned_client``)."""
        host, port = check_url(url, "put secrets in the tool's headers")
        if self.url_prefixes and not any(url.startswith(p) for p in self.url_prefixes):
            raise AddressRefused(
                "the url starts with none of the prefixes this server allows for tools "
                f"({', '.join(self.url_prefixes)}); an operator sets them with "
                "POSTTRAIN_TOOL_URL_PREFIXES"
            )
        tenant = self.tenant or TenantOutbound()
        if tenant.url_prefixes and not any(url.startswith(p) for p in tenant.url_prefixes):
            raise AddressRefused(
                "the url starts with none of the prefixes your tenant may call "
                f"({', '.join(tenant.url_prefixes)}); an operator sets them with "
                "tool_url_prefixes in the tenant's entry of the API key file"
            )
        networks = allowed_networks(self.allowed_networks)
        networks += [ipaddress.ip_network(n, strict=False) for n in tenant.allowed_networks]
        setting = "POSTTRAIN_TOOL_ALLOWED_NETWORKS (all tenants)"
        return check_addresses(
            host,
            port,
            networks,
            f"{setting} or tool_allowed_networks (one tenant's key-file entry)",
        )


# --- pinning: connect only to the addresses the check approved (module docstring) ---

Check = Callable[[str], list[str]]
"""A URL in, the approved addresses of its host out (``AddressRefused`` otherwise)."""

# The pin of the request being sent in this thread (or task): (host, port, addresses).
_PIN: contextvars.ContextVar[tuple[str, int, list[str]] | None] = contextvars.ContextVar(
    "posttrain_outbound_pin", default=None
)
_PORTS = {"http": 80, "https": 443}


def _pinned(host: str, port: int) -> list[str]:
    """The approved addresses of ``host``:``port`` for the request in flight."""
    pin = _PIN.get()
    if pin is None or pin[:2] != (host, port):
        raise AddressRefused(f"no checked address for '{host}' port {port}; nothing was sent")
    return pin[2]


def _target(request: httpx.Request) -> tuple[str, int]:
    """The host and port httpcore will connect to for ``request`` (its origin)."""
    url = request.url
    return url.raw_host.decode("ascii"), url.port or _PORTS.get(url.scheme, 0)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects a host name to its pinned addresses only."""

    def __init__(self) -> None:
        self._net = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        refused: httpcore.ConnectError | None = None
        for address in _pinned(host, port):
            try:
                return self._net.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:  # the next address, as a resolver's list
                refused = exc
        assert refused is not None  # a check returns at least one address
        raise refused

    def sleep(self, seconds: float) -> None:
        self._net.sleep(seconds)


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """``_PinnedBackend`` for the async client."""

    def __init__(self) -> None:
        self._net = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        refused: httpcore.ConnectError | None = None
        for address in _pinned(host, port):
            try:
                return await self._net.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                refused = exc
        assert refused is not None
        raise refused

    async def sleep(self, seconds: float) -> None:
        await self._net.sleep(seconds)


_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's


def _pool_options(ssl_context: ssl.SSLContext) -> dict[str, Any]:
    return {
        "ssl_context": ssl_context,
        "max_connections": _LIMITS.max_connections,
        "max_keepalive_connections": _LIMITS.max_keepalive_connections,
        "keepalive_expiry": _LIMITS.keepalive_expiry,
    }


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport whose every request is checked by ``check`` and connected to an
    address the check returned. The pool is httpcore's own with a pinning backend (httpx
    has no argument for a backend, hence the replaced ``_pool``)."""

    def __init__(
        self,
        check: Check,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        ctx = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ctx, trust_env=False, limits=_LIMITS)
        self.check = check
        self._pool = httpcore.ConnectionPool(network_backend=_PinnedBackend(), **_pool_options(ctx))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host, port = _target(request)
        token = _PIN.set((host, port, self.check(str(request.url))))
        try:
            return super().handle_request(request)
        finally:
            _PIN.reset(token)


class AsyncPinnedTransport(httpx.AsyncHTTPTransport):
    """``PinnedTransport`` for ``httpx.AsyncClient``; ``check`` (which resolves a name, a
    blocking call) runs in a thread."""

    def __init__(
        self,
        check: Check,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        ctx = httpx.create_ssl_context(verify=verify, trust_env=False)
        super().__init__(verify=ctx, trust_env=False, limits=_LIMITS)
        self.check = check
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=_AsyncPinnedBackend(), **_pool_options(ctx)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host, port = _target(request)
        addresses = await asyncio.to_thread(self.check, str(request.url))
        token = _PIN.set((host, port, addresses))
        try:
            return await super().handle_async_request(request)
        finally:
            _PIN.reset(token)


def pinned_client(
    check: Check, verify: ssl.SSLContext | bool = True, **kwargs: Any
) -> httpx.Client:
    """An ``httpx.Client`` for user URLs: each request checked by ``check`` and sent to an
    address it approved; no redirects followed, no proxy variables read. ``verify``: TLS
    certificate verification (an ``ssl.SSLContext`` trusting other authorities, or True)."""
    transport = PinnedTransport(check, verify=verify)
    return httpx.Client(transport=transport, follow_redirects=False, trust_env=False, **kwargs)


def async_pinned_client(
    check: Check, verify: ssl.SSLContext | bool = True, **kwargs: Any
) -> httpx.AsyncClient:
    """``pinned_client`` for async callers."""
    transport = AsyncPinnedTransport(check, verify=verify)
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, **kwargs)

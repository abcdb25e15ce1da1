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
every call, since a name can change what it resolves to. Torch-free: the API, the
workers and the training process all import it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

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
) -> None:
    """``AddressRefused`` naming the address when ``host`` resolves to a non-public one
    outside ``allowed`` (or does not resolve); ``setting`` is what an operator sets to
    allow it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressRefused(f"the host '{host}' does not resolve: {exc}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if any(addr in net for net in allowed):
            continue
        if not addr.is_global or addr.is_multicast:
            raise AddressRefused(
                f"the host '{host}' resolves to {addr}, a non-public address; an operator "
                f"may allow its network with {setting}"
            )


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

    def check(self, url: str) -> None:
        """``AddressRefused`` unless ``url`` may be called now (resolves its host)."""
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
        check_addresses(
            host,
            port,
            networks,
            f"{setting} or tool_allowed_networks (one tenant's key-file entry)",
        )

"""DNS rebinding: a call to a user's URL connects to the address its check approved.

The resolver trick needs no DNS server: ``socket.getaddrinfo`` is patched in this
process so that ``rebind.test`` answers 127.0.0.2 (the one address the policy allows) to
its first lookup and 127.0.0.1 to every later one, as a hostile DNS server would. Two
real loopback servers share one port, the approved one on 127.0.0.2 and a "forbidden"
one on 127.0.0.1; each keeps the requests it got. An unpinned client (check, then let
httpx resolve again) reaches the forbidden one, which shows the trick is the attack;
every posttrain path (the pinned client, a tool, an endpoint grader, a webhook delivery)
reaches only the approved one. A TLS server with a certificate for the name only (no IP
in it) shows that SNI and verification still use the name.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.settings import ApiSettings
from service.webhooks import Deliverer
from tests.loopback import Handler
from tests.service.test_tenants import key_file
from trainers.contract.graders import remote
from trainers.contract.graders.spec import parse_grader
from trainers.contract.outbound import (
    AddressRefused,
    ToolPolicy,
    async_pinned_client,
    pinned_client,
)
from trainers.contract.tools import Tool
from trainers.tools import ToolLimits, build_tools
from workers.webhooks import WebhookStore

NAME = "rebind.test"
APPROVED, FORBIDDEN = "127.0.0.2", "127.0.0.1"
POLICY = ToolPolicy(allowed_networks=f"{APPROVED}/32")


class Server:
    """A loopback HTTP(S) server on ``address``:``port`` answering ``{"score": score}``
    and keeping (path, Host header) of each request."""

    def __init__(self, address: str, port: int, score: float, tls: ssl.SSLContext | None = None):
        self.hits: list[tuple[str, str]] = []
        outer = self

        class Hit(Handler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                outer.hits.append((self.path, self.headers["host"]))
                self.reply(200, json.dumps({"score": score}).encode())

        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        server_class = type("Srv", (ThreadingHTTPServer,), {"address_family": family})
        self.srv = server_class((address, port), Hit)
        if tls is not None:
            self.srv.socket = tls.wrap_socket(self.srv.socket, server_side=True)
        self.port = self.srv.server_port
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _pair(tls: ssl.SSLContext | None = None) -> tuple[Server, Server]:
    """(approved, forbidden): servers on one port of 127.0.0.2 and 127.0.0.1."""
    for _ in range(20):
        forbidden = Server(FORBIDDEN, 0, 0.0)
        try:
            return Server(APPROVED, forbidden.port, 1.0, tls), forbidden
        except OSError:  # that port is taken on 127.0.0.2: another one
            forbidden.close()
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture
def servers() -> Iterator[tuple[Server, Server]]:
    approved, forbidden = _pair()
    yield approved, forbidden
    approved.close()
    forbidden.close()


class Resolver:
    """``socket.getaddrinfo`` where some names answer a list of addresses per lookup (the
    last list again once they run out); every other name resolves as usual."""

    def __init__(self, real):
        self.real, self.answers, self.lookups = real, {}, []

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.answers:
            return self.real(host, port, *args, **kwargs)
        self.lookups.append(host)
        answers = self.answers[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [i for a in addresses for i in self.real(a, port, *args, **kwargs)]


@pytest.fixture
def resolver(monkeypatch) -> Resolver:
    """``rebind.test``: 127.0.0.2 to the first lookup, 127.0.0.1 to every later one."""
    fake = Resolver(socket.getaddrinfo)
    fake.answers[NAME] = [[APPROVED], [FORBIDDEN]]
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


def test_unpinned_the_second_lookup_reaches_the_forbidden_server(servers, resolver):
    """The attack this file guards against: check the name, then let httpx resolve it."""
    approved, forbidden = servers
    url = f"http://{NAME}:{approved.port}/hook"
    POLICY.check(url)  # approved: the first lookup answers 127.0.0.2
    with httpx.Client(trust_env=False) as plain:
        assert plain.post(url, content=b"{}").status_code == 200
    assert approved.hits == [] and forbidden.hits == [("/hook", f"{NAME}:{approved.port}")]


def test_the_pinned_client_connects_to_the_address_it_checked(servers, resolver):
    approved, forbidden = servers
    url = f"http://{NAME}:{approved.port}/hook"
    with pinned_client(POLICY.check) as client:
        assert client.post(url, content=b"{}").json() == {"score": 1.0}
        assert resolver.lookups == [NAME]  # one lookup: the check's
        # the next request is checked again, and the name now answers 127.0.0.1
        with pytest.raises(AddressRefused, match=r"resolves to 127\.0\.0\.1, a non-public"):
            client.post(url, content=b"{}")
    assert approved.hits == [("/hook", f"{NAME}:{approved.port}")]  # the Host is the name
    assert forbidden.hits == []


def test_a_name_with_one_forbidden_address_among_its_addresses_is_refused(servers, resolver):
    approved, forbidden = servers
    resolver.answers["mixed.test"] = [[APPROVED, FORBIDDEN]]
    with pinned_client(POLICY.check) as client:
        with pytest.raises(AddressRefused, match=r"resolves to 127\.0\.0\.1"):
            client.post(f"http://mixed.test:{approved.port}/", content=b"{}")
    assert approved.hits == forbidden.hits == []


def test_a_refused_connection_moves_on_to_the_next_approved_address(servers, resolver):
    approved, forbidden = servers
    resolver.answers["two.test"] = [["127.0.0.3", APPROVED]]  # nothing listens on .3
    policy = ToolPolicy(allowed_networks="127.0.0.2/32,127.0.0.3/32")
    with pinned_client(policy.check) as client:
        assert client.post(f"http://two.test:{approved.port}/", content=b"{}").status_code == 200
    assert len(approved.hits) == 1 and forbidden.hits == []


def test_an_ipv6_address_is_pinned_too(resolver):
    try:
        server = Server("::1", 0, 1.0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        resolver.answers["six.test"] = [["::1"], [FORBIDDEN]]
        policy = ToolPolicy(allowed_networks="::1/128")
        with pinned_client(policy.check) as client:
            assert client.post(f"http://six.test:{server.port}/", content=b"{}").status_code == 200
            with pytest.raises(AddressRefused, match=r"127\.0\.0\.1"):
                client.post(f"http://six.test:{server.port}/", content=b"{}")
        assert server.hits == [("/", f"six.test:{server.port}")]
    finally:
        server.close()


# --- TLS: the name, not the address, is what SNI carries and the certificate must match


def _certificate(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): self-signed, valid for DNS name ``name`` only."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_servers(tmp_path):
    """(approved, forbidden, the client's trust, the SNI names the approved one saw)."""
    cert, key = _certificate(NAME)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name)
    approved, forbidden = _pair(server_ctx)
    trust = ssl.create_default_context(cadata=cert.decode())
    yield approved, forbidden, trust, sni
    approved.close()
    forbidden.close()


def test_https_verifies_the_certificate_against_the_name_and_sends_it_as_sni(tls_servers, resolver):
    approved, forbidden, trust, sni = tls_servers
    with pinned_client(POLICY.check, verify=trust) as client:
        reply = client.post(f"https://{NAME}:{approved.port}/tls", content=b"{}")
    assert reply.json() == {"score": 1.0}
    assert sni == [NAME] and approved.hits == [("/tls", f"{NAME}:{approved.port}")]
    assert forbidden.hits == []


def test_https_refuses_a_certificate_for_another_name(tls_servers, resolver):
    approved, _, trust, _ = tls_servers
    resolver.answers["other.test"] = [[APPROVED]]
    with pinned_client(POLICY.check, verify=trust) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            client.post(f"https://other.test:{approved.port}/tls", content=b"{}")
    assert approved.hits == []


# --- every caller of a user's URL goes through a pinned client


def test_a_tool_call_reaches_the_checked_address(servers, resolver):
    approved, forbidden = servers
    tool = Tool.model_validate(
        {
            "function": {"name": "lookup", "parameters": {"type": "object"}},
            "endpoint": {"url": f"http://{NAME}:{approved.port}/tool"},
        }
    )
    limits = ToolLimits(timeout=5.0, retries=0, max_reply_bytes=1024)
    (http,), _ = build_tools([tool], POLICY, limits)
    assert http() == '{"score": 1.0}'
    # a second call: the check's lookup now answers 127.0.0.1, which the policy refuses
    assert http().startswith("error: the tool's endpoint is not allowed: the host 'rebind.test'")
    assert approved.hits == [("/tool", f"{NAME}:{approved.port}")] and forbidden.hits == []


def test_an_endpoint_grader_reaches_the_checked_address(servers, resolver):
    approved, forbidden = servers
    grader = parse_grader(
        {
            "type": "endpoint",
            "name": "remote",
            "url": f"http://{NAME}:{approved.port}/grade",
            "retries": 0,
        }
    )
    remote.configure(POLICY)
    try:
        assert remote.call(grader, {"answer": 1}, "1") == 1.0
        refused = remote.call(grader, {"answer": 1}, "1")
    finally:
        remote.configure(ToolPolicy())
    assert refused.startswith("the endpoint is not allowed: the host 'rebind.test' resolves")
    assert approved.hits == [("/grade", f"{NAME}:{approved.port}")] and forbidden.hits == []


def test_the_async_client_pins_too(servers, resolver):
    approved, forbidden = servers
    url = f"http://{NAME}:{approved.port}/async"

    async def post_twice() -> tuple[int, str]:
        async with async_pinned_client(POLICY.check) as client:
            first = (await client.post(url, content=b"{}")).status_code
            try:
                await client.post(url, content=b"{}")
            except AddressRefused as exc:
                return first, str(exc)
        return first, ""

    status, refused = asyncio.run(post_twice())
    assert status == 200 and "resolves to 127.0.0.1" in refused
    assert approved.hits == [("/async", f"{NAME}:{approved.port}")] and forbidden.hits == []


def test_a_webhook_delivery_reaches_the_checked_address(
    servers, resolver, tmp_path, redis_client, unit_redis_url
):
    """Through the API's deliverer and a real Redis, with its own allowed networks."""
    approved, forbidden = servers
    settings = ApiSettings(
        redis_url=unit_redis_url,
        data_dir=tmp_path,
        api_keys_file=key_file(tmp_path / "keys.json"),
        webhook_allowed_networks=f"{APPROVED}/32",
        webhook_retry_seconds=60,
    )
    store = WebhookStore(redis_client, prefix="test:")
    hook = store.create("a", f"http://{NAME}:{approved.port}/hook", ["job.done"], "")
    deliverer = Deliverer(store, settings)

    async def deliver(event_type: str) -> int:
        store.emit(event_type, "ftjob-1", "a")
        return await deliverer.once()

    async def twice() -> tuple[int, int]:
        try:
            return await deliver("job.done"), await deliver("job.done")
        finally:
            await deliverer.close()

    assert asyncio.run(twice()) == (1, 1)
    first, second = reversed(store.log(hook["id"], 10))
    assert first["outcome"] == "delivered"
    # the second event's delivery: the name now answers 127.0.0.1, refused, retried later
    assert second["outcome"] == "retrying"
    assert second["error"].startswith("the host 'rebind.test' resolves to 127.0.0.1")
    assert second["error"].endswith("POSTTRAIN_WEBHOOK_ALLOWED_NETWORKS")
    assert approved.hits == [("/hook", f"{NAME}:{approved.port}")] and forbidden.hits == []

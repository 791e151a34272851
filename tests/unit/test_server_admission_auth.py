"""Admission control and bearer-token parsing: pure logic, no server."""

from __future__ import annotations

import pytest

from propscope_server.api.admission import Admission, Caller
from propscope_server.api.auth import Authenticator, bearer_token
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT
from propscope_server.errors import ResourceExhausted

LIMITS = Limits(
    max_streams_total=3,
    max_streams_per_tenant=2,
    max_streams_per_peer=3,
    max_streams_per_connection=3,
    tenant_max_streams={"big": 3},
)


def caller(tenant: str | None, port: int = 1000, host: str = "10.0.0.1") -> Caller:
    return Caller.of(f"ipv4:{host}:{port}", tenant)


def test_a_tenant_over_its_limit_is_refused_and_others_are_not():
    admission = Admission(LIMITS)
    with admission.admit(caller("a")), admission.admit(caller("a")):
        with pytest.raises(ResourceExhausted, match="max_streams_per_tenant of 2"):
            with admission.admit(caller("a")):
                pass
        with admission.admit(caller("b")):
            with pytest.raises(ResourceExhausted, match="max_streams_total of 3"):
                with admission.admit(caller("c", host="10.0.0.2")):
                    pass


def test_slots_are_released_even_when_the_stream_fails():
    admission = Admission(LIMITS)
    for _ in range(5):
        with pytest.raises(RuntimeError), admission.admit(caller("a")):
            raise RuntimeError("stream failed")
    with admission.admit(caller("a")), admission.admit(caller("a")):
        pass


def test_a_tenant_override_raises_its_limit():
    admission = Admission(LIMITS)
    assert admission.tenant_limit("big") == 3 and admission.tenant_limit("a") == 2
    with admission.admit(caller("big")), admission.admit(caller("big")):
        with admission.admit(caller("big")):
            pass


def test_one_connection_fills_only_its_share_and_other_connections_are_served():
    admission = Admission(Limits(max_streams_total=8, max_streams_per_connection=2))
    greedy = caller(None, port=1)
    with admission.admit(greedy), admission.admit(greedy):
        with pytest.raises(
            ResourceExhausted, match="this connection .* max_streams_per_connection"
        ):
            with admission.admit(greedy):
                pass
        with admission.admit(caller(None, port=2)), admission.admit(caller(None, port=3)):
            pass


def test_with_auth_on_tenants_behind_one_address_do_not_share_a_peer_limit():
    """Behind a proxy or NAT every tenant has the same address: their own shares apply."""
    admission = Admission(Limits(max_streams_total=8, max_streams_per_peer=1))
    with admission.admit(caller("a", port=1)), admission.admit(caller("b", port=2)):
        with admission.admit(caller("a", port=3)):
            pass


def test_with_auth_off_the_peer_takes_the_tenants_place():
    """Every caller is tenant "default" with auth off: one address may not fill the
    tenant's share, while other addresses are still served."""
    limits = Limits(max_streams_total=8, max_streams_per_peer=2, max_streams_per_tenant=2)
    admission = Admission(limits)
    with admission.admit(caller(None, port=1)), admission.admit(caller(None, port=2)):
        with pytest.raises(ResourceExhausted, match="peer ipv4:10.0.0.1 .* max_streams_per_peer"):
            with admission.admit(caller(None, port=3)):
                pass
        with admission.admit(caller(None, host="10.0.0.2")):
            with admission.admit(caller(None, host="10.0.0.3")):
                pass


def test_a_refused_stream_holds_no_slot_of_any_kind():
    admission = Admission(Limits(max_streams_total=1))
    with admission.admit(caller("a")):
        with pytest.raises(ResourceExhausted):
            with admission.admit(caller("b", host="10.0.0.9")):
                pass
    for _ in range(3):
        with admission.admit(caller("b", host="10.0.0.9")):
            pass


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:%5B::1%5D:51234", "ipv6:%5B::1%5D"),  # as grpc 1.85 reports [::1]
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("unix:", None),  # every Unix-socket caller: no address to share by
        ("unix:/tmp/propscope.sock", None),
        ("", None),
    ],
)
def test_a_peer_is_its_address_without_the_port(peer, address):
    caller = Caller.of(peer, None)
    assert caller.peer == address
    assert caller.connection == (peer if address else None)


def test_callers_without_an_address_share_only_the_tenant_and_gateway_limits():
    admission = Admission(Limits(max_streams_total=6, max_streams_per_connection=1))
    with admission.admit(caller(None, port=1)):
        for _ in range(3):  # one "unix:" caller after another, beyond the connection share
            with admission.admit(Caller.of("unix:", None)):
                pass
        with pytest.raises(ResourceExhausted, match="max_streams_per_tenant of 1"):
            limited = Admission(Limits(max_streams_per_tenant=1))
            with limited.admit(Caller.of("unix:", "a")), limited.admit(Caller.of("unix:", "a")):
                pass


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", "Bearer s3cret")], "s3cret"),
        ([("authorization", "bearer  s3cret ")], "s3cret"),
        ([("x-other", "1"), ("authorization", "Bearer t")], "t"),
        ([("authorization", "Basic dXNlcg==")], None),
        ([("authorization", "Bearer ")], None),
        ([("authorization", b"Bearer bytes")], None),
        ([], None),
        (None, None),
    ],
)
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


def test_tokens_map_to_tenants_and_no_tokens_means_one_default_tenant():
    authenticator = Authenticator({"t1": "team-a", "t2": "team-b"})
    assert authenticator.tenant([("authorization", "Bearer t2")]) == "team-b"
    assert authenticator.tenant([("authorization", "Bearer t3")]) is None
    assert authenticator.tenant([]) is None
    assert Authenticator({}).tenant([]) == DEFAULT_TENANT

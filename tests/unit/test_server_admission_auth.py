"""Admission control and bearer-token parsing: pure logic, no server."""

from __future__ import annotations

import pytest

from propscope_server.api.admission import Admission
from propscope_server.api.auth import Authenticator, bearer_token
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT
from propscope_server.errors import ResourceExhausted

LIMITS = Limits(max_streams_total=3, max_streams_per_tenant=2, tenant_max_streams={"big": 3})


def test_a_tenant_over_its_limit_is_refused_and_others_are_not():
    admission = Admission(LIMITS)
    with admission.admit("a"), admission.admit("a"):
        with pytest.raises(ResourceExhausted, match="max_streams_per_tenant of 2"):
            with admission.admit("a"):
                pass
        with admission.admit("b"):
            with pytest.raises(ResourceExhausted, match="max_streams_total of 3"):
                with admission.admit("c"):
                    pass


def test_slots_are_released_even_when_the_stream_fails():
    admission = Admission(LIMITS)
    for _ in range(5):
        with pytest.raises(RuntimeError), admission.admit("a"):
            raise RuntimeError("stream failed")
    with admission.admit("a"), admission.admit("a"):
        pass


def test_a_tenant_override_raises_its_limit():
    admission = Admission(LIMITS)
    assert admission.tenant_limit("big") == 3 and admission.tenant_limit("a") == 2
    with admission.admit("big"), admission.admit("big"), admission.admit("big"):
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

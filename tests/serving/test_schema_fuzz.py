"""Schemathesis against the live server's OpenAPI spec: whatever it sends, with a user key and
with an admin key, the server answers with a status below 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from conftest import ADMIN_KEY, USER_KEY


@pytest.fixture
def api_schema(live_server):
    return schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


# RAFT regeneration is left out: a valid request starts a real teacher run, minutes of work
# per example; its input checks are tested in test_api.py.
@schema.exclude(path="/v1/raft/regenerate").parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case):
    for key in (USER_KEY, ADMIN_KEY):
        response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
            f"\n{case.as_curl_command()}"
        )

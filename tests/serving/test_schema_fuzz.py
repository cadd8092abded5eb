"""Schemathesis against the live server's OpenAPI spec: whatever it sends to any operation,
with a user key and with an admin key, the server answers with a status below 500.

The operations are driven through schemathesis's strategies and hypothesis directly (its
pytest plugin does not run on this pytest), one test per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import ADMIN_KEY, USER_KEY

# Left out: operations whose valid request starts real minutes-long work in the server,
# which then kept running behind the rest of the suite (a fuzzed POST /v1/loop trained a
# full epoch on the test session's 2 cores, and the process waited for it at exit). Their
# input checks are tested where they are used: RAFT regeneration in test_api.py, the loop
# in test_loop.py.
SKIPPED = {("POST", "/v1/raft/regenerate"), ("POST", "/v1/loop")}


@pytest.fixture(scope="module")
def operations(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    return {
        (op.method.upper(), op.path): op
        for op in found
        if (op.method.upper(), op.path) not in SKIPPED
    }


def test_every_operation_is_fuzzed(operations):
    paths = {path for _, path in operations}
    assert {"/v1/ask", "/v1/chat", "/v1/chat/completions", "/v1/feedback"} <= paths
    assert len(operations) >= 12


def test_no_request_makes_the_server_fail(operations):
    failures: list[str] = []
    calls = 0
    for _, operation in sorted(operations.items()):

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            for key in (USER_KEY, ADMIN_KEY):
                calls += 1
                response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=120)
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.path} -> {response.status_code}: "
                        f"{response.text[:300]}\n"
                        f"{case.as_curl_command()}"
                    )

        run()
    assert calls >= 4 * len(operations)  # several generated requests per operation and key
    assert not failures, "\n\n".join(failures[:5])

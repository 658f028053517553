"""Security suite: Schemathesis against both OpenAPI documents of the real, running command and query
APIs, with valid bearer tokens, per operation and statefully: never a 5xx, every error problem+json."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.fanout_fixtures import token
from tests.test_http_edge import Services, running_services

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extras")

pytestmark = pytest.mark.security

EXAMPLES_PER_OPERATION = 10
STATEFUL_EXAMPLES = {"command_api": 30, "query_api": 10}  # the command API's links need ~30 to be followed
BOUNDED = settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
)  # fmt: skip
"""No shrinking, no example database, a fixed seed: the same bounded run every time."""

HEADERS = {"Authorization": f"Bearer {token('alice')}"}


@pytest.fixture(scope="module")
def fuzzed(
    redis_server_url: str, database_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    """The services without a rate limit, so that the fuzzing reaches past the token bucket."""
    with running_services(
        redis_server_url, database_server_url, tmp_path_factory.mktemp("schema"), PARLEY_RATE_LIMIT_PER_S="0"
    ) as ports:
        yield ports


def check_answer(response: Any, where: object) -> None:
    """No 5xx; an error is RFC 9457 problem+json with type, title and its own status."""
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code >= 400:
        kind = " ".join(response.headers.get("content-type", []))  # Schemathesis lists each header's values
        assert kind.startswith("application/problem+json"), (where, response.status_code, kind)
        problem = response.json()
        assert {"type", "title", "status"} <= problem.keys(), (where, problem)
        assert problem["status"] == response.status_code, (where, problem)


def _schema(port: int) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")


@pytest.mark.parametrize("api", ["command_api", "query_api"])
def test_every_operation_answers_fuzzed_requests_without_a_5xx(fuzzed: Services, api: str) -> None:
    port = getattr(fuzzed, api)
    schema = _schema(port)
    base_url = f"http://127.0.0.1:{port}"
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, operations
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        for mode in schemathesis.GenerationMode:  # valid requests, then requests the schema forbids

            @BOUNDED
            @given(case=operation.as_strategy(mode))
            def fuzz(case: Any) -> None:
                response = case.call(base_url=base_url, headers=HEADERS, timeout=10)
                check_answer(response, case.operation.label)
                statuses.setdefault(case.operation.label, set()).add(response.status_code)

            try:
                fuzz()
            except Unsatisfiable:
                if mode is schemathesis.GenerationMode.POSITIVE:
                    raise  # a negative case is impossible where nothing is declared (/healthz)
    assert statuses.keys() == {operation.label for operation in operations}
    assert any(code < 300 for codes in statuses.values() for code in codes), statuses  # not all refused


@pytest.mark.parametrize("api", ["command_api", "query_api"])
def test_sequences_of_calls_along_the_inferred_links_never_5xx(fuzzed: Services, api: str) -> None:
    port = getattr(fuzzed, api)
    base_url = f"http://127.0.0.1:{port}"

    class Machine(_schema(port).as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            """A fresh user per sequence, so that no sequence meets another's conversations or keys
            (Hypothesis replays sequences and needs each to behave the same every time)."""
            self.headers = {"Authorization": f"Bearer {token(f'fuzz-{uuid.uuid4().hex[:12]}')}"}

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "headers": self.headers, "timeout": 10}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            check_answer(response, case.operation.label)
            calls.append(f"{case.operation.label} {response.status_code}")

    calls: list[str] = []
    Machine.run(settings=settings(BOUNDED, max_examples=STATEFUL_EXAMPLES[api], stateful_step_count=6))
    assert len(calls) >= STATEFUL_EXAMPLES[api], calls
    if api == "command_api":  # the links carry a created conversation into the routes that take it
        reached = [c for c in calls if "{conversation_id}" in c and c.split()[-1] in {"202", "409", "410"}]
        assert reached, "\n".join(sorted(set(calls)))

"""schemathesis against the server's own OpenAPI schema: generated bodies for every endpoint
(valid and invalid by the schema) never get a 5xx, errors have the OpenAI shape, and the server
is healthy afterwards. A short context (64 tokens) keeps every generation cheap."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.server.conftest import ServerHandle, start_server, stop_server  # noqa: E402

NUM_EXAMPLES = 25
NUM_EXAMPLES_SLOW = 200


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[ServerHandle]:
    handle = start_server(tmp_path_factory.mktemp("fuzz"), "--max-model-len", "64")
    yield handle
    assert httpx.get(f"{handle.url}/health", timeout=10).status_code == 200
    stop_server(handle)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):  # type: ignore[no-untyped-def]
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def check(case) -> None:  # type: ignore[no-untyped-def]
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == response.status_code


def fuzz(api_schema, num_examples: int, derandomize: bool) -> int:  # type: ignore[no-untyped-def]
    """Run ``num_examples`` generated cases against every operation; returns operations run."""
    num_operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=num_examples,
            deadline=None,
            derandomize=derandomize,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case) -> None:  # type: ignore[no-untyped-def]
            check(case)

        run()
        num_operations += 1
    return num_operations


def test_no_server_errors(api_schema) -> None:  # type: ignore[no-untyped-def]
    assert fuzz(api_schema, NUM_EXAMPLES, derandomize=True) >= 10


@pytest.mark.slow
def test_no_server_errors_long(api_schema) -> None:  # type: ignore[no-untyped-def]
    assert fuzz(api_schema, NUM_EXAMPLES_SLOW, derandomize=False) >= 10

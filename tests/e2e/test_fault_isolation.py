"""A failure that belongs to one request fails that request only; the others finish exactly as
they would alone and every KV block comes back. A fault no request can be blamed for stops the
engine loop: callers get 503 and the server exits non-zero."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from kvforge.async_engine import AsyncLLM, EngineDeadError
from kvforge.errors import InvalidRequestError
from kvforge.sample import Sampler
from kvforge.sampling_params import SamplingParams, StructuredOutputsParams
from tests.helpers import CHAT_PROMPTS, run_to_completion
from tests.server.conftest import free_port

GREEDY = SamplingParams(temperature=0, max_tokens=8)
MARKER_TOP_K = 7  # the failing request is the one sampled with this top_k


class FlakySampler(Sampler):
    """Raises whenever the failing request is in the batch."""

    def __call__(self, logits, md):  # type: ignore[no-untyped-def]
        if md.top_k is not None and bool((md.top_k == MARKER_TOP_K).any()):
            raise RuntimeError("injected sampling failure")
        return super().__call__(logits, md)


class ExplodingMatcher:
    """A grammar matcher that fails on its second token."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.calls = inner, 0

    def accept_token(self, token_id: int) -> bool:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected grammar failure")
        return self.inner.accept_token(token_id)

    def fill_bitmask(self, bitmask, row: int) -> None:  # type: ignore[no-untyped-def]
        self.inner.fill_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.inner.is_terminated()


@pytest.fixture(scope="module")
def solo(make_engine) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Greedy tokens of the three good prompts, each run alone."""
    engine = make_engine()
    tokens = []
    for text in CHAT_PROMPTS[:3]:
        engine.add_request(engine.tokenizer.encode(text), GREEDY, request_id="solo")
        tokens.append(run_to_completion(engine)["solo"].outputs[0].token_ids)
    return tokens


def assert_no_leak(engine) -> None:  # type: ignore[no-untyped-def]
    engine.kv_cache_manager.check_integrity()
    assert engine.kv_cache_manager.pool.num_in_use == 0
    assert not engine.has_unfinished_requests()
    assert not engine.output_processor.states


@pytest.mark.parametrize("where", ["sampler", "grammar", "detokenizer", "n_samples"])
def test_one_failing_request_leaves_the_others_exact(make_engine, solo, where):
    engine = make_engine()
    prompts = [engine.tokenizer.encode(text) for text in CHAT_PROMPTS[:3]]
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, GREEDY, request_id=f"good{i}")
    bad_prompt = engine.tokenizer.encode(CHAT_PROMPTS[3])
    if where == "sampler":
        engine.runner.sampler = FlakySampler()
        engine.add_request(
            bad_prompt, SamplingParams(max_tokens=8, top_k=MARKER_TOP_K), request_id="bad"
        )
    elif where == "n_samples":
        engine.runner.sampler = FlakySampler()
        params = SamplingParams(n=3, max_tokens=8, top_k=MARKER_TOP_K, seed=1)
        engine.add_request(bad_prompt, params, request_id="bad")
    elif where == "grammar":
        params = SamplingParams(
            max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z ]+")
        )
        engine.add_request(bad_prompt, params, request_id="bad")
        request = engine.scheduler.requests["bad"]
        request.grammar = ExplodingMatcher(request.grammar)
    else:
        engine.add_request(bad_prompt, GREEDY, request_id="bad")

        def explode(token_id: int) -> bool:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer failure")

        engine.output_processor.states["bad"].sequences[0].detokenizer.add_token = explode
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    [bad_id] = [i for i in outputs if not i.startswith("good")]
    assert outputs[bad_id].finished and outputs[bad_id].error is not None
    assert "injected" in outputs[bad_id].error
    for i in range(len(prompts)):
        good = outputs[f"good{i}"]
        assert good.error is None
        assert good.outputs[0].token_ids == solo[i]
    assert_no_leak(engine)


def test_async_stream_gets_the_request_error(make_engine):
    engine = make_engine()
    engine.runner.sampler = FlakySampler()
    llm = AsyncLLM(engine)

    async def run(params: SamplingParams, request_id: str) -> str:
        text = ""
        async for output in llm.generate("Hello", params, request_id):
            text = output.outputs[0].text if output.outputs else text
        return text

    async def main() -> tuple[object, object]:
        return tuple(
            await asyncio.gather(
                run(SamplingParams(max_tokens=4, top_k=MARKER_TOP_K), "bad"),
                run(GREEDY, "good"),
                return_exceptions=True,
            )
        )

    try:
        bad, good = asyncio.run(main())
        assert isinstance(bad, Exception) and getattr(bad, "http_status", 0) == 500
        assert isinstance(good, str) and good
        assert llm.is_healthy
    finally:
        llm.shutdown()


def test_engine_factory_runs_on_the_engine_thread(make_engine):
    """A factory builds the engine on the loop thread (one OpenMP pool for load and steps);
    its error reaches the constructor."""
    built_on: list[int] = []

    def factory():  # type: ignore[no-untyped-def]
        built_on.append(threading.get_ident())
        return make_engine()

    llm = AsyncLLM(factory)
    try:
        assert built_on == [llm._thread.ident] and built_on[0] != threading.get_ident()
        text = llm.call(lambda engine: engine.tokenizer.decode([72]))
        assert isinstance(text, str)
        assert llm.is_healthy
    finally:
        llm.shutdown()

    def broken():  # type: ignore[no-untyped-def]
        raise ValueError("corrupt model file")

    with pytest.raises(ValueError, match="corrupt model file"):
        AsyncLLM(broken)


def test_model_failure_stops_the_loop_and_the_server_exits_nonzero(make_engine):
    from kvforge.entrypoints.openai import ServerConfig, serve

    engine = make_engine()

    def broken_forward(scheduler_output):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected model failure")

    engine.runner.execute = broken_forward
    llm = AsyncLLM(engine)
    port = free_port()
    exit_codes: list[int] = []
    thread = threading.Thread(
        target=lambda: exit_codes.append(
            serve(llm, ServerConfig(served_model_names=("m",)), "127.0.0.1", port)
        )
    )
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        threading.Event().wait(0.1)
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 503, response.text
    thread.join(timeout=30)
    assert not thread.is_alive() and exit_codes == [1]
    assert not llm.is_healthy
    with pytest.raises(EngineDeadError):
        llm.submit(lambda e: None).result()


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        (None, GREEDY, "prompt"),
        (5, GREEDY, "prompt"),
        ([1, "a"], GREEDY, "prompt"),
        ("hi", {"max_tokens": 2}, "params"),
        ("hi", "mutated", "temperature"),
    ],
)
def test_offline_requests_with_bad_values_raise_typed_errors(make_engine, prompt, params, field):
    engine = make_engine()
    if params == "mutated":
        params = SamplingParams(max_tokens=2)
        params.temperature = float("nan")
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, params)
    assert info.value.param == field
    assert not engine.has_unfinished_requests()

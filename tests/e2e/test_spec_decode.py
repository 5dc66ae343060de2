"""Speculative decoding (n-gram lookup and a draft model) on the embedded model: greedy output
is token-identical with and without it, alone, in mixed batches and under preemption; the KV
bookkeeping holds after every step; drafts are really proposed and accepted."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvforge.config import default_model_path
from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import SamplingParams, StructuredOutputsParams
from tests.e2e.schemas import all_schemas
from tests.helpers import run_to_completion

# Input-grounded prompts (copying, editing): n-gram lookup finds what to propose.
PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "List: apple, banana,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
    "# The same functions with type hints:\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Copy the sentence: 'Rivers carry water from the mountains to the sea.' Copy:",
]
SPEC = {"speculative_method": "ngram", "num_speculative_tokens": 4}
# The embedded Q4_1 file, packed, drafting for its float32 dequantization (the target).
DRAFT = {"speculative_model": default_model_path(), "num_speculative_tokens": 4}


def generate(engine, prompts, params_list, check=True) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p, params in zip(prompts, params_list)]

    def integrity() -> None:
        engine.scheduler.check_integrity()

    outputs = run_to_completion(engine, integrity if check else None)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    return [outputs[i].outputs[0].token_ids for i in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(make_engine) -> list[list[int]]:
    engine = make_engine()
    return [generate(engine, [p], [GREEDY])[0] for p in PROMPTS]


PROPOSERS = pytest.mark.parametrize("spec", [SPEC, DRAFT], ids=["ngram", "draft"])


@PROPOSERS
def test_alone_equals_without_speculation(make_engine, reference, spec):
    engine = make_engine(**spec)
    outputs = [generate(engine, [p], [GREEDY])[0] for p in PROMPTS]
    assert outputs == reference
    stats = engine.scheduler.spec_stats
    assert stats.num_accepted_tokens > 20, stats  # drafts were proposed and many held
    assert 0 < stats.acceptance_rate <= 1
    if "speculative_model" in spec:
        # the same weights, 4-bit: nearly every draft holds, which it could not if the
        # draft's mirrored KV cache were wrong
        assert stats.acceptance_rate > 0.8, stats


@PROPOSERS
@pytest.mark.parametrize(
    "flags",
    [{}, {"num_blocks": 14}, {"max_num_batched_tokens": 24}],
    ids=["batch", "preemption", "small-budget"],
)
def test_mixed_batch_equals_without_speculation(make_engine, reference, flags, spec):
    engine = make_engine(**spec, speculative_disable_by_batch_size=0, **flags)
    # Greedy requests that speculate next to requests that do not (random sampling with a
    # seed, a JSON-constrained one): the greedy ones must not change.
    prompts = PROMPTS + ["Tell me about cats.", "Give a JSON object with a name."]
    params = [GREEDY] * len(PROMPTS) + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=30),
        SamplingParams(
            temperature=0,
            max_tokens=30,
            structured_outputs=StructuredOutputsParams(json={"type": "object"}),
        ),
    ]
    outputs = generate(engine, prompts, params)
    assert outputs[: len(PROMPTS)] == reference
    if "num_blocks" in flags:
        assert engine.num_preemptions > 0
    stats = engine.scheduler.spec_stats
    assert stats.num_verifications > 0
    if "speculative_model" in spec:
        # Rows that verify drafts skip the draft's mirror pass, chunked prefill and
        # preemption move its written positions: stale draft KV would show here.
        assert stats.acceptance_rate > 0.7, stats


def test_fast_path_equals_without_speculation(make_fast_engine):
    plain = make_fast_engine()
    spec = make_fast_engine(**SPEC)
    for prompt in PROMPTS[:2]:
        assert generate(spec, [prompt], [GREEDY]) == generate(plain, [prompt], [GREEDY])


@PROPOSERS
def test_logprobs_stops_and_limits_with_speculation(make_engine, spec):
    engine = make_engine(**spec)
    plain = make_engine()
    cases = [
        SamplingParams(temperature=0, max_tokens=7, logprobs=2),  # max_tokens mid-draft
        SamplingParams(temperature=0, max_tokens=40, stop=["elderberry"]),
        SamplingParams(temperature=0, max_tokens=40, min_tokens=30),
    ]
    for params in cases:
        a_id = engine.add_request(PROMPTS[0], params)
        a = run_to_completion(engine)[a_id].outputs[0]
        b_id = plain.add_request(PROMPTS[0], params)
        b = run_to_completion(plain)[b_id].outputs[0]
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.finish_reason == b.finish_reason
        if params.logprobs:
            assert a.logprobs is not None and b.logprobs is not None
            assert len(a.logprobs) == len(a.token_ids)
            for x, y in zip(a.logprobs, b.logprobs):
                assert x.keys() == y.keys()
                for token_id in x:
                    assert x[token_id].logprob == pytest.approx(y[token_id].logprob, abs=1e-4)


@PROPOSERS
def test_seeded_sampling_is_reproducible_with_speculation(make_engine, spec):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=30)
    runs = [generate(make_engine(**spec), [PROMPTS[0]], [params])[0] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_draft_model_must_share_the_vocabulary(make_engine, gemma_path):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        make_engine(speculative_model=gemma_path)


def test_draft_options_are_checked(make_engine, tmp_path):
    with pytest.raises(InvalidRequestError, match="speculative_model"):
        make_engine(speculative_method="draft")
    with pytest.raises(InvalidRequestError, match="draft method"):
        make_engine(speculative_method="ngram", speculative_model=default_model_path())
    with pytest.raises(Exception, match="not found|No such"):
        make_engine(speculative_model=str(tmp_path / "missing.gguf"))


@pytest.mark.slow
@PROPOSERS
def test_structured_outputs_validate_with_speculation(make_engine, spec):
    """The 30-schema suite with drafts checked by each grammar: every output validates, and the
    greedy ones equal their runs without speculation."""
    from tests.e2e.test_structured import chat, constrained

    schemas = all_schemas()
    plain = make_engine(num_blocks=1024, max_num_seqs=128)
    engine = make_engine(
        num_blocks=1024, max_num_seqs=128, speculative_disable_by_batch_size=0, **spec
    )
    results = []
    for eng in (plain, engine):
        ids = {}
        for schema in schemas:
            prompt = chat(eng, f"Reply with JSON for this schema: {json.dumps(schema)[:200]}")
            for sampled in (False, True):
                params = constrained(StructuredOutputsParams(json=schema), sampled)
                ids[eng.add_request(prompt, params)] = (schema, sampled)
        outputs = run_to_completion(eng, eng.scheduler.check_integrity)
        for request_id, (schema, _) in ids.items():
            completion = outputs[request_id].outputs[0]
            assert completion.finish_reason == "stop", (schema, completion.text)
            jsonschema.validate(json.loads(completion.text), schema)
        results.append(
            [outputs[r].outputs[0].token_ids for r, (_, sampled) in ids.items() if not sampled]
        )
    assert results[0] == results[1]
    assert engine.scheduler.spec_stats.num_accepted_tokens > 0


def test_a_request_can_opt_out(make_engine, reference):
    engine = make_engine(**SPEC)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, speculative=False)
    request_id = engine.add_request(PROMPTS[0], params)
    output = run_to_completion(engine)[request_id]
    assert output.outputs[0].token_ids == reference[0]
    assert output.metrics is not None and output.metrics.num_draft_tokens == 0
    assert engine.scheduler.spec_stats.num_verifications == 0
    with pytest.raises(InvalidRequestError):
        SamplingParams(speculative="no")  # type: ignore[arg-type]


def two_sample_p(a: list[int], b: list[int]) -> float:
    """Chi-square p-value that samples ``a`` and ``b`` come from one distribution (cells with
    fewer than 10 expected counts pooled)."""
    import torch

    values = sorted(set(a) | set(b))
    counts = torch.tensor(
        [[a.count(v) for v in values], [b.count(v) for v in values]], dtype=torch.float64
    )
    total = counts.sum(1, keepdim=True)
    expected = counts.sum(0, keepdim=True) * total / total.sum()
    big = expected.min(0).values >= 10
    table = torch.cat([counts[:, big], counts[:, ~big].sum(1, keepdim=True)], 1)
    exp = torch.cat([expected[:, big], expected[:, ~big].sum(1, keepdim=True)], 1)
    keep = exp[0] > 0
    stat = ((table[:, keep] - exp[:, keep]) ** 2 / exp[:, keep]).sum()
    dof = int(keep.sum()) - 1
    assert dof >= 5, "too few cells to test"
    return float(torch.special.gammaincc(torch.tensor(dof / 2), stat / 2))


# The prompt repeats token 7 and a logit bias makes 7 likely, so n-gram drafts of 7 are taken
# about half the time (accept and reject paths both run); the bias also goes through the
# verification's processing.
BIAS = {7: 7.0}


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, logit_bias=BIAS),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, ignore_eos=True, logit_bias=BIAS),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=4, ignore_eos=True, logit_bias=BIAS),
    ],
    ids=["t1", "top_p", "top_k"],
)
def test_sampled_distribution_is_unchanged_on_a_tiny_model(tmp_path_factory, params):
    """20k samples of the next four tokens of a tiny random model, with and without n-gram
    drafts (the prompt repeats a token, so drafts are proposed and many accepted): each
    position's distribution passes a two-sample chi-square test."""
    from kvforge.config import ModelConfig
    from kvforge.engine import LLMEngine
    from kvforge.entrypoints.llm import engine_config
    from kvforge.layers.attention import create_attention_backend
    from kvforge.loader import load_model
    from kvforge.runner import ModelRunner
    from tests.models.tiny_checkpoints import write_checkpoint

    directory = tmp_path_factory.mktemp("tiny")
    write_checkpoint("llama", directory)
    loaded = load_model(ModelConfig(model=str(directory)), create_attention_backend(), False)
    prompt = [0] + [7] * 11
    samples = 20_000
    results = []
    for flags in ({}, {**SPEC, "speculative_disable_by_batch_size": 0}):
        config = engine_config(
            str(directory),
            block_size=4,
            num_blocks=4096,
            max_num_seqs=512,
            show_progress=False,
            **flags,
        )
        engine = LLMEngine(config, ModelRunner(config, loaded))
        ids = [engine.add_request(prompt, params) for _ in range(samples)]
        outputs = run_to_completion(engine)
        results.append([outputs[i].outputs[0].token_ids for i in ids])
        if flags:
            stats = engine.scheduler.spec_stats
            assert stats.num_accepted_tokens > 2000, stats
            assert stats.num_draft_tokens - stats.num_accepted_tokens > 2000, stats
    for position in range(4):
        plain = [t[position] for t in results[0]]
        spec = [t[position] for t in results[1]]
        assert two_sample_p(plain, spec) > 0.01, position


def test_a_failing_verification_fails_only_its_request(make_engine, reference):
    """The verification raising for one request (batched, then one by one) fails that request;
    the others keep their greedy tokens and every block comes back."""
    from kvforge.sample.rejection import RejectionSampler

    class FlakyVerifier(RejectionSampler):
        def __call__(self, logits, md, *args):  # type: ignore[no-untyped-def]
            if md.top_k is not None and bool((md.top_k == 7).any()):
                raise RuntimeError("injected verification failure")
            return super().__call__(logits, md, *args)

    engine = make_engine(**SPEC, speculative_disable_by_batch_size=0)
    engine.runner.rejection_sampler = FlakyVerifier()
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    bad = engine.add_request(PROMPTS[0], SamplingParams(top_k=7, max_tokens=40))
    outputs = run_to_completion(engine, engine.scheduler.check_integrity)
    assert [outputs[i].outputs[0].token_ids for i in ids] == reference
    assert outputs[bad].error is not None and "injected" in outputs[bad].error
    assert engine.kv_cache_manager.pool.num_in_use == 0

"""Structured output on the embedded model: outputs always satisfy their constraint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import SamplingParams, StructuredOutputsParams
from tests.e2e.schemas import all_schemas
from tests.helpers import run_to_completion

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(num_blocks=1024, max_num_seqs=128)


def constrained(
    params: StructuredOutputsParams, sampled: bool, max_tokens: int = 200
) -> SamplingParams:
    if sampled:
        return SamplingParams(
            temperature=1.0, seed=3, max_tokens=max_tokens, structured_outputs=params
        )
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=params)


def chat(engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_json_schemas_always_validate(engine):
    schemas = all_schemas()
    assert len(schemas) >= 30
    ids = {}
    for schema in schemas:
        prompt = chat(engine, f"Reply with JSON for this schema: {json.dumps(schema)[:200]}")
        for sampled in (False, True):
            request_id = engine.add_request(
                prompt, constrained(StructuredOutputsParams(json=schema), sampled)
            )
            ids[request_id] = schema
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    for request_id, schema in ids.items():
        completion = outputs[request_id].outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)
    assert engine.kv_cache_manager.pool.num_in_use == 0


def test_regex_choice_and_json_object(engine):
    regexes = [
        r"\d{3}-\d{4}",
        r"[A-Z][a-z]{2,8}",
        r"(yes|no), because [a-z ]{5,20}\.",
        r"[0-9]{4}-[01][0-9]-[0-3][0-9]",
    ]
    choices = [["red", "green", "blue"], ["Paris", "London", "Rome", "Berlin"]]
    cases = []
    for sampled in (False, True):
        for pattern in regexes:
            rid = engine.add_request(
                chat(engine, "Give an example."),
                constrained(StructuredOutputsParams(regex=pattern), sampled, 40),
            )
            cases.append((rid, lambda text, p=pattern: re.fullmatch(p, text) is not None))
        for options in choices:
            rid = engine.add_request(
                chat(engine, "Pick one."),
                constrained(StructuredOutputsParams(choice=options), sampled, 20),
            )
            cases.append((rid, lambda text, o=options: text in o))
    # Any JSON object: unbounded in size, so only the deterministic greedy case is sure to close.
    rid = engine.add_request(
        chat(engine, "Give a JSON object with a name."),
        constrained(StructuredOutputsParams(json_object=True), False, 300),
    )
    cases.append((rid, lambda text: isinstance(json.loads(text), dict)))
    outputs = run_to_completion(engine)
    for rid, check in cases:
        text = outputs[rid].outputs[0].text
        assert check(text), text


def test_llama_cpp_gbnf_grammars(engine):
    arithmetic = (DATA / "arithmetic.gbnf").read_text()
    json_gbnf = (DATA / "json.gbnf").read_text()
    ids = []
    for sampled in (False, True):
        ids.append(
            (
                "arith",
                engine.add_request(
                    chat(engine, "Write some equations."),
                    constrained(StructuredOutputsParams(grammar=arithmetic), sampled, 60),
                ),
            )
        )
        # Seeded and greedy runs are reproducible; these ones close their object in time.
        ids.append(
            (
                "json",
                engine.add_request(
                    chat(engine, "Give a JSON object with a name."),
                    constrained(StructuredOutputsParams(grammar=json_gbnf), sampled, 300),
                ),
            )
        )
    outputs = run_to_completion(engine)
    for kind, rid in ids:
        completion = outputs[rid].outputs[0]
        if kind == "json":
            assert completion.finish_reason == "stop"
            assert isinstance(json.loads(completion.text), dict)
            continue
        if completion.finish_reason == "stop":
            assert ArithmeticParser(completion.text).parse_all() >= 1
        else:  # cut by max_tokens: every error must be the end of the text
            with pytest.raises(EOFError):
                ArithmeticParser(completion.text).parse_all()


class ArithmeticParser:
    """An independent recursive-descent parser of llama.cpp's arithmetic grammar."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self) -> str:
        if self.pos >= len(self.text):
            raise EOFError
        return self.text[self.pos]

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n":
            self.pos += 1

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise SyntaxError(f"expected {char!r} at {self.pos}: {self.text!r}")
        self.pos += 1

    def term(self) -> None:
        char = self.peek()
        if char == "(":
            self.pos += 1
            self.ws()
            self.expr()
            self.expect(")")
        elif char.isdigit():
            while self.pos < len(self.text) and self.text[self.pos].isdigit():
                self.pos += 1
        elif "a" <= char <= "z":
            self.pos += 1
            while self.pos < len(self.text) and (
                self.text[self.pos].isalnum() or self.text[self.pos] == "_"
            ):
                self.pos += 1
        else:
            raise SyntaxError(f"bad term at {self.pos}: {self.text!r}")
        self.ws()

    def expr(self) -> None:
        self.term()
        while self.pos < len(self.text) and self.text[self.pos] in "+-*/":
            self.pos += 1
            self.term()

    def parse_all(self) -> int:
        count = 0
        while True:
            self.expr()
            self.expect("=")
            self.ws()
            self.term()  # swallows the whitespace after it, which must end with the newline
            if not self.text[: self.pos].endswith("\n"):
                self.peek()  # EOFError when the text simply stopped here
                raise SyntaxError(f"expected a newline at {self.pos}: {self.text!r}")
            count += 1
            if self.pos == len(self.text):
                return count


def test_mixed_batch_equals_alone(make_engine):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    requests = [
        (
            "Name a city.",
            SamplingParams(
                temperature=0,
                max_tokens=30,
                structured_outputs=StructuredOutputsParams(json=schema),
            ),
        ),
        ("Name a city.", SamplingParams(temperature=0, max_tokens=12)),
        (
            "Pick a color.",
            SamplingParams(
                temperature=0,
                max_tokens=10,
                structured_outputs=StructuredOutputsParams(choice=["red", "blue"]),
            ),
        ),
        ("Tell a joke.", SamplingParams(temperature=0, max_tokens=12)),
    ]
    alone = []
    for text, params in requests:
        engine = make_engine()
        engine.add_request(chat(engine, text), params, request_id="x")
        alone.append(run_to_completion(engine)["x"].outputs[0].token_ids)
    engine = make_engine()
    ids = [engine.add_request(chat(engine, text), params) for text, params in requests]
    outputs = run_to_completion(engine)
    assert [outputs[i].outputs[0].token_ids for i in ids] == alone


def test_length_limit_mid_structure_and_cached_compile(engine):
    schema = {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 200}},
        "required": ["story"],
    }
    params = SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(json=schema)
    )
    engine.add_request(chat(engine, "Tell a story."), params, request_id="short")
    assert run_to_completion(engine)["short"].outputs[0].finish_reason == "length"
    compiles = engine.structured_outputs().cache.num_compiles
    engine.add_request(chat(engine, "Another story."), params, request_id="again")
    run_to_completion(engine)
    assert engine.structured_outputs().cache.num_compiles == compiles  # served from the cache


@pytest.mark.parametrize(
    "constraint,needle",
    [
        (
            StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
            "invalid JSON schema",
        ),
        (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (StructuredOutputsParams(json={"not": {"type": "string"}}), "'not'"),
        (StructuredOutputsParams(json="{not json"), "not valid JSON"),
        (StructuredOutputsParams(regex="(unclosed"), "regex"),
        (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar"),
    ],
)
def test_bad_constraints_fail_closed(engine, constraint, needle):
    with pytest.raises(InvalidRequestError, match=re.escape(needle)):
        engine.add_request("hi", SamplingParams(structured_outputs=constraint))
    assert not engine.has_unfinished_requests()


def test_too_deep_schema_is_rejected(engine):
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(InvalidRequestError, match="deeper"):
        engine.add_request(
            "hi", SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
        )


def test_exactly_one_constraint():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams()

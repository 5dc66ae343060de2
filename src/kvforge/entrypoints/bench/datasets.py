"""Prompt text for ``kvforge bench serve``: random common words, or one shared context with
distinct questions. Plain words so any server's tokenizer sees about one token per word."""

from __future__ import annotations

import random

_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect class control care field development role effort rate heart drug show "
    "leader light voice wife police mind price report decision son view relationship town road "
    "arm difference value building action model season society tax director position player "
    "record paper space ground form event official matter center couple site project activity "
    "star table need court oil situation cost industry figure street image phone data picture "
    "practice piece land product doctor wall patient worker news test movie north love support "
    "technology step baby computer type attention film tree source organization hair window "
    "evidence population river garden summer winter bridge train island forest mountain"
)
WORDS = tuple(_WORD_TEXT.split())

DATASETS = ("random", "shared-prefix")


def random_words(rng: random.Random, num_words: int) -> str:
    """``num_words`` common English words drawn at random, space separated."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_prompts(
    dataset: str, num_prompts: int, input_len: int, prefix_len: int, seed: int
) -> list[str]:
    """``random``: distinct prompts of ``input_len`` words. ``shared-prefix``: one context of
    ``prefix_len`` words followed by a distinct short question per prompt."""
    rng = random.Random(seed)
    if dataset == "random":
        return [random_words(rng, input_len) for _ in range(num_prompts)]
    if dataset == "shared-prefix":
        context = random_words(rng, prefix_len)
        return [
            f"{context}\n\nQuestion {i + 1}: which word of the text above comes right after "
            f"the first '{rng.choice(WORDS)}'?\nAnswer:"
            for i in range(num_prompts)
        ]
    raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")

"""Build a :class:`Tokenizer` from the ``tokenizer.ggml.*`` metadata of a GGUF file."""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from kvforge.errors import UnsupportedModelError
from kvforge.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split that a byte-level vocabulary's merges were learned with (``tokenizer.ggml.pre``)."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM splits digits one by one before the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in ("default", "gpt2", "gpt-2"):
        logger.warning("unknown GGUF pre-tokenizer %r: using the GPT-2 split", pre)
    return byte_level


def _spm_merges(tokens: list[str], priority: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every split of a token into two
    vocabulary pieces is a merge, ranked by the merged token's priority (higher first)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-priority[index], vocab[left], vocab[right], (left, right)))
    ranked.sort()
    return [merge for *_, merge in ranked]


def _build_backend(meta: dict[str, Any]) -> BackendTokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    if kind == "gpt2":
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(
            str(meta.get("tokenizer.ggml.pre", "default"))
        )
        backend.decoder = decoders.ByteLevel()
        return backend
    if kind == "llama":
        arch = str(meta.get("general.architecture", ""))
        is_gemma = arch.startswith("gemma")
        if is_gemma:
            # Gemma stores runs of spaces literally; its merges follow file order, not scores.
            tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
            priority = [-float(i) for i in range(len(tokens))]
        else:
            priority = [float(s) for s in meta["tokenizer.ggml.scores"]]
        vocab = {token: i for i, token in enumerate(tokens)}
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        bpe = models.BPE(
            vocab=vocab,
            merges=_spm_merges(tokens, priority),
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
        backend = BackendTokenizer(bpe)
        steps: list[normalizers.Normalizer] = []
        add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not is_gemma))
        if add_prefix:
            steps.append(normalizers.Prepend("\u2581"))
        steps.append(normalizers.Replace(" ", "\u2581"))
        backend.normalizer = normalizers.Sequence(steps)
        dec: list[decoders.Decoder] = [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
        if add_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(dec)
        return backend
    raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer described by GGUF metadata (``key -> value``)."""
    backend = _build_backend(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k == _CONTROL
    ]
    # NOTE: only pieces the model vocabulary holds under the same id; a SentencePiece vocabulary
    # stores spaces as "▁", so a user-defined "  " would otherwise get a new id past the
    # embedding table (the normalizer already maps such runs onto their pieces).
    user = [
        AddedToken(t, special=False, normalized=False)
        for i, (t, k) in enumerate(zip(tokens, types))
        if k == _USER_DEFINED and backend.token_to_id(t) == i
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return Tokenizer(
        backend,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        add_bos_token=bool(
            meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
        ),
        chat_template=meta.get("tokenizer.chat_template"),
    )

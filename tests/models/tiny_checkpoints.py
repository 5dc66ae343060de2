"""Tiny random Hugging Face checkpoints written with transformers (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 96
WORDS = ["<s>", "</s>", "<unk>", "user", "assistant"] + [f"w{i}" for i in range(5, VOCAB)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token if loop.first else '' }}{{ m['role'] }} {{ m['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
)


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary with BOS/EOS and a chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in WORDS[:3]])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


BPE_VOCAB = 320
BPE_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "user: hello there, assistant: hi! how can I help you today?",
    "experts route tokens; the router picks the top two of four experts",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ?",
]


def write_bpe_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer (GGUF-convertible, unlike the word-level one) trained on a
    few lines; returns its vocabulary size (at most ``BPE_VOCAB``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(BPE_CORPUS * 4, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    return int(tokenizer.get_vocab_size())


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def _common(**extra: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.25,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    fields.update(extra)
    return fields


def build_model(arch: str):  # type: ignore[no-untyped-def]
    """A random transformers model of a small config for ``arch``."""
    import transformers as tf

    if arch == "llama":
        config = tf.LlamaConfig(**_common(tie_word_embeddings=False))
        return tf.LlamaForCausalLM(config)
    if arch == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        config = tf.LlamaConfig(**_common(tie_word_embeddings=True, rope_parameters=scaling))
        return tf.LlamaForCausalLM(config)
    if arch == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=8)))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(tie_word_embeddings=True)))
    if arch == "qwen3":  # per-head QK-norm, explicit head_dim
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(head_dim=16)))
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(
            **_common(num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
        )
        return tf.Gemma3ForCausalLM(config)
    moe = dict(vocab_size=BPE_VOCAB, num_experts_per_tok=2)
    if arch == "mixtral":
        config = tf.MixtralConfig(**_common(num_local_experts=4, intermediate_size=48, **moe))
        return tf.MixtralForCausalLM(config)
    if arch == "qwen2_moe":  # layer 1 dense: mlp_only_layers
        config = tf.Qwen2MoeConfig(
            **_common(
                num_hidden_layers=3,
                num_experts=4,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                mlp_only_layers=[1],
                norm_topk_prob=False,
                **moe,
            )
        )
        return tf.Qwen2MoeForCausalLM(config)
    if arch == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **_common(num_experts=8, moe_intermediate_size=32, head_dim=16, **moe)
        )
        return tf.Qwen3MoeForCausalLM(config)
    if arch == "olmoe":
        config = tf.OlmoeConfig(**_common(num_experts=4, intermediate_size=32, clip_qkv=3.0, **moe))
        return tf.OlmoeForCausalLM(config)
    raise ValueError(arch)


def write_checkpoint(arch: str, directory: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """Write a sharded safetensors checkpoint plus tokenizer (byte-level BPE for the MoE
    architectures, so they convert to GGUF); return the float32 model."""
    torch.manual_seed(seed)
    model = build_model(arch).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # random norm scales, so a wrong norm formula shows
                param.add_(torch.randn_like(param) * 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB")
    if arch in MOE_ARCHS:
        write_bpe_tokenizer(directory)
    else:
        write_tokenizer(directory)
    return model

"""Vision chat (LLaVA): a tiny random ``LlavaForConditionalGeneration`` written by transformers;
image features and logits against transformers."""

from __future__ import annotations

import pytest
import torch

from kvforge.config import ModelConfig
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.loader.model_loader import load_model
from tests.models.test_moe import kv_caches
from tests.models.tiny_checkpoints import VOCAB, write_tokenizer

IMAGE_TOKEN = VOCAB - 1


def write_tiny_llava(folder, strategy: str = "default", layer: int = -2, seed: int = 0):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )
    model = LlavaForConditionalGeneration(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


@pytest.mark.parametrize(("strategy", "layer"), [("default", -2), ("full", -1)])
def test_logits_match_transformers(tmp_path, strategy, layer):
    reference = write_tiny_llava(tmp_path / "llava", strategy, layer)
    loaded = load_model(
        ModelConfig(model=str(tmp_path / "llava")), create_attention_backend(), False
    )
    vision = loaded.vision
    assert vision is not None
    count = vision.config.tokens_per_image
    assert count == 16 + (strategy == "full")
    pixels = torch.randn(2, 3, 32, 32)
    # text, image 1, text, image 2, text
    ids = [1, 7, 8] + [IMAGE_TOKEN] * count + [9, 10, 11] + [IMAGE_TOKEN] * count + [12, 13]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    features = vision.encode(pixels).reshape(-1, loaded.config.hidden_size)
    rows = torch.tensor([i for i, t in enumerate(ids) if t == IMAGE_TOKEN])
    kv = kv_caches(loaded.config, 32)
    blocks = list(range(30))
    cut = 3 + count + 2  # two chunks; the cut falls between the images
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = ForwardBatch.build([ids[:cut]], [0], [blocks], 4, cpu)
        first.mm_embeds = (rows[rows < cut], features[: int((rows < cut).sum())])
        second = ForwardBatch.build([ids[cut:]], [cut], [blocks], 4, cpu)
        second.mm_embeds = (rows[rows >= cut] - cut, features[int((rows < cut).sum()) :])
        hidden = torch.cat([loaded.model(first, kv), loaded.model(second, kv)])
        logits = loaded.model.compute_logits(hidden)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)

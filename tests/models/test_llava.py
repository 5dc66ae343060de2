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
from tests.models.tiny_checkpoints import VOCAB, _common, write_tokenizer

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
    text = LlamaConfig(**_common())
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


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    reference = write_tiny_llava(folder)
    return folder, reference


def _image(colour, seed=0):
    from PIL import Image

    rng = torch.Generator().manual_seed(seed)
    noise = (torch.rand(32, 32, 3, generator=rng) * 60).to(torch.uint8)
    base = torch.tensor(colour, dtype=torch.uint8).expand(32, 32, 3) - noise
    return Image.fromarray(base.numpy())


def test_engine_greedy_tokens_match_transformers(llava):
    from kvforge import LLM, SamplingParams
    from kvforge.clip.image import Preprocess

    folder, reference = llava
    llm = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False, dtype="float32")
    images = [_image((200, 60, 60)), _image((60, 60, 200), 1)]
    prompt = [1, 7, 8, IMAGE_TOKEN, 9, 10, IMAGE_TOKEN, 12]  # one placeholder per image
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.generate(
        [{"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}], greedy
    )
    preprocess = Preprocess(32)
    pixels = torch.stack([preprocess(i) for i in images])
    expanded = [1, 7, 8] + [IMAGE_TOKEN] * 16 + [9, 10] + [IMAGE_TOKEN] * 16 + [12]
    with torch.no_grad():
        expected = reference.generate(
            input_ids=torch.tensor([expanded]),
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            min_new_tokens=6,
        )[0, len(expanded) :].tolist()
    assert out[0].outputs[0].token_ids == expected
    # chunked prefill in 5-token chunks: images are never split, the tokens are the same
    chunked = LLM(
        str(folder),
        kv_cache_memory="16MiB",
        show_progress=False,
        dtype="float32",
        long_prefill_token_threshold=5,
        enable_prefix_caching=False,
    )
    again = chunked.generate(
        [{"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}], greedy
    )
    assert again[0].outputs[0].token_ids == expected


def test_images_key_the_prefix_cache(llava):
    """The same image again finds its KV cached; a different image at the same place does
    not reuse the first image's blocks."""
    from kvforge import LLM, SamplingParams

    folder, _ = llava
    llm = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False, block_size=4)
    prompt = [1, 7, 8, IMAGE_TOKEN] + [9] * 10
    greedy = SamplingParams(max_tokens=2, temperature=0)

    def run(image):
        request = {"prompt_token_ids": prompt, "multi_modal_data": {"image": image}}
        return llm.generate([request], greedy, use_tqdm=False)[0]

    red, blue = _image((200, 60, 60)), _image((60, 60, 200), 1)
    first = run(red)
    again = run(red)
    other = run(blue)
    assert again.num_cached_tokens >= 16 + 3  # the text and the image
    assert other.num_cached_tokens <= 3  # only the text before the image
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_bad_image_requests(llava):
    from kvforge import LLM, SamplingParams
    from kvforge.errors import InvalidRequestError

    folder, _ = llava
    llm = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError, match="2 image placeholders for 1 images"):
        llm.generate(
            [
                {
                    "prompt_token_ids": [1, IMAGE_TOKEN, 5, IMAGE_TOKEN],
                    "multi_modal_data": {"image": _image((1, 2, 3))},
                }
            ],
            params,
        )
    with pytest.raises(InvalidRequestError, match="not an image"):
        llm.generate(
            [{"prompt_token_ids": [1, IMAGE_TOKEN], "multi_modal_data": {"image": b"junk"}}], params
        )
    with pytest.raises(InvalidRequestError, match="one placeholder token or 16"):
        llm.generate(
            [
                {
                    "prompt_token_ids": [1, IMAGE_TOKEN, IMAGE_TOKEN],
                    "multi_modal_data": {"image": _image((1, 2, 3))},
                }
            ],
            params,
        )
    # the engine goes on
    assert llm.generate([[1, 5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids


def _data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_chat_image_parts_in_process_and_over_http(llava, tmp_path):
    """image_url parts (data URLs) in LLM.chat and /v1/chat/completions give the tokens of the
    prompt built by hand; remote URLs and images for a text-only model are refused."""
    import httpx

    from kvforge import LLM, SamplingParams
    from tests.server.conftest import start_server, stop_server

    folder, _ = llava
    llm = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False)
    red = _image((200, 60, 60))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "w7 w8"},
                {"type": "image_url", "image_url": {"url": _data_url(red)}},
                {"type": "text", "text": "w9"},
            ],
        }
    ]
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    via_chat = llm.chat(messages, greedy, use_tqdm=False)[0]
    by_hand = llm.generate(
        [{"prompt_token_ids": via_chat.prompt_token_ids, "multi_modal_data": {"image": red}}],
        greedy,
        use_tqdm=False,
    )[0]
    assert via_chat.outputs[0].token_ids == by_hand.outputs[0].token_ids
    assert via_chat.prompt_token_ids.count(IMAGE_TOKEN) == 16
    handle = start_server(tmp_path, "-m", str(folder))
    try:
        body = {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{handle.url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == via_chat.outputs[0].text
        remote = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
            }
        ]
        bad = httpx.post(f"{handle.url}/v1/chat/completions", json={**body, "messages": remote})
        assert bad.status_code == 400 and "not fetched" in bad.json()["error"]["message"]
        junk = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}
                ],
            }
        ]
        bad = httpx.post(f"{handle.url}/v1/chat/completions", json={**body, "messages": junk})
        assert bad.status_code == 400 and "not an image" in bad.json()["error"]["message"]
        again = httpx.post(f"{handle.url}/v1/chat/completions", json=body, timeout=60)
        assert again.json()["choices"][0]["message"]["content"] == via_chat.outputs[0].text
    finally:
        stop_server(handle)


def test_mmproj_round_trip(llava, tmp_path):
    """An adapter written as llama.cpp's mmproj GGUF reads back with the same image
    embeddings (the file keeps the tower's layers up to the one the projector reads)."""
    from kvforge.config import ModelConfig
    from kvforge.errors import ModelFileError
    from kvforge.loader.mmproj import read_mmproj, write_mmproj

    folder, _ = llava
    loaded = load_model(ModelConfig(model=str(folder)), create_attention_backend(), False)
    adapter = loaded.vision
    path = tmp_path / "mmproj.gguf"
    write_mmproj(adapter, path, IMAGE_TOKEN)
    back = read_mmproj(path, loaded.config.hidden_size, image_token_id=0)
    assert back.config.image_token_id == IMAGE_TOKEN
    assert len(back.vision_tower.encoder.layers) == 2  # layer -2 of 3
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back.encode(pixels), adapter.encode(pixels), atol=1e-6, rtol=0)
    with pytest.raises(ModelFileError, match="hidden"):  # a projector for another model
        read_mmproj(path, 32, 0)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFileError):
        read_mmproj(path, loaded.config.hidden_size, 0)


def _text_only(folder, out):
    """The language model of a LLaVA directory as a plain Llama checkpoint."""
    import json

    from safetensors.torch import load_file, save_file

    out.mkdir()
    hf = json.loads((folder / "config.json").read_text())
    text_config = {**hf["text_config"], "architectures": ["LlamaForCausalLM"]}
    (out / "config.json").write_text(json.dumps(text_config))
    weights = load_file(str(folder / "model.safetensors"))
    prefix = "language_model."
    text = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    save_file(text, str(out / "model.safetensors"))
    write_tokenizer(out)
    return out


def test_mmproj_with_the_language_model(llava, tmp_path):
    """--mmproj next to a text model: the same tokens as the HF LLaVA directory."""
    from kvforge import LLM, SamplingParams
    from kvforge.loader.mmproj import write_mmproj

    folder, _ = llava
    full = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False)
    path = tmp_path / "mmproj.gguf"
    write_mmproj(full.engine.runner.loaded.vision, path, IMAGE_TOKEN)
    text_only = _text_only(folder, tmp_path / "text")
    paired = LLM(str(text_only), mmproj=str(path), kv_cache_memory="16MiB", show_progress=False)
    assert paired.engine.image_token_id == IMAGE_TOKEN
    request = {
        "prompt_token_ids": [1, 7, IMAGE_TOKEN, 9],
        "multi_modal_data": {"image": _image((9, 200, 9))},
    }
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert (
        paired.generate([request], greedy, use_tqdm=False)[0].outputs[0].token_ids
        == full.generate([request], greedy, use_tqdm=False)[0].outputs[0].token_ids
    )


def test_projector_training_learns_and_writes_a_loadable_mmproj(llava, tmp_path):
    """A few steps of projector training on a tiny text model and a tiny CLIP: the loss
    falls, and the mmproj it writes serves images next to the text model."""
    import json

    from kvforge import LLM, SamplingParams
    from kvforge.tools.vision_train import ProjectorOptions, train_projector
    from tests.clip_util import write_tiny_clip

    folder, _ = llava
    text_only = _text_only(folder, tmp_path / "text")
    clip_dir = write_tiny_clip(tmp_path / "clip")
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, (colour, word) in enumerate([((220, 30, 30), "w20"), ((30, 30, 220), "w21")] * 3):
        _image(colour, i).save(data / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "w7 w8", "answer": f"w9 {word}"})
    (data / "conversations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "mmproj.gguf"
    options = ProjectorOptions(steps=1, batch_size=6, image_token_id=IMAGE_TOKEN, lr=1e-2)
    first = train_projector(str(text_only), clip_dir, data, out, options, progress=False)
    options.steps = 40
    later = train_projector(str(text_only), clip_dir, data, out, options, progress=False)
    assert later["loss"] < first["loss"]
    from kvforge.entrypoints.cli import main

    command = ["clip", "train-projector", "--clip", str(clip_dir), "--data", str(data)]
    command += ["--out", str(out), "-m", str(text_only), "--steps", "2", "--batch-size", "2"]
    assert main([*command, "--image-token-id", str(IMAGE_TOKEN)]) == 0
    assert main([*command[:4], "--data", str(tmp_path / "none"), *command[6:]]) == 2
    llm = LLM(str(text_only), mmproj=str(out), kv_cache_memory="16MiB", show_progress=False)
    request = {
        "prompt_token_ids": [1, IMAGE_TOKEN, 7, 8],
        "multi_modal_data": {"image": _image((220, 30, 30))},
    }
    assert (
        llm.generate([request], SamplingParams(max_tokens=2), use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )


def test_mmproj_in_the_legacy_converter_layout(llava, tmp_path):
    """A file laid out as llama.cpp's legacy LLaVA converter writes it (fc1 named ffn_down and
    fc2 ffn_up, 2-D and 4-D weights in float16, CLIP's projection_dim, feature_layer as a
    non-negative hidden-state index, no post-norm, no placeholder key) reads back with the
    HF model's image embeddings."""
    import numpy as np
    from gguf import GGUFWriter

    from kvforge.config import ModelConfig
    from kvforge.loader.mmproj import read_mmproj

    folder, reference = llava
    loaded = load_model(ModelConfig(model=str(folder)), create_attention_backend(), False)
    tower = reference.model.vision_tower.state_dict()
    state = {k.removeprefix("vision_model."): v for k, v in tower.items()}
    projector = reference.model.multi_modal_projector.state_dict()
    path = tmp_path / "mmproj-model-f16.gguf"
    writer = GGUFWriter(str(path), arch="clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", 32)
    writer.add_uint32("clip.vision.patch_size", 8)
    writer.add_uint32("clip.vision.embedding_length", 32)
    writer.add_uint32("clip.vision.feed_forward_length", 64)
    writer.add_uint32("clip.vision.projection_dim", 16)
    writer.add_uint32("clip.vision.attention.head_count", 4)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_uint32("clip.vision.block_count", 2)  # feature layer -2 of 3 = hidden state 2
    writer.add_array("clip.vision.feature_layer", [2])
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    writer.add_bool("clip.use_gelu", False)  # quick_gelu
    renames = {
        "embeddings.class_embedding": "v.class_embd",
        "embeddings.patch_embedding.weight": "v.patch_embd.weight",
        "embeddings.position_embedding.weight": "v.position_embd.weight",
        "pre_layrnorm.weight": "v.pre_ln.weight",
        "pre_layrnorm.bias": "v.pre_ln.bias",
    }
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
    }
    block |= {"self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2"}
    block |= {"mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}  # the legacy swap
    for name, value in state.items():
        if name.startswith("post_layernorm") or name.endswith("position_ids"):
            continue
        if name.startswith("encoder.layers."):
            index, rest = name.removeprefix("encoder.layers.").split(".", 1)
            if int(index) >= 2:
                continue
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"v.blk.{index}.{block[module]}.{kind}"
        else:
            gguf_name = renames[name]
        data = value.squeeze().numpy()
        writer.add_tensor(gguf_name, data.astype(np.float16 if data.ndim in (2, 4) else np.float32))
    for name, value in projector.items():
        gguf_name = name.replace("linear_1", "mm.0").replace("linear_2", "mm.2")
        data = value.numpy()
        writer.add_tensor(gguf_name, data.astype(np.float16 if data.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    adapter = read_mmproj(path, loaded.config.hidden_size, IMAGE_TOKEN)
    pixels = torch.randn(2, 3, 32, 32)
    expected = loaded.vision.encode(pixels)
    torch.testing.assert_close(adapter.encode(pixels), expected, atol=2e-2, rtol=2e-2)


def test_hostile_image_requests(llava, tmp_path):
    """Too many images for the context, beam search with images, n > 1 samples sharing the
    image, bad images in a chat and a text-only model given an image: typed errors or the
    right answer, and the engine goes on with no blocks held."""
    import base64
    import io
    import struct
    import zlib

    from PIL import Image

    from kvforge import LLM, SamplingParams
    from kvforge.errors import ContextLengthError, InvalidRequestError

    folder, _ = llava
    llm = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False, max_model_len=128)
    red = _image((200, 60, 60))
    many = {
        "prompt_token_ids": [1] + [IMAGE_TOKEN, 5] * 9,
        "multi_modal_data": {"image": [red] * 9},
    }
    with pytest.raises(ContextLengthError):
        llm.generate([many], SamplingParams(max_tokens=2), use_tqdm=False)
    one = {"prompt_token_ids": [1, IMAGE_TOKEN, 5], "multi_modal_data": {"image": red}}
    with pytest.raises(InvalidRequestError, match="beam search"):
        llm.generate([one], SamplingParams(max_tokens=2, n=2, use_beam_search=True), use_tqdm=False)
    samples = llm.generate([one], SamplingParams(max_tokens=3, n=3, temperature=0), use_tqdm=False)
    assert len({tuple(c.token_ids) for c in samples[0].outputs}) == 1  # greedy samples agree

    def png_url(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    huge = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG", compress_level=0)
    truncated = buffer.getvalue()[:200]
    for data, message in ((huge, "more than"), (truncated, "truncated"), (b"x", "not an image")):
        part = {"type": "image_url", "image_url": {"url": png_url(data)}}
        with pytest.raises(InvalidRequestError, match=message):
            llm.chat(
                [{"role": "user", "content": [part]}], SamplingParams(max_tokens=2), use_tqdm=False
            )
    scheduler = llm.engine.scheduler
    assert not scheduler.running and not scheduler.waiting
    assert llm.engine.kv_cache_manager.pool.num_in_use == 0
    text_only = LLM(kv_cache_memory="64MiB", show_progress=False)
    part = {"type": "image_url", "image_url": {"url": png_url(buffer.getvalue())}}
    with pytest.raises(InvalidRequestError, match="does not take images"):
        text_only.chat(
            [{"role": "user", "content": [part]}], SamplingParams(max_tokens=2), use_tqdm=False
        )


def test_a_draft_model_next_to_images(llava, tmp_path):
    """Speculative decoding with a narrower draft model: image placeholders reach the draft as
    plain tokens (it has no vision tower), and the greedy tokens are the plain engine's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvforge import LLM, SamplingParams

    folder, _ = llava
    draft = tmp_path / "draft"
    config = LlamaConfig(**_common(hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    LlamaForCausalLM(config).save_pretrained(draft)
    write_tokenizer(draft)
    request = {
        "prompt_token_ids": [1, 7, IMAGE_TOKEN, 9],
        "multi_modal_data": {"image": _image((9, 9, 200))},
    }
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False)
    drafted = LLM(
        str(folder),
        kv_cache_memory="16MiB",
        show_progress=False,
        speculative_model=str(draft),
        num_speculative_tokens=2,
    )
    expected = plain.generate([request], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert drafted.generate([request], greedy, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_images_under_tight_kv_memory(llava):
    """Six image requests at once in a cache too small for them all (preemption resends the
    images with the request): each gets the tokens it gets alone, and no block stays held."""
    from kvforge import LLM, SamplingParams

    folder, _ = llava
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    requests = [
        {
            "prompt_token_ids": [1, 7 + i, IMAGE_TOKEN, 9, IMAGE_TOKEN],
            "multi_modal_data": {"image": [_image((40 * i, 90, 200 - 30 * i), i)] * 2},
        }
        for i in range(6)
    ]
    solo = LLM(str(folder), kv_cache_memory="16MiB", show_progress=False)
    expected = [
        solo.generate([r], greedy, use_tqdm=False)[0].outputs[0].token_ids for r in requests
    ]
    tight = LLM(str(folder), num_blocks=14, block_size=4, show_progress=False)
    outputs = tight.generate(requests, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert tight.engine.kv_cache_manager.pool.num_in_use == 0

"""OpenCLIP checkpoints load: a tiny ``open_clip.model.CLIP`` (ViT tower) saved as OpenCLIP
writes it gives the same image and text embeddings through kvforge."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest
import torch


def _open_clip_model():  # type: ignore[no-untyped-def]
    """open_clip's model module without the package's torchvision-based transforms (its
    ``utils`` imports one torchvision class that the ViT CLIP never uses)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    import transformers  # noqa: F401 - imported before the stand-in below exists

    stubs = {}
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a wheel that does not load here
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d  # type: ignore[attr-defined]
        stubs = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops")}
        stubs["torchvision.ops.misc"] = misc
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("open_clip", package)
    sys.modules.update(stubs)
    try:
        return importlib.import_module("open_clip.model")
    finally:  # later imports must not find the stand-in
        for name in stubs:
            sys.modules.pop(name, None)


def test_open_clip_checkpoint_matches_open_clip(tmp_path):
    from safetensors.torch import save_file

    from kvforge.clip import load
    from tests.clip_util import write_tokenizer

    model_module = _open_clip_model()
    torch.manual_seed(0)
    vision = {"layers": 2, "width": 48, "head_width": 12, "patch_size": 8, "image_size": 32}
    text = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2}
    reference = model_module.CLIP(
        embed_dim=16,
        vision_cfg=model_module.CLIPVisionCfg(**vision),
        text_cfg=model_module.CLIPTextCfg(**text),
    ).eval()
    with torch.no_grad():  # non-trivial norms and embeddings
        for name, param in reference.named_parameters():
            if "ln" in name or "embedding" in name:
                param.add_(torch.randn_like(param) * 0.1)
    folder = tmp_path / "open-clip"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    write_tokenizer(folder, ["a", "red", "square"])
    clip, _ = load(folder)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.zeros(2, 16, dtype=torch.long)  # OpenCLIP pads to its context length
    ids[0, :5] = torch.tensor([1, 9, 30, 40, 63])  # 63, the highest id: the end token
    ids[1, :3] = torch.tensor([1, 50, 63])
    with torch.no_grad():
        expected_images = reference.encode_image(pixels)
        expected_texts = reference.encode_text(ids)
        got_images = clip.model.encode_image(pixels)
        got_texts = clip.model.encode_text(ids)
    torch.testing.assert_close(got_images, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_texts, expected_texts, atol=1e-5, rtol=0)
    assert abs(clip.model.logit_scale.item() - reference.logit_scale.item()) < 1e-6

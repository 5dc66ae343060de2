"""Checkpoints stored quantized by other tools (config.json quantization_config) are refused in
one line naming the method, not with a list of unknown tensors."""

from __future__ import annotations

import json

import pytest

from kvforge.config import ModelConfig
from kvforge.errors import ModelFileError, UnsupportedModelError
from kvforge.layers.attention import create_attention_backend
from kvforge.loader.model_loader import load_model
from tests.models.tiny_checkpoints import write_checkpoint


def test_quantization_configs_are_refused_by_name(tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint("llama", folder)
    config = json.loads((folder / "config.json").read_text())
    for method in ("gptq", "awq", "compressed-tensors"):
        config["quantization_config"] = {"quant_method": method, "bits": 4}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedModelError, match=f"'{method}'") as info:
            load_model(ModelConfig(model=str(folder)), create_attention_backend(), False)
        assert "\n" not in str(info.value)
    config["quantization_config"] = "gptq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="must be an object"):
        load_model(ModelConfig(model=str(folder)), create_attention_backend(), False)

"""Where the pipeline's components come from: a local model folder round trip, both LoRA key
formats, pickles refused, and the full preset's real shapes (built on the meta device)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ltx2_pipeline.errors import GenerationInputError
from ltx2_pipeline.loras import key_format, load_lora, to_diffusers_format, to_original_format
from ltx2_pipeline.presets import (
    DISTILLED_FILE,
    full_preset,
    full_preset_bytes,
    load_components,
    save_components,
    tiny_preset,
    vae_compression,
)
from ltx2_pipeline.two_stage import LTX2TwoStagePipeline
from ltx2_residency import LoRAFormatError, LoRAKeyError
from ltx2_residency.testing import linear_names, save_lora, weight_bits
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures
from untouched import assert_same_bits

KW = dict(prompt="a red cat at night", height=64, width=64, num_frames=9, num_inference_steps=2,
          max_sequence_length=32)


@pytest.fixture(scope="module")
def tiny_lora() -> dict[str, torch.Tensor]:
    return tiny_preset(seed=0)[1]


@pytest.fixture(scope="module")
def expected(tiny_lora) -> np.ndarray:
    return LTX2TwoStagePipeline.from_preset("tiny", merge_policy="merge")(**KW).video


def test_a_saved_model_folder_loads_back_and_gives_the_same_video(tmp_path: Path, tiny_lora, expected) -> None:
    components, lora = tiny_preset(seed=0)
    root = save_components(components, tmp_path / "ltx2")
    save_lora(root / DISTILLED_FILE, lora)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert (root / "latent_upsampler" / "config.json").is_file()
    assert not list(root.rglob("*.bin")), "weights are written as safetensors only"

    loaded = load_components(root)
    for name in ("transformer", "vae", "audio_vae", "vocoder", "connectors", "latent_upsampler", "text_encoder"):
        assert_same_bits(weight_bits(dict(components[name].state_dict())), weight_bits(dict(loaded[name].state_dict())))
    pipe = LTX2TwoStagePipeline.from_pretrained(root, merge_policy="merge")  # the folder's distilled LoRA
    assert np.array_equal(pipe(**KW).video, expected)


def test_a_model_folder_missing_pieces_is_refused_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(GenerationInputError, match="no model_index.json"):
        load_components(tmp_path)
    components, _ = tiny_preset(seed=0)
    root = save_components(components, tmp_path / "ltx2")
    for child in (root / "latent_upsampler").iterdir():
        child.unlink()
    (root / "latent_upsampler").rmdir()
    with pytest.raises(GenerationInputError, match="latent_upsampler/ subfolder"):
        load_components(root)
    save_components(components, root)
    with pytest.raises(GenerationInputError, match="no distilled LoRA: pass --distilled-lora"):
        LTX2TwoStagePipeline.from_pretrained(root)


def test_both_lora_key_formats_load_and_give_the_same_video(tmp_path: Path, tiny_lora, expected) -> None:
    diffusers_path = save_lora(tmp_path / "distilled_diffusers.safetensors", tiny_lora)
    original = to_original_format(tiny_lora)
    assert key_format(original) == "original" and key_format(tiny_lora) == "diffusers"
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in original)
    original_path = save_lora(tmp_path / "distilled_original.safetensors", original)
    videos = [LTX2TwoStagePipeline.from_preset("tiny", distilled_lora=Path(p), merge_policy="merge")(**KW).video
              for p in (diffusers_path, original_path)]
    assert np.array_equal(videos[0], expected) and np.array_equal(videos[1], expected)


def test_original_format_goes_through_diffusers_converter(tiny_lora) -> None:
    original = to_original_format(tiny_lora)
    converted = to_diffusers_format(original, "LoRA 'x'")
    assert converted.keys() == tiny_lora.keys()
    assert all(torch.equal(converted[k], tiny_lora[k]) for k in tiny_lora)


def test_a_lora_adapting_the_text_connectors_is_refused(tiny_lora) -> None:
    with_connectors = {**to_original_format(tiny_lora),
                       "text_embedding_projection.aggregate_embed.lora_A.weight": torch.zeros(4, 8),
                       "text_embedding_projection.aggregate_embed.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(LoRAKeyError, match="adapt the text connectors.*DiT only"):
        to_diffusers_format(with_connectors, "LoRA 'distilled'")


def test_a_pickled_lora_is_refused_unread(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "distilled.safetensors"  # the suffix lies; the content decides
    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(LoRAFormatError, match="pickle"):
        load_lora(path, "distilled", {"stage2": 1.0})
    assert not (tmp_path / "pwned").exists()


def test_full_preset_has_the_real_ltx2_shapes() -> None:
    components, lora = full_preset(device="meta")
    dit = components["transformer"]
    params = sum(p.numel() for p in dit.parameters())
    assert 18.8e9 < params < 19.0e9
    linears = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
    assert len(linears) == 1344
    assert dit.config.in_channels == components["vae"].config.latent_channels == 128
    assert components["vae"].spatial_compression_ratio == 32 and components["vae"].temporal_compression_ratio == 8
    assert components["latent_upsampler"].config.in_channels == 128
    text = components["text_encoder"].config.text_config
    assert text.hidden_size == dit.config.caption_channels == components["connectors"].config.caption_channels
    assert components["connectors"].config.text_proj_in_factor == text.num_hidden_layers + 1
    assert dit.dtype == torch.bfloat16 and lora == {}


def test_the_full_presets_memory_comes_from_the_real_configs() -> None:
    components, _ = full_preset(device="meta")
    held = full_preset_bytes()
    dit = components["transformer"]
    assert held["transformer"] == 2 * sum(t.numel() for t in (*dit.parameters(), *dit.buffers()))
    assert 18.8e9 * 2 < held["transformer"] < 19.0e9 * 2 + 2**30
    assert held.keys() == {k for k, v in components.items() if isinstance(v, torch.nn.Module)} | {"distilled_lora"}
    linears = [dit.get_submodule(n) for n in linear_names(dit)]
    assert held["distilled_lora"] == 2 * 384 * sum(m.in_features + m.out_features for m in linears)
    assert full_preset_bytes(torch.float32)["transformer"] == 2 * held["transformer"]
    deeper = full_preset_bytes(text_layers=4)
    assert deeper["text_encoder"] > held["text_encoder"] and deeper["transformer"] == held["transformer"]


def test_the_vae_compression_is_known_before_anything_loads(tmp_path: Path) -> None:
    assert vae_compression("tiny") == (8, 4) and vae_compression("full") == (32, 8)
    components, _ = tiny_preset(seed=0)
    root = save_components(components, tmp_path / "ltx2")
    for weights in root.rglob("*.safetensors"):
        weights.unlink()  # the config is all it reads
    assert vae_compression(model_path=root) == (8, 4)
    with pytest.raises(GenerationInputError, match="no model_index.json"):
        vae_compression(model_path=tmp_path)
    with pytest.raises(GenerationInputError, match="unknown preset 'huge'"):
        vae_compression("huge")


def test_lora_errors_name_the_file(tmp_path: Path, tiny_lora) -> None:
    wrong = {k.replace("transformer_blocks.0.", "transformer_blocks.99."): v for k, v in tiny_lora.items()}
    path = save_lora(tmp_path / "style@v2.safetensors", wrong)  # keys for a block the DiT does not have
    spec = load_lora(path, "user", {"stage2": 1.0})
    with pytest.raises(LoRAKeyError, match=re.escape(f"LoRA 'user' ({path})")):
        LTX2TwoStagePipeline.from_preset("tiny", loras=[spec])
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(LoRAFormatError, match=re.escape(str(missing))):
        load_lora(missing, "user", {"stage2": 1.0})

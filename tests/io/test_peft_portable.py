"""The portable export (alora_ds.io.peft_portable) under the rule of every engine that serves
LoRA adapters: peft itself, vLLM and llama.cpp, each applied to the files as that engine reads
them. The native export (peft_write) is checked under the same rules, to show where it holds.

The engines' rules, from their source:

- vLLM, vllm/lora/peft_helper.py (vllm-project/vllm at e745baf): `PEFTHelper.from_dict` keeps
  only the fields the dataclass declares (lines 86-91), and rank_pattern / alpha_pattern are
  not among them; `__post_init__` sets one `vllm_lora_scaling_factor = self.lora_alpha /
  self.r` (line 61); `validate_legal` checks only the global `self.r > lora_config.max_lora_rank`
  (line 128). vllm/lora/lora_weights.py (at 4c78406) `LoRALayerWeights.from_config` (lines
  57-71) gives every module that one scaling; its lora_a / lora_b keep their own shapes.
- llama.cpp, as vendored by llama-cpp-python 0.3.36: convert_lora_to_gguf.py reads
  `alpha: float = lparams["lora_alpha"]` (line 528) and writes it as the float32 KV
  `adapter.lora.alpha` (line 428), nothing else of the config; src/llama-adapter.cpp line 221
  reads it back; src/llama-adapter.h lines 53-57, `get_scale`: `rank = (float) b->ne[0]` (the
  rank dimension of that module's own lora_b) and `scale = alpha ? adapter_scale * alpha / rank
  : adapter_scale`, in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from alora_ds.errors import InputError
from alora_ds.io.models import build_random_llama
from alora_ds.io.peft_portable import convert_adapter, make_portable, write_portable_adapter
from alora_ds.io.peft_write import METADATA_NAME, adapter_tensors_from_model, write_peft_adapter
from tests.helpers import DOWN1, K0, Q0, V1, build_gated

SCALE = 10.0 / 4  # build_gated: lora_alpha 10, r_init 4 (DOWN1's is 0.7 unless made uniform)


def lora_tensors(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (lora_A, lora_B) as every engine finds them in the safetensors file."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    names = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in weights}
    return {
        name: (
            weights[f"base_model.model.{name}.lora_A.weight"],
            weights[f"base_model.model.{name}.lora_B.weight"],
        )
        for name in names
    }


def vllm_scales(adapter_dir: Path) -> tuple[dict[str, float], int]:
    """vLLM's rule: every module gets the one `lora_alpha / r` of the config's global fields
    (the patterns are dropped by PEFTHelper.from_dict); also the global r, which is all that
    validate_legal checks against --max-lora-rank."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    return {name: scaling for name in lora_tensors(adapter_dir)}, config["r"]


def llama_cpp_scales(adapter_dir: Path) -> dict[str, float]:
    """llama.cpp's rule: float32 alpha from the config, divided by the rank of each module's own
    lora_B (PEFT's (d_out, r) is ggml's ne = [r, d_out], so b->ne[0] is r)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = np.float32(config["lora_alpha"])
    return {
        name: float(np.float32(1.0) * alpha / np.float32(b.shape[1]))
        for name, (_, b) in lora_tensors(adapter_dir).items()
    }


def exports(tmp_path: Path, *, uniform_scale: bool):
    """The gated tiny model (ranks 2, 3, 4, 7 and a module at 0; gates 0 / 0.5 / 0.3) and its
    native and portable exports. uniform_scale: every module at s = 2.5, as in our runs."""
    config, model, modules = build_gated()
    if uniform_scale:
        modules[DOWN1].scale = SCALE
    tensors = adapter_tensors_from_model(model)
    native = write_peft_adapter(tensors, tmp_path / "adapter", base_model_name_or_path=None)
    portable = write_portable_adapter(
        tensors, tmp_path / "adapter_portable", base_model_name_or_path=None, metadata={"x": 1}
    )
    trained = {name: module.scale for name, module in modules.items() if module.r > 0}
    return config, model, modules, native, portable, trained


@pytest.mark.parametrize("uniform_scale", [True, False])
def test_peft_reproduces_the_model_from_the_portable_adapter_without_patterns(
    tmp_path, uniform_scale
):
    config, model, modules, _, portable, trained = exports(tmp_path, uniform_scale=uniform_scale)
    adapter_config = json.loads((portable / "adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] == {} and adapter_config["alpha_pattern"] == {}
    for key in ("rank_pattern", "alpha_pattern"):  # nothing may depend on them
        del adapter_config[key]
    (portable / "adapter_config.json").write_text(json.dumps(adapter_config))

    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reference = PeftModel.from_pretrained(build_random_llama(config, seed=0), portable)
        got = reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Every module at the largest rank (K0's 7) and the common scale; the zero-rank one absent.
    assert adapter_config["r"] == 7
    assert set(trained) == {n for n, m in modules.items() if m.r > 0} and V1 not in trained
    layers = {
        name.removeprefix("base_model.model."): layer
        for name, layer in reference.named_modules()
        if hasattr(layer, "scaling") and "default" in getattr(layer, "r", {})
    }
    assert set(layers) == set(trained)
    for layer in layers.values():
        assert layer.r["default"] == 7
        assert math.isclose(layer.scaling["default"], SCALE, rel_tol=1e-15)

    meta = json.loads((portable / METADATA_NAME).read_text())
    assert meta["x"] == 1
    assert meta["portable"]["ranks"] == {n: m.r for n, m in modules.items() if m.r > 0}
    assert meta["portable"]["folded_scale"] == ({} if uniform_scale else {DOWN1: 0.7 / SCALE})


@pytest.mark.parametrize("uniform_scale", [True, False])
def test_vllm_rule(tmp_path, uniform_scale):
    _, _, modules, native, portable, trained = exports(tmp_path, uniform_scale=uniform_scale)
    largest = max(m.r for m in modules.values())  # 7

    scales, r = vllm_scales(portable)
    assert scales.keys() == trained.keys()
    for name, scale in scales.items():
        assert math.isclose(scale, SCALE, rel_tol=1e-15), name
        # Folded modules carry the rest of their scale in B: what is applied is s_m B A.
    b_native = lora_tensors(native)[DOWN1][1]
    b_portable = lora_tensors(portable)[DOWN1][1]
    torch.testing.assert_close(
        b_portable[:, :3] * SCALE, b_native * trained[DOWN1], rtol=1e-6, atol=1e-7
    )
    assert r == largest  # --max-lora-rank >= r, checked by vLLM, covers every module

    scales, r = vllm_scales(native)
    wrong = {n for n, s in scales.items() if not math.isclose(s, trained[n], rel_tol=1e-15)}
    # The native export holds under vLLM when every module shares one scale (our runs) ...
    assert wrong == (set() if uniform_scale else {DOWN1})
    # ... but its global r is the most common rank, below K0's 7: vLLM's check passes with a
    # --max-lora-rank that cannot hold K0, so the README asks for the largest module's rank.
    assert r == 4 < largest == lora_tensors(native)[K0][0].shape[0]


@pytest.mark.parametrize("uniform_scale", [True, False])
def test_llama_cpp_rule(tmp_path, uniform_scale):
    _, _, modules, native, portable, trained = exports(tmp_path, uniform_scale=uniform_scale)

    scales = llama_cpp_scales(portable)
    assert scales.keys() == trained.keys()
    for name, scale in scales.items():
        assert math.isclose(scale, SCALE, rel_tol=1e-7), name

    scales = llama_cpp_scales(native)
    wrong = {n for n, s in scales.items() if not math.isclose(s, trained[n], rel_tol=1e-6)}
    # Every module whose rank is not the global r (4) is applied at the wrong scale: Q0 (r 2)
    # at 10 / 2 = 5 instead of 2.5, K0 (r 7) at 10 / 7, DOWN1 (r 3) at 10 / 3.
    assert wrong == {n for n, m in modules.items() if m.r not in (0, 4)} == {Q0, K0, DOWN1}
    assert scales[Q0] == 5.0


def test_conversion_of_an_exported_adapter_equals_the_training_export(tmp_path):
    _, _, _, native, portable, _ = exports(tmp_path, uniform_scale=False)
    converted = tmp_path / "converted"
    convert_adapter(native, converted)
    name = "adapter_model.safetensors"
    assert (converted / name).read_bytes() == (portable / name).read_bytes()
    config, expected = (
        json.loads((d / "adapter_config.json").read_text()) for d in (converted, portable)
    )
    # Module order: the file's (sorted) against the model's.
    assert sorted(config.pop("target_modules")) == sorted(expected.pop("target_modules"))
    assert config == expected
    meta = json.loads((converted / METADATA_NAME).read_text())
    want = json.loads((portable / METADATA_NAME).read_text())["portable"]
    # DOWN1's scale read back is alpha / r = 2.1 / 3, 1 ulp from the trained 0.7.
    assert meta["portable"]["folded_scale"] == pytest.approx(want.pop("folded_scale"), rel=1e-15)
    assert {k: v for k, v in meta["portable"].items() if k != "folded_scale"} == want
    convert_adapter(converted, tmp_path / "again")  # a portable adapter converts to itself
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again" / file).read_bytes() == (converted / file).read_bytes()


def test_folding_that_overflows_is_refused():
    # Two modules at scale 1 make it the common one; m's ratio 4 overflows its fp16 B.
    a = {name: torch.ones(1, 4, dtype=torch.float16) for name in "mno"}
    b = {name: torch.ones(4, 1, dtype=torch.float16) for name in "mno"}
    b["m"] = torch.full((4, 1), 6e4, dtype=torch.float16)
    with pytest.raises(InputError, match=r"module m: folding its scale ratio 4 into lora_B"):
        make_portable(a, b, {"m": 4.0, "n": 1.0, "o": 1.0}, base_model_name_or_path=None)

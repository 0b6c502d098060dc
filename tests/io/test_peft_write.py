"""Exporting gated adapters in PEFT's LoRA format (alora_ds.io.peft_write), checked against peft
itself."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from alora_ds.core.inject import inject_gated_lora
from alora_ds.core.surgery import append_ranks, remove_ranks
from alora_ds.errors import InputError
from alora_ds.io import peft_write as export
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.io.peft_read import read_peft_adapter
from alora_ds.io.peft_write import (
    METADATA_NAME,
    ModuleAdapter,
    adapter_tensors_from_model,
    pattern_key,
    write_peft_adapter,
)
from tests.helpers import DOWN1, K0, UP0, V1, build_gated, randomise_adapters


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_layers(peft_model) -> dict[str, LoraLayer]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


@pytest.mark.parametrize("trained_gates", [False, True])
def test_peft_reproduces_the_gated_model(tmp_path, trained_gates):
    config, model, modules = build_gated(trained_gates=trained_gates)
    out = write_peft_adapter(
        adapter_tensors_from_model(model),
        tmp_path / "adapter",
        base_model_name_or_path="tiny-base",
        target_names_hint=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "mlp.down_proj",
        ],
        metadata={"rank_map": {n: m.r for n, m in modules.items()}, "rounds": [{"round": 1}]},
    )
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    base_logits = logits(build_random_llama(config, seed=0), ids)
    reference = PeftModel.from_pretrained(build_random_llama(config, seed=0), out)
    expected = logits(model, ids)
    assert not torch.allclose(expected, base_logits, atol=1e-3)
    torch.testing.assert_close(logits(reference, ids), expected, rtol=1e-5, atol=1e-5)

    # peft built every module with our rank and exactly our scale; the zero-rank one not at all.
    layers = peft_layers(reference)
    assert set(layers) == {name for name, module in modules.items() if module.r > 0}
    for name, layer in layers.items():
        assert layer.r["default"] == modules[name].r, name
        if name != DOWN1:
            assert layer.scaling["default"] == modules[name].scale, name
    assert abs(layers[DOWN1].scaling["default"] - 0.7) == math.ulp(0.7)

    weights = load_file(out / "adapter_model.safetensors")
    assert not any(V1 in key for key in weights)
    assert weights[f"base_model.model.{K0}.lora_A.weight"].shape == (7, 64)
    assert weights[f"base_model.model.{DOWN1}.lora_B.weight"].shape == (64, 3)
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert V1 not in config_json["target_modules"]
    assert config_json["alpha_pattern"][pattern_key(DOWN1)] == 0.7 * 3
    assert config_json["rank_pattern"][pattern_key(K0)] == 7
    assert (config_json["peft_type"], config_json["task_type"]) == ("LORA", "CAUSAL_LM")
    assert config_json["base_model_name_or_path"] == "tiny-base"
    meta = json.loads((out / METADATA_NAME).read_text())
    assert meta["rank_map"][V1] == 0 and meta["rank_map"][K0] == 7

    # Our own reader agrees on ranks and scales, bit for bit.
    adapter = read_peft_adapter(out)
    assert adapter.ranks == {n: m.r for n, m in modules.items() if m.r > 0}
    for name, scale in adapter.scales.items():
        assert scale == layers[name].scaling["default"], name


def test_gates_are_folded_into_b(tmp_path):
    _, model, modules = build_gated()
    out = write_peft_adapter(
        adapter_tensors_from_model(model), tmp_path / "a", base_model_name_or_path=None
    )
    weights = load_file(out / "adapter_model.safetensors")
    b = weights[f"base_model.model.{UP0}.lora_B.weight"]
    assert torch.equal(b[:, 1], torch.zeros(64 * 2))
    torch.testing.assert_close(b[:, 2], modules[UP0].lora_B[:, 2] * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(b[:, 0], modules[UP0].lora_B[:, 0], rtol=0, atol=0)
    assert all(t.is_contiguous() for t in weights.values())


def test_rank_patterns_never_collide_with_12_layers(tmp_path):
    # Layers 1 and 11 (and 0, 10) differ in rank and scale: a key for layer 1 that also matched
    # layer 11, or one for layer 1 that was not literal, would give peft a wrong rank.
    config = tiny_llama_config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = build_random_llama(config, seed=4)
    modules = inject_gated_lora(model, 2 * 7 * 12, lora_alpha=4.0)
    generator = torch.Generator().manual_seed(5)
    for index, (name, module) in enumerate(modules.items()):
        layer = int(name.split(".")[2])
        append_ranks(module, layer % 5, generator)
        module.scale = 0.25 * (1 + index % 7)  # exact in peft for every rank
    remove_ranks(modules["model.layers.1.self_attn.q_proj"], [0])
    randomise_adapters(modules, 6, scale=0.3)
    out = write_peft_adapter(
        adapter_tensors_from_model(model), tmp_path / "a", base_model_name_or_path=None
    )

    reference = PeftModel.from_pretrained(build_random_llama(config, seed=4), out)
    layers = peft_layers(reference)
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.11.self_attn.q_proj"].r["default"] == 3
    for name, layer in layers.items():
        assert (layer.r["default"], layer.scaling["default"]) == (
            modules[name].r,
            modules[name].scale,
        ), name
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(reference, ids), logits(model, ids), rtol=1e-5, atol=1e-5)

    # With peft's own matcher, each key selects its module and no other, nor the same name
    # nested under another prefix.
    keys = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    for name in modules:
        assert get_pattern_key(list(keys), name) == pattern_key(name)
        assert get_pattern_key([pattern_key(name)], f"vision.{name}") == f"vision.{name}"
    assert re.match(
        rf"(.*\.)?({'model.layers.1.self_attn.q_proj'})$", "model.layers.1xself_attn.q_proj"
    )
    assert not re.match(
        rf"(.*\.)?({pattern_key('model.layers.1.self_attn.q_proj')})$",
        "model.layers.1xself_attn.q_proj",
    )


def test_peft_scaling_bound():
    # peft computes alpha / r in float64. With alpha = s * r that is s itself, or the float next
    # to s when no float alpha can give s (0.7 with r = 3: 0.7 * 3 / 3 and the quotient of the
    # next float up fall on either side of 0.7).
    assert 0.7 * 3 / 3 == 0.7 - math.ulp(0.7)
    assert math.nextafter(0.7 * 3, math.inf) / 3 == 0.7 + math.ulp(0.7)
    rng = random.Random(0)
    for _ in range(20000):
        scale, r = rng.uniform(1e-3, 1e3), rng.randint(1, 4096)
        assert abs(scale * r / r - scale) <= math.ulp(scale)
    assert 2.5 * 3 / 3 == 2.5 and 0.25 * 12 / 12 == 0.25


# ---- refusals ----------------------------------------------------------------------------------


def one_module(r: int = 2, d_in: int = 8, d_out: int = 6, **changes) -> ModuleAdapter:
    module = ModuleAdapter(
        lora_A=torch.randn(r, d_in),
        lora_B=torch.randn(d_out, r),
        gate=torch.ones(r),
        scale=2.0,
        in_features=d_in,
        out_features=d_out,
    )
    return dataclasses.replace(module, **changes)


NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("module", "pattern"),
    [
        (
            one_module(lora_A=torch.randn(2, 9)),
            rf"module {NAME}: lora_A \(2, 9\), lora_B \(6, 2\), gate \(2,\), "
            r"expected \(2, 8\), \(6, 2\), \(2,\)",
        ),
        (one_module(lora_B=torch.randn(7, 2)), rf"module {NAME}: .*lora_B \(7, 2\)"),
        (one_module(lora_B=torch.randn(6, 3)), rf"module {NAME}: .*lora_B \(6, 3\)"),
        (one_module(gate=torch.ones(3)), rf"module {NAME}: .*gate \(3,\)"),
        (
            one_module(lora_A=torch.empty(0)),
            rf"module {NAME}: lora_A \(0,\).*\(a ZeRO-3 shard that was not gathered\?\)",
        ),
        (one_module(in_features=0), rf"module {NAME}: in_features 0 .* must be positive"),
        (one_module(scale=float("nan")), rf"module {NAME}: scale nan must be a positive"),
        (one_module(scale=-1.0), rf"module {NAME}: scale -1.0 must be a positive"),
        (
            one_module(lora_B=torch.full((6, 2), float("inf"))),
            rf"module {NAME}: lora_B \(gates folded in\) \(6, 2\) torch.float32 has 12 non-finite",
        ),
        (
            one_module(gate=torch.tensor([1.0, float("nan")])),
            rf"module {NAME}: gate \(2,\) torch.float32 has 1 non-finite",
        ),
        (
            one_module(lora_A=torch.ones(2, 8, dtype=torch.int64)),
            rf"module {NAME}: lora_A has dtype torch.int64, not a float type",
        ),
    ],
)
def test_refuses_bad_tensors(tmp_path, module, pattern):
    with pytest.raises(InputError, match=pattern):
        write_peft_adapter({NAME: module}, tmp_path / "a", base_model_name_or_path=None)
    assert list(tmp_path.iterdir()) == []


def test_refuses_values_that_overflow_the_output_dtype(tmp_path):
    module = one_module(lora_A=torch.full((2, 8), 1e6))
    with pytest.raises(InputError, match=rf"module {NAME}: lora_A \(2, 8\) torch.float16 has 16"):
        write_peft_adapter(
            {NAME: module}, tmp_path / "a", base_model_name_or_path=None, dtype=torch.float16
        )
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_empty_adapter(tmp_path):
    with pytest.raises(InputError, match="refusing to write an empty adapter: no module was given"):
        write_peft_adapter({}, tmp_path / "a", base_model_name_or_path=None)
    zero = {NAME: one_module(r=0), "model.layers.0.self_attn.k_proj": one_module(r=0)}
    with pytest.raises(
        InputError, match="refusing to write an empty adapter: all 2 modules have zero ranks"
    ):
        write_peft_adapter(zero, tmp_path / "a", base_model_name_or_path=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "hint", "pattern"),
    [
        (
            "module.model.layers.0.mlp.up_proj",
            ["q_proj"],
            r"'module.model.layers.0.mlp.up_proj' matches none of the target modules \['q_proj'\]",
        ),
        (f"{NAME}.base_layer", None, rf"'{NAME}.base_layer' names a part of an adapter"),
        ("model.layers.0..q_proj", None, r"'model.layers.0..q_proj' is not a dotted module name"),
    ],
)
def test_refuses_bad_module_names(tmp_path, name, hint, pattern):
    with pytest.raises(InputError, match=pattern):
        write_peft_adapter(
            {name: one_module()},
            tmp_path / "a",
            base_model_name_or_path=None,
            target_names_hint=hint,
        )
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_an_adapter(tmp_path):
    precious = tmp_path / "runs"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"runs exists, is not empty and holds no adapter_config"):
        write_peft_adapter({NAME: one_module()}, precious, base_model_name_or_path=None)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"output path .*file exists and is not a directory"):
        write_peft_adapter({NAME: one_module()}, tmp_path / "file", base_model_name_or_path=None)


# ---- atomicity ---------------------------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_failed_export_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    write_peft_adapter(
        {NAME: one_module()}, out, base_model_name_or_path=None, metadata={"round": 1}
    )
    before = snapshot(out)

    # Validation failure: nothing is even started.
    with pytest.raises(InputError, match="non-finite"):
        write_peft_adapter(
            {NAME: one_module(lora_B=torch.full((6, 2), float("nan")))},
            out,
            base_model_name_or_path=None,
        )
    assert snapshot(out) == before

    # A failure half-way through writing (disk full): the partial file never reaches `out`.
    def half_written(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        write_peft_adapter({NAME: one_module(r=3)}, out, base_model_name_or_path=None)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dir left behind


def test_a_new_export_replaces_the_old_one_completely(tmp_path):
    out = tmp_path / "adapter"
    write_peft_adapter(
        {NAME: one_module()}, out, base_model_name_or_path=None, metadata={"round": 1}
    )
    write_peft_adapter({NAME: one_module(r=3)}, out, base_model_name_or_path=None)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert read_peft_adapter(out).ranks == {NAME: 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

"""What training writes for other tools, read from a real ALoRA run (2 processes, ZeRO-3, the
golden configuration, launched once per session): the portable twin of every adapter, and
allocation/lora_config.json, the final allocation as a starting point for any peft trainer."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

RUN = "alora-2p"


def base_model(output_dir):
    return AutoModelForCausalLM.from_pretrained(output_dir / "base_model", dtype=torch.float32)


def test_every_adapter_has_a_portable_twin_that_peft_reads_the_same(golden_run):
    output_dir, result = golden_run(RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for name in ("adapter", "best_adapter"):
        native, portable = output_dir / name, output_dir / f"{name}_portable"
        ranks = json.loads((native / "alora_metadata.json").read_text())["rank_map"]
        config = json.loads((portable / "adapter_config.json").read_text())
        assert config["r"] == max(ranks.values()) > min(r for r in ranks.values() if r > 0)
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
        with torch.no_grad():
            want = PeftModel.from_pretrained(base_model(output_dir), native)(input_ids=ids).logits
            got = PeftModel.from_pretrained(base_model(output_dir), portable)(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_config_starts_a_fresh_peft_run_at_the_final_allocation(golden_run):
    output_dir, result = golden_run(RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((output_dir / "allocation" / "lora_config.json").read_text())
    metadata = json.loads((output_dir / "adapter" / "alora_metadata.json").read_text())
    final = {name: r for name, r in metadata["rank_map"].items() if r > 0}
    assert len(set(final.values())) > 1  # the rounds moved ranks: a real test of the patterns

    model = get_peft_model(base_model(output_dir), LoraConfig(**config))
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert {name: layer.r["default"] for name, layer in layers.items()} == final
    trained_scale = metadata["lora_alpha"] / metadata["r_init"]  # s = alpha / r_init, kept
    for name, layer in layers.items():
        assert abs(layer.scaling["default"] - trained_scale) <= 1e-15 * trained_scale, name
        # A fresh run: B starts at zero and the adapters train.
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert layer.lora_A["default"].weight.requires_grad

"""bench/llama_cpp_lora.py's reading of GGUF LoRA files, on files written by llama.cpp's own
converter (convert_lora_to_gguf.py, vendored by the llama-cpp-python sdist that
scripts/build_llama_cpp.sh caches): the scale llama.cpp applies to every module, from the file,
is the trained one for the portable export and wrong for every native module whose rank is not
the global r. Skipped where that cache has not been built (it is fetched from PyPI, which tests
never reach); the full run against llama.cpp itself is the benchmark (BENCHMARKS.md,
"llama.cpp applying our adapters")."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from alora_ds.io.peft_portable import write_portable_adapter
from alora_ds.io.peft_write import adapter_tensors_from_model, write_peft_adapter
from tests.helpers import DOWN1, K0, Q0, REPO, build_gated

_spec = importlib.util.spec_from_file_location(
    "bench_llama_cpp", REPO / "bench" / "llama_cpp_lora.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_llama_cpp"] = bench
_spec.loader.exec_module(bench)

pytestmark = pytest.mark.skipif(
    not (bench.vendored_llama_cpp() / "convert_lora_to_gguf.py").is_file(),
    reason="llama.cpp not cached: bash scripts/build_llama_cpp.sh",
)


def test_llama_cpp_applies_the_trained_scale_only_from_the_portable_file(tmp_path):
    config, model, modules = build_gated()
    config.architectures = ["LlamaForCausalLM"]  # how the converter finds the model class
    config.save_pretrained(tmp_path / "base")
    tensors = adapter_tensors_from_model(model)
    write_peft_adapter(tensors, tmp_path / "native", base_model_name_or_path=None)
    write_portable_adapter(tensors, tmp_path / "portable", base_model_name_or_path=None)
    trained = {name: module.scale for name, module in modules.items() if module.r > 0}

    scales = {}
    for name in ("native", "portable"):
        gguf = bench.convert_to_gguf(tmp_path / name, tmp_path / "base", tmp_path / f"{name}.gguf")
        in_file = bench.gguf_module_scales(gguf, config.num_hidden_layers)
        scales[name] = bench.applied_scales(in_file, tmp_path / name)
        assert scales[name].keys() == trained.keys()

    assert bench.wrong_scales(scales["portable"], trained) == []
    # Native: global r 4, alpha 10; Q0 (r 2), K0 (r 7) and DOWN1 (r 3, scale 0.7) are off.
    assert bench.wrong_scales(scales["native"], trained) == sorted([Q0, K0, DOWN1])
    assert scales["native"][Q0] == 5.0 and trained[Q0] == 2.5
    native_config = json.loads((tmp_path / "native" / "adapter_config.json").read_text())
    assert (native_config["r"], native_config["lora_alpha"]) == (4, 10.0)
    # DOWN1's file scale is the common 2.5; its 0.7 / 2.5 is folded into its B.
    assert math.isclose(in_file[DOWN1], 2.5, rel_tol=1e-7)

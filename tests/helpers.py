"""What several test packages share: launching the trainer the way users do, tiny models and
data, and a fake OpenAI-compatible judge. Tests import from here, never from each other."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alora_ds.core.allocation import plan_round
from alora_ds.core.inject import inject_gated_lora
from alora_ds.core.surgery import append_ranks, remove_ranks
from alora_ds.io.examples import collate, make_batches
from alora_ds.io.models import (
    TINY_LLAMA_CONFIG,
    build_random_llama,
    load_base_model,
    read_model_config,
    tiny_llama_config,
)
from alora_ds.io.tasks import (
    build_tiny_tokenizer,
    load_task_examples,
    sample_path,
    tokenize_example,
)
from alora_ds.runtime.process import free_port
from alora_ds.scoring.direct import ab_lora_scores
from alora_ds.scoring.fast import fast_ablation_scores
from alora_ds.scoring.screened import screened_scores

__all__ = ["free_port"]  # the one free_port: alora_ds.runtime.process's


def unavailable(reason: str) -> NoReturn:
    """A system part a test needs is missing (WordNet, Slurm, pdsh, root for network namespaces):
    skip, saying why; under CI=true fail instead, so that CI cannot pass by skipping what
    `make` is meant to have installed."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required, not skipped)", pytrace=False)
    pytest.skip(reason)


REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}

# ---- launching the trainer ----------------------------------------------------------------------

BUDGET = 28  # 14 modules x r_init 2
# The small run of the launch tests: 14 modules x r_init 2, two rounds of 7 after K1; 15 steps
# on 2 processes (rounds after steps 5 and 7), 33 on one.
SMALL_RUN = [
    "--rank_budget", str(BUDGET), "--lora_alpha", "4", "--learning_rate", "3e-3",
    "--per_device_train_batch_size", "4", "--num_train_epochs", "3", "--initial_epochs", "1",
    "--round_epochs", "0.5", "--num_rounds", "2", "--val_examples", "8",
    "--scoring_batch_size", "8", "--eval_steps", "2", "--logging_steps", "1",
]  # fmt: skip
# d_in + d_out per rank in the embedded tiny LLaMA (hidden 64, 2 KV heads of 16, MLP 128).
RANK_COSTS = {"q_proj": 128, "k_proj": 96, "v_proj": 96, "o_proj": 128,
              "gate_proj": 192, "up_proj": 192, "down_proj": 192}  # fmt: skip
PARAM_BUDGET = 2 * 2 * sum(RANK_COSTS.values())  # r_init 2 on every module of 2 layers
ROUND_KEYS = {"round", "ranks_before", "scores", "S_M", "pruned", "added", "ranks_after"}


def train_command(procs: int, ds_config: str | Path) -> list[str]:
    """`python launch/train.py` for one process, `deepspeed --num_gpus N launch/train.py` else."""
    script = [str(REPO / "launch" / "train.py"), "--ds_config", str(ds_config)]
    if procs == 1:
        return [sys.executable, *script]
    return [DEEPSPEED, "--num_gpus", str(procs), "--master_port", str(free_port()), *script]


def run_train(
    output_dir: Path,
    *args: str,
    procs: int = 2,
    ds: str | Path = "zero3",
    env: dict | None = None,
    base: list[str] = SMALL_RUN,
    timeout: float = 400,
) -> subprocess.CompletedProcess:
    """Launch training the way a user does: `base` options, then `args` (later ones win)."""
    ds_config = REPO / "ds_configs" / f"{ds}.json" if isinstance(ds, str) else ds
    return subprocess.run(
        [*train_command(procs, ds_config), "--output_dir", str(output_dir), *base, *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env=dict(os.environ, **OFFLINE, **(env or {})),
    )  # fmt: skip


def read_rounds(output_dir: Path) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted((output_dir / "allocation").glob("round_*.json"))
    ]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def recipe_estimate(recipe: Path) -> tuple[list[str], str]:
    """The `python -m launch.estimate ...` command a recipe's header states, as arguments, and
    the GB per GPU it says that command gives."""
    lines = recipe.read_text().splitlines()
    comments = " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    match = re.search(r"`python -m launch\.estimate ([^`]+)`: ([\d.]+) GB", comments)
    assert match, f"{recipe.name} states no estimate"
    return match.group(1).split(), match.group(2)


# ---- tiny models and data -----------------------------------------------------------------------

VADER_EXCERPT = REPO / "tests" / "data" / "vader_excerpt"


def load_script(name: str, path: Path) -> ModuleType:
    """A script outside the packages (bench/, scripts/) imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz archive of `files` (member name -> bytes), built in memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def vader_sdist(path: Path, archive: str) -> Path:
    """A file shaped like the vaderSentiment source distribution, its ratings archive (member
    `archive`) holding the committed excerpt of the VADER ground-truth files."""
    ratings = {
        f"hutto_ICWSM_2014/{file.name}": file.read_bytes()
        for file in VADER_EXCERPT.glob("*_GroundTruth.txt")
    }
    path.write_bytes(tar_gz({archive: tar_gz(ratings)}))
    return path


def random_examples(n: int, length: int = 12, vocab: int = 128, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows with a prompt (-100) and a supervised response, lengths varying."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        size = length - (i % 3)
        ids = torch.randint(3, vocab, (size,), generator=generator).tolist()
        prompt = size // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def randomise_adapters(modules, seed: int = 1, uneven: bool = False, scale: float = 1.0) -> None:
    """Random B everywhere, so every rank matters (B = 0 at init makes every rank worthless).
    `uneven`: one rank fewer in every other module, so that two processes' shares of a (layer,
    half) scoring group hold different modules."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            if module.lora_B is not None:  # a module with no rank holds no parameter
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * scale)
    if uneven:
        for module in list(modules.values())[::2]:
            remove_ranks(module, [0])


# Modules of the tiny LLaMA that build_gated changes.
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
UP0 = "model.layers.0.mlp.up_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


def build_gated(seed: int = 0, *, trained_gates: bool = False, **config):
    """A tiny gated LLaMA with non-uniform ranks, one module at zero ranks, gates 0 / 0.5 / 0.3
    and one (scale, rank) pair that peft cannot represent exactly. `trained_gates`: every
    module also gets random gate logits (g = mask * 2 sigmoid(a))."""
    config = tiny_llama_config(**config)
    model = build_random_llama(config, seed=seed)
    modules = inject_gated_lora(model, 4 * 7 * config.num_hidden_layers, lora_alpha=10.0)
    generator = torch.Generator().manual_seed(seed + 1)
    remove_ranks(modules[Q0], [1, 2])  # r = 2
    append_ranks(modules[K0], 3, generator)  # r = 7
    remove_ranks(modules[V1], range(4))  # r = 0: must be left out
    remove_ranks(modules[DOWN1], [0])  # r = 3
    modules[DOWN1].scale = 0.7  # no float alpha has alpha / 3 == 0.7 (see test_peft_scaling_bound)
    randomise_adapters(modules, seed + 2, scale=0.3)
    with torch.no_grad():
        modules[UP0].lora_gate[1] = 0.0
        modules[UP0].lora_gate[2] = 0.5
        modules[K0].lora_gate[0] = 0.3
        if trained_gates:
            for module in modules.values():
                module.gate_logits = torch.nn.Parameter(torch.randn(module.r, generator=generator))
    return config, model, modules


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TinySetup:
    """Paths of the tiny base (model + tokenizer) and of its trained PEFT adapter."""

    base: Path
    adapter: Path


def build_tiny_setup(root: Path, steps: int = 25, seed: int = 0) -> TinySetup:
    """Save a random tiny LLaMA + tokenizer under root/base and train a LoRA adapter (r 4, all
    linear layers) on the SST-2 samples with peft, saved under root/adapter (about 2 s)."""
    tokenizer = build_tiny_tokenizer(root / "base")
    config = read_model_config(TINY_LLAMA_CONFIG)
    # Larger than LLaMA's 0.02: with tiny weights the frozen lm_head cannot put a clear margin
    # on any token, and a LoRA adapter alone never learns to emit the label.
    config.initializer_range = 0.3
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config)
        base.save_pretrained(root / "base")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        rows = [
            tokenize_example(tokenizer, prompt, response, 256).as_dict()
            for prompt, response in load_task_examples("sst2", sample_path("sst2", "train"))
        ]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            picked = torch.randperm(len(rows), generator=generator)[:16].tolist()
            loss = model(**collate([rows[i] for i in picked], tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(root / "adapter")
    return TinySetup(root / "base", root / "adapter")


def train_steps(engine, batches, steps: int, method=None) -> None:
    """A few real optimizer steps of an Engine, with a method's per-step hooks where given."""
    for step in range(steps):
        engine.model.train()
        loss = engine.loss(batches[step % len(batches)])
        engine.backward(loss)
        if method is not None:
            method.after_backward(step + 1, engine)
        engine.step()
        if method is not None:
            method.after_step(step + 1, 1e-2, engine)


# ---- the Engine checks: one 2-process launch for all of them ------------------------------------


def scored_model(layers: int = 3, seed: int = 1, uneven: bool = False):
    """A tiny LLaMA (base seed 0) with r_init 2 on every module and random B (`seed`)."""
    model = build_random_llama(tiny_llama_config(num_hidden_layers=layers), seed=0)
    modules = inject_gated_lora(model, 7 * layers * 2, seed=0)
    randomise_adapters(modules, seed, uneven)
    return model, modules


def load_4bit(path: Path | None, dtype: torch.dtype = torch.float32):
    """A tiny checkpoint loaded as QLoRA loads it (nf4 decoder linears), in one plain process."""
    return load_base_model(
        str(path) if path is not None else None, None, dtype=dtype, attn_implementation="sdpa",
        seed=0, loading_context=contextlib.nullcontext(), load_in_4bit=True,
    )  # fmt: skip


def write_engine_check_inputs(directory: Path) -> None:
    """What tests/scripts/engine_checks.py compares with, computed here by one plain process:
    scoring/ (a 3-layer base; its direct scores, their plan, and the screened scores) and qlora/
    (a 2-layer checkpoint; its 4-bit first loss and fast scores)."""
    scoring = directory / "scoring"
    build_random_llama(tiny_llama_config(num_hidden_layers=3), seed=0).save_pretrained(
        scoring / "base"
    )
    model, _ = scored_model(uneven=True)
    batches = make_batches(random_examples(10, seed=3), 4)
    reference = ab_lora_scores(model, batches)
    screened = screened_scores(model, batches, 7, candidates=7)
    (scoring / "ref.json").write_text(json.dumps({
        "S_without": reference.S_without, "S_only": reference.S_only,
        "plan": plan_round(reference.importance, 7).to_json(),
        "screened": {"importance": screened.importance, "exact": screened.exact,
                     "plan": plan_round(screened.importance, 7).to_json()},
    }))  # fmt: skip

    qlora = directory / "qlora"
    build_random_llama(tiny_llama_config(), seed=0).save_pretrained(qlora / "base")
    model, _ = load_4bit(qlora / "base")
    modules = inject_gated_lora(model, 28, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the script's B values
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    batches = make_batches(random_examples(8, seed=3), 4)
    with torch.no_grad():
        loss = float(model(**batches[0]).loss)
    scores = fast_ablation_scores(model, batches)
    (qlora / "ref.json").write_text(
        json.dumps({"loss": loss, "S_without": scores.S_without, "S_only": scores.S_only})
    )


def run_engine_checks(directory: Path, *checks: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 tests/scripts/engine_checks.py DIRECTORY [CHECK ...]`."""
    return subprocess.run(
        [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "scripts" / "engine_checks.py"), str(directory), *checks],
        capture_output=True, text=True, cwd=REPO, timeout=400, env=dict(os.environ, **OFFLINE),
    )  # fmt: skip


def assert_every_process_said(result: subprocess.CompletedProcess, text: str) -> None:
    """Both processes of a 2-process launch printed `rank R: TEXT`."""
    said = [f"rank {rank}: {text}" in result.stdout for rank in (0, 1)]
    assert all(said), result.stdout[-3000:] + result.stderr[-3000:]


# ---- a fake OpenAI-compatible judge on 127.0.0.1 ------------------------------------------------

SECRET = "sk-test-DO-NOT-LEAK-4242"


class FakeJudge:
    """What the server does: `script` actions first (one per request), then `default`."""

    def __init__(self) -> None:
        self.default = "good"
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def next_action(self, body: dict[str, Any], auth: str | None) -> str:
        with self.lock:
            self.requests.append({"body": body, "auth": auth})
            return self.script.pop(0) if self.script else self.default


def fake_verdict(prompt: str) -> str:
    """Pairwise: GOOD answers 9, others 4, +1 for position A. Single: GOOD 8, others 3."""
    if "The Start of Assistant B" in prompt:
        part_a = prompt.split("The Start of Assistant B")[0].split("The Start of Assistant A")[1]
        part_b = prompt.split("The Start of Assistant B")[1].split("[System]")[0]
        a = (9 if "GOOD" in part_a else 4) + 1
        b = 9 if "GOOD" in part_b else 4
        return f"Assistant A is fine. Assistant B is fine.\n[[A: {a}, B: {b}]]"
    return f"Short explanation. Rating: [[{8 if 'GOOD' in prompt else 3}]]"


class JudgeHandler(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions as the `fake` FakeJudge of its server says."""

    server: ThreadingHTTPServer

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake: FakeJudge = self.server.fake  # type: ignore[attr-defined]
        action = fake.next_action(body, self.headers.get("Authorization"))
        if action in ("429", "500"):
            message = {"429": "rate limited", "500": "server exploded"}[action]
            self.send_json(int(action), {"error": {"message": message, "type": "x"}})
            return
        if action == "slow":
            time.sleep(1.0)
        prompt = body["messages"][-1]["content"]
        text = "I have no opinion." if action == "norating" else fake_verdict(prompt)
        self.send_json(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

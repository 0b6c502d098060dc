"""Planted-rank benchmark: can a method find where the ranks are needed, at the same budget?

    .venv/bin/python bench/planted.py --pattern bench/patterns/attention-late.json \\
        --methods lora,alora,alora-dnas,alora-sensi,adalora,sora --seeds 3 [--json rows.json]

The task has a known answer. A tiny random LLaMA is the base; the teacher is the base plus a
low-rank delta on some modules, with the true rank of each module given by the pattern file
(a JSON object, module-name regex -> rank, searched in the full module name, e.g.
`{"layers\\\\.[01]\\\\.self_attn\\\\.(q|k)_proj": 4}`; modules no entry matches get rank 0).
Every method is trained by the real trainer (`launch/train.py`, one process, a subprocess per
run) on token sequences sampled from the teacher, with the same rank budget and the same number
of optimizer steps, adapters on all 7 projections. Each run's exported adapter is loaded onto
the base with peft and scored on held-out teacher samples.

Per seed (the seed draws the base, the planted deltas, the data and the trainer's seed), every
method sees the same base, teacher and data. Reported per run: held-out cross-entropy (its floor
is the teacher's own entropy, printed), KL(teacher || student), adapter parameters, peak memory
(summary.json), wall time of the trainer process (start-up included; the training loop alone
in `train s`), and the Spearman correlation between the final ranks per module and the planted
ranks (null where either is constant, e.g. plain LoRA's uniform ranks: undefined).

The base weights are drawn with a large std (0.3) and each planted delta is U diag(s) V^T with
random orthonormal U, V and every singular value equal to the spectral norm of the module's
weight (with Hugging Face's default std of 0.02 the base's output is nearly uniform and a
planted delta as large as the weight itself barely moves the KL: the deltas are invisible).

The defaults (4 layers, 300 steps, 6 rounds of 8) take 20-35 s per run on a shared 2-core CPU,
about 11 s of it the trainer's start-up: 3 seeds x 6 methods in about 10 minutes.
BENCHMARKS.md has the results and the settings that did not work. A method whose run fails
(train.py refuses it or crashes) is reported and skipped; the others go on (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from alora_ds.core.inject import LLAMA_TARGET_MODULES, find_target_modules, initial_rank  # noqa: E402
from alora_ds.errors import ArgumentParser, InputError, run_cli  # noqa: E402
from alora_ds.io.files import atomic_write_json  # noqa: E402
from alora_ds.scoring.screened import spearman  # noqa: E402

TRAIN_SCRIPT = REPO / "launch" / "train.py"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
ROW_KEYS = ("method", "seed", "heldout_loss", "adapter_params", "peak_mem_mb", "wall_s", "spearman")


# ---- the pattern file -------------------------------------------------------------------------


def load_pattern(path: str | Path) -> dict[str, int]:
    """Read a pattern file: a JSON object of module-name regex -> planted rank (a positive int).

    Every problem is a one-line InputError naming the file and the bad entry.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pattern file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(
            f"pattern file {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    if not isinstance(data, dict) or not data:
        raise InputError(
            f"pattern file {path}: expected a non-empty JSON object of module-name regex -> rank, "
            f'e.g. {{"layers\\\\.0\\\\.self_attn\\\\.q_proj": 4}}'
        )
    for key, rank in data.items():
        try:
            re.compile(key)
        except re.error as exc:
            raise InputError(
                f"pattern file {path}: entry {key!r} is not a valid regular expression ({exc})"
            ) from exc
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise InputError(
                f"pattern file {path}: entry {key!r} has rank {rank!r}; "
                "a rank must be a positive integer"
            )
    return dict(data)


def planted_ranks(
    pattern: Mapping[str, int],
    shapes: Mapping[str, tuple[int, int]],
    source: str | Path,
) -> dict[str, int]:
    """The planted rank of every adapted module (name -> (d_out, d_in) in `shapes`, model order):
    the rank of the one entry whose regex is found in its name, 0 where none is.

    An entry that matches no module, a module matched by two entries, or a rank above
    min(d_in, d_out) is an InputError naming the file and the entry.
    """
    ranks = dict.fromkeys(shapes, 0)
    owner: dict[str, str] = {}
    for key, rank in pattern.items():
        regex = re.compile(key)
        hits = [name for name in shapes if regex.search(name)]
        if not hits:
            example = next(iter(shapes))
            raise InputError(
                f"pattern file {source}: entry {key!r} matches no adapted module "
                f"({len(shapes)} modules, named like {example!r})"
            )
        for name in hits:
            if name in owner:
                raise InputError(
                    f"pattern file {source}: module {name} is matched by both {owner[name]!r} "
                    f"and {key!r}"
                )
            limit = min(shapes[name])
            if rank > limit:
                raise InputError(
                    f"pattern file {source}: entry {key!r} plants rank {rank} in {name}, "
                    f"above its min(d_in, d_out) = {limit}"
                )
            owner[name] = key
            ranks[name] = rank
    return ranks


# ---- base, teacher and data --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    init_std: float

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(64, self.seq_len),
            initializer_range=self.init_std,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )


def module_shapes(size: ModelSize) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module the trainer adapts (all 7 projections), in model order."""
    with torch.device("meta"):
        model = LlamaForCausalLM(size.config())
    names = find_target_modules(model, list(LLAMA_TARGET_MODULES))
    return {name: tuple(model.get_submodule(name).weight.shape) for name in names}


def build_base(size: ModelSize, seed: int) -> LlamaForCausalLM:
    config = size.config()
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the model's vocabulary: the trainer reads only its
    pad id (the data is pre-tokenized), but it must load and fit the vocabulary."""
    words = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    words.update({f"t{i}": i for i in range(len(words), vocab)})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q  # (rows, cols), orthonormal columns


@torch.no_grad()
def plant(base: LlamaForCausalLM, ranks: Mapping[str, int], seed: int) -> LlamaForCausalLM:
    """The teacher: base + U diag(s) V^T on every module with a planted rank, every singular
    value s equal to the spectral norm of that module's weight."""
    teacher = LlamaForCausalLM(base.config)
    teacher.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    for name, rank in ranks.items():
        if rank == 0:
            continue
        weight = teacher.get_submodule(name).weight  # (d_out, d_in)
        norm = torch.linalg.matrix_norm(weight, ord=2)
        u = orthonormal(weight.shape[0], rank, generator)  # (d_out, k)
        v = orthonormal(weight.shape[1], rank, generator)  # (d_in, k)
        weight += norm * u @ v.T
    return teacher.eval()


@torch.no_grad()
def sample_sequences(
    model: LlamaForCausalLM, count: int, length: int, generator: torch.Generator, batch: int = 512
) -> torch.Tensor:
    """`count` sequences of `length` tokens: BOS, then tokens sampled from the model (T = 1)."""
    chunks = []
    for start in range(0, count, batch):
        rows = min(batch, count - start)
        ids = torch.full((rows, 1), BOS_ID, dtype=torch.long)
        step_input, past = ids, None
        for _ in range(length - 1):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)  # (rows, V)
            step_input = torch.multinomial(probs, 1, generator=generator)  # (rows, 1)
            ids = torch.cat([ids, step_input], dim=1)
        chunks.append(ids)
    return torch.cat(chunks)  # (count, length)


def write_pretokenized(path: Path, sequences: torch.Tensor) -> None:
    """JSON-lines rows for `--task pretokenized`: every token after BOS is supervised."""
    with path.open("w") as handle:
        for row in sequences.tolist():
            handle.write(json.dumps({"input_ids": row, "labels": [-100, *row[1:]]}) + "\n")


@torch.no_grad()
def heldout_metrics(
    student: torch.nn.Module, teacher: torch.nn.Module, sequences: torch.Tensor, batch: int = 128
) -> tuple[float, float]:
    """(cross-entropy of the student on the held-out tokens, KL(teacher || student)), both per
    predicted token, every position after BOS."""
    ce_sum = kl_sum = 0.0
    count = 0
    for start in range(0, len(sequences), batch):
        ids = sequences[start : start + batch]  # (B, T)
        log_q = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)  # (B, T-1, V)
        log_p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        target = ids[:, 1:]
        ce_sum += float(-log_q.gather(-1, target.unsqueeze(-1)).sum())
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        count += target.numel()
    return ce_sum / count, kl_sum / count


# ---- one trainer run ---------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    seed: int
    heldout_loss: float
    kl: float
    adapter_params: int
    peak_mem_mb: float
    wall_s: float
    train_s: float
    spearman: float | None
    ranks: dict[str, int]

    def row(self) -> dict:
        values = {
            "method": self.method,
            "seed": self.seed,
            "heldout_loss": round(self.heldout_loss, 5),
            "adapter_params": self.adapter_params,
            "peak_mem_mb": round(self.peak_mem_mb, 1),
            "wall_s": round(self.wall_s, 2),
            "spearman": None if self.spearman is None else round(self.spearman, 4),
        }
        return {key: values[key] for key in ROW_KEYS}


class TrainerFailed(Exception):
    """train.py exited with an error: refused its input (e.g. a method it does not know yet) or
    crashed. The message is one line; the run's log holds the rest."""


def final_ranks(adapter_dir: Path, modules: Sequence[str]) -> dict[str, int]:
    """Final rank per adapted module: the rank map the trainer records in alora_metadata.json,
    else the rows of each lora_A tensor in the adapter; a module absent from it has rank 0."""
    metadata = adapter_dir / "alora_metadata.json"
    if metadata.is_file():
        recorded = json.loads(metadata.read_text())["rank_map"]
        return {name: int(recorded.get(name, 0)) for name in modules}
    ranks = dict.fromkeys(modules, 0)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_A(?:\.\w+)?\.weight", key)
            if match and match.group(1) in ranks:
                ranks[match.group(1)] = tensors.get_slice(key).get_shape()[0]
    return ranks


def train_command(args: argparse.Namespace, method: str, seed: int, paths: dict, out: Path) -> list:
    return [
        sys.executable, str(TRAIN_SCRIPT),
        "--ds_config", args.ds_config,
        "--task", "pretokenized",
        "--train_file", str(paths["train"]),
        "--validation_file", str(paths["dev"]),
        "--model_name_or_path", str(paths["base"]),
        "--method", method,
        "--rank_budget", str(args.budget),
        "--target_modules", ",".join(LLAMA_TARGET_MODULES),
        "--output_dir", str(out),
        "--overwrite_output_dir",
        "--seed", str(seed),
        "--max_seq_length", str(args.seq_len),
        "--learning_rate", str(args.lr),
        "--warmup_ratio", str(args.warmup_ratio),
        "--lora_alpha", str(args.lora_alpha),
        "--per_device_train_batch_size", str(args.batch_size),
        "--max_steps", str(args.steps),
        "--initial_steps", str(args.initial_steps),
        "--round_steps", str(args.round_steps),
        "--num_rounds", str(args.rounds),
        "--prune_per_round", f"{args.prune_per_round:g}",
        "--val_examples", str(args.val_examples),
        "--scoring_batch_size", str(args.val_examples),
        "--eval_steps", str(args.steps),
        "--logging_steps", str(args.steps),
        "--report_to", "none",
        "--progress_bar", "false",
        *shlex.split(args.train_args),
    ]  # fmt: skip


def run_method(
    args: argparse.Namespace,
    method: str,
    seed: int,
    paths: dict,
    planted: Mapping[str, int],
    teacher: torch.nn.Module,
    heldout: torch.Tensor,
) -> Run:
    from peft import PeftModel

    out = paths["root"] / f"{method}"
    command = train_command(args, method, seed, paths, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    # One thread: on a shared 2-core box two OpenMP threads spin-wait on each other and a step
    # of this tiny model runs 20x slower (measured: 0.86 s against 0.034 s).
    env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    (paths["root"] / f"{method}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        if result.returncode == 2 and errors:
            raise TrainerFailed(f"train.py refused it: {errors[-1].removeprefix('error: ')}")
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise TrainerFailed(
            f"train.py failed (exit {result.returncode}): {lines[-1].strip()} "
            f"(seed {seed}; log {paths['root'] / f'{method}.log'})"
        )
    summary = json.loads((out / "summary.json").read_text())
    base = LlamaForCausalLM.from_pretrained(paths["base"], attn_implementation="sdpa")
    student = PeftModel.from_pretrained(base, out / "adapter").eval()
    loss, kl = heldout_metrics(student, teacher, heldout)
    ranks = final_ranks(out / "adapter", list(planted))
    return Run(
        method=method,
        seed=seed,
        heldout_loss=loss,
        kl=kl,
        adapter_params=int(summary["adapter_params_end"]),
        peak_mem_mb=max(summary["peak_memory_bytes"]) / 1e6,
        wall_s=wall,
        train_s=float(summary["wall_time_s"]),
        spearman=spearman([float(ranks[n]) for n in planted], [float(r) for r in planted.values()]),
        ranks=ranks,
    )


# ---- the report --------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (
        f"{statistics.median(values):.{digits}f} "
        f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"
    )


def table(runs: Sequence[Run], methods: Sequence[str]) -> str:
    header = (
        "| method | seeds | held-out loss median [min-max] | KL(teacher‖student) | "
        "adapter params | peak MB | wall s | train s | Spearman |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        rhos = [r.spearman for r in mine if r.spearman is not None]
        undefined = len(mine) - len(rhos)
        rho = spread(rhos, 2) if rhos else "null"
        if rhos and undefined:
            rho += f" ({undefined} null)"
        lines.append(
            f"| {method} | {len(mine)} | {spread([r.heldout_loss for r in mine], 4)} | "
            f"{spread([r.kl for r in mine], 4)} | "
            f"{statistics.median(r.adapter_params for r in mine):,.0f} | "
            f"{statistics.median(r.peak_mem_mb for r in mine):.0f} | "
            f"{statistics.median(r.wall_s for r in mine):.1f} | "
            f"{statistics.median(r.train_s for r in mine):.1f} | {rho} |"
        )
    return "\n".join(lines)


def ranks_line(ranks: Mapping[str, int], layers: int) -> str:
    """Ranks as 'q 8 8 0 0 | k ...': per module type, in layer order."""
    by_type = {t: [0] * layers for t in LLAMA_TARGET_MODULES}
    for name, rank in ranks.items():
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        by_type[name.rsplit(".", 1)[-1]][layer] = rank
    return " | ".join(
        f"{t.removesuffix('_proj')} " + " ".join(map(str, v)) for t, v in by_type.items()
    )


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="bench/planted.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pattern", required=True, help="JSON file: module-name regex -> rank")
    p.add_argument("--budget", type=int, default=56, help="rank budget of every method")
    p.add_argument("--methods", default="lora,alora", help="comma-separated, passed to --method")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (base, teacher, data, run)")
    p.add_argument("--json", help="write one row per run (method, seed, heldout_loss, ...)")
    p.add_argument("--work_dir", help="runs and data go here (default runs/planted/PATTERN)")
    size = p.add_argument_group("model and data")
    size.add_argument("--layers", type=int, default=4)
    size.add_argument("--hidden", type=int, default=64)
    size.add_argument("--intermediate", type=int, default=128)
    size.add_argument("--heads", type=int, default=4)
    size.add_argument("--kv_heads", type=int, default=2)
    size.add_argument("--vocab", type=int, default=128)
    size.add_argument("--seq_len", type=int, default=32, help="tokens per sequence, BOS included")
    size.add_argument("--init_std", type=float, default=0.3, help="std of the base weights")
    size.add_argument("--dev_sequences", type=int, default=64, help="dev split (B_val, dev loss)")
    size.add_argument("--heldout_sequences", type=int, default=512)
    train = p.add_argument_group("training (the same for every method)")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps (--max_steps)")
    train.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--warmup_ratio", type=float, default=0.06)
    train.add_argument("--lora_alpha", type=float, default=16.0)
    train.add_argument("--initial_steps", type=int, default=60, help="K1")
    train.add_argument("--round_steps", type=int, default=20, help="K2")
    train.add_argument("--rounds", type=int, default=6, help="N_A")
    train.add_argument("--prune_per_round", type=float, default=8, help="n_A (count or fraction)")
    train.add_argument("--val_examples", type=int, default=32, help="|B_val|")
    train.add_argument(
        "--ds_config",
        default=str(REPO / "ds_configs" / "zero2.json"),
        help="one process: ZeRO-3 partitions nothing here and only adds per-step cost",
    )
    train.add_argument("--threads", type=int, default=1, help="torch threads per process")
    train.add_argument(
        "--train_args",
        default="",
        help="more train.py options for every run, e.g. '--cap_parameters false'",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in ("budget", "seeds", "steps", "batch_size", "layers", "seq_len", "vocab"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.methods:
        raise InputError("--methods is empty: name at least one (e.g. lora,alora)")
    if args.vocab <= UNK_ID + 1:
        raise InputError(f"--vocab must be above {UNK_ID + 1} (4 special tokens), got {args.vocab}")
    if args.dev_sequences < args.val_examples:
        raise InputError(
            f"--dev_sequences {args.dev_sequences} is smaller than --val_examples "
            f"{args.val_examples}"
        )
    return args


def run_benchmark(args: argparse.Namespace) -> tuple[list[Run], dict[str, str]]:
    """Every (seed, method) run of the benchmark, printed as it finishes; and the methods whose
    trainer run failed (method -> one line saying why)."""
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per run
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft's load
    pattern_path = Path(args.pattern)
    pattern = load_pattern(pattern_path)
    size = ModelSize(
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab,
        args.seq_len, args.init_std,
    )  # fmt: skip
    shapes = module_shapes(size)
    planted = planted_ranks(pattern, shapes, pattern_path)
    r_init = initial_rank(args.budget, len(shapes))  # the trainer's rule, checked before any run
    total = sum(planted.values())
    work = Path(args.work_dir or REPO / "runs" / "planted" / pattern_path.stem)
    print(
        f"planted-rank benchmark: pattern {pattern_path} plants {total} ranks in "
        f"{sum(r > 0 for r in planted.values())} of {len(shapes)} modules; budget {args.budget} "
        f"(r_init {r_init}); methods {', '.join(args.methods)}; {args.seeds} seed(s); "
        f"{args.steps} steps x {args.batch_size} sequences x {args.seq_len} tokens",
        flush=True,
    )
    print(f"planted: {ranks_line(planted, args.layers)}", flush=True)
    if args.budget >= total:
        print(
            f"note: the budget {args.budget} is not below the planted total {total}: "
            "every method can in principle place every planted direction",
            flush=True,
        )

    runs: list[Run] = []
    failed: dict[str, str] = {}  # method -> why; not tried again on later seeds
    for seed in range(args.seeds):
        root = work / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        paths = {"root": root, "base": root / "base", "train": root / "train.jsonl",
                 "dev": root / "dev.jsonl"}  # fmt: skip
        base = build_base(size, seed)
        base.save_pretrained(paths["base"])
        build_tokenizer(args.vocab).save_pretrained(paths["base"])
        teacher = plant(base, planted, seed)
        atomic_write_json(root / "planted.json", planted)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        train = sample_sequences(teacher, args.steps * args.batch_size, args.seq_len, generator)
        dev = sample_sequences(teacher, args.dev_sequences, args.seq_len, generator)
        heldout = sample_sequences(teacher, args.heldout_sequences, args.seq_len, generator)
        write_pretokenized(paths["train"], train)
        write_pretokenized(paths["dev"], dev)
        floor, _ = heldout_metrics(teacher, teacher, heldout)
        base_loss, base_kl = heldout_metrics(base, teacher, heldout)
        print(
            f"seed {seed}: {len(train)} train / {len(dev)} dev / {len(heldout)} held-out "
            f"sequences sampled in {time.perf_counter() - start:.1f}s; held-out loss of the "
            f"teacher {floor:.4f} (the floor), of the base {base_loss:.4f} (KL {base_kl:.4f})",
            flush=True,
        )
        for method in args.methods:
            if method in failed:
                continue
            try:
                run = run_method(args, method, seed, paths, planted, teacher, heldout)
            except TrainerFailed as exc:
                failed[method] = str(exc)
                print(f"  {method}: {exc}", flush=True)
                continue
            runs.append(run)
            rho = "null" if run.spearman is None else f"{run.spearman:.3f}"
            print(
                f"  {method:12s} held-out loss {run.heldout_loss:.4f}  KL {run.kl:.4f}  "
                f"params {run.adapter_params:,}  peak {run.peak_mem_mb:.0f} MB  "
                f"wall {run.wall_s:.1f}s (train {run.train_s:.1f}s)  Spearman {rho}",
                flush=True,
            )
            print(f"  {'':12s} ranks: {ranks_line(run.ranks, args.layers)}", flush=True)
    return runs, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs, failed = run_benchmark(args)
    print()
    print(table(runs, args.methods))
    print(
        "Spearman: final ranks per module vs planted ranks over all adapted modules; null where "
        "the final ranks are constant (undefined)."
    )
    for method, message in failed.items():
        print(f"not run: {method}: {message}")
    if args.json:
        atomic_write_json(args.json, [run.row() for run in runs])
        print(f"rows written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

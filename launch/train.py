"""Train a LLaMA-family model with ALoRA under DeepSpeed.

    deepspeed --num_gpus N launch/train.py --ds_config ds_configs/zero3.json \\
        [--config configs/X.yaml] [--key value ...]

Read top to bottom: check every input, load the data and the (partitioned) model, wrap the
target modules with gated LoRA, then one loop:

    batch -> forward -> backward -> step -> (round boundary? score, plan, rebuild) -> log

After the last round training continues with the dev loss evaluated every eval_steps, early
stopping after `patience` evaluations without improvement, and the best adapter kept.
`--method lora` runs the same loop with no rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Runnable as `python launch/train.py` and `deepspeed launch/train.py` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# DeepSpeed picks its accelerator at import; name it on a CPU box to skip the probing warning.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import AutoTokenizer  # noqa: E402

from alora_ds import dist as D  # noqa: E402
from alora_ds.adalora import AdaLoraSchedule  # noqa: E402
from alora_ds.allocation import (  # noqa: E402
    NonFiniteScore,
    check_scores,
    parameter_count,
    plan_round,
    pruned_by_module,
    resolve_prune_count,
    select_pruned,
)
from alora_ds.checkpoint import (  # noqa: E402
    find_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from alora_ds.config import (  # noqa: E402
    TrainConfig,
    load_ds_config,
    parse_args,
    resolve_batch_sizes,
    to_json,
)
from alora_ds.cpu import keep_freed_memory  # noqa: E402
from alora_ds.data import IGNORE_INDEX, collate, make_batches  # noqa: E402
from alora_ds.datasets import build_split, check_task  # noqa: E402
from alora_ds.errors import InputError, RunFailure, run_cli  # noqa: E402
from alora_ds.export import write_peft_adapter  # noqa: E402
from alora_ds.files import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    check_output_location,
)
from alora_ds.inject import (  # noqa: E402
    count_parameters,
    find_target_modules,
    initial_rank,
    inject_gated_lora,
    rank_map,
)
from alora_ds.modeling import (  # noqa: E402
    TINY_LLAMA_CONFIG,
    check_load_in_4bit,
    empty_causal_lm,
    empty_from_config,
    load_base_model,
    resolve_attn_implementation,
)
from alora_ds.pretrained import resolve_model_alias  # noqa: E402
from alora_ds.report import plot_rank_heatmap, summarize_run  # noqa: E402
from alora_ds.schedule import (  # noqa: E402
    bilevel_split,
    draw_validation_indices,
    make_schedule,
    micro_batch_indices,
)
from alora_ds.sensitivity import SensitivityTracker  # noqa: E402
from alora_ds.tasks import build_tiny_tokenizer  # noqa: E402
from alora_ds.tracking import (  # noqa: E402
    MetricsSink,
    ScoringProgress,
    TrainProgress,
    check_report_to,
    print_line,
    quiet_library_noise,
)

RUN_MARKER = "config.json"
# Methods with allocation rounds; they differ only in where a round's scores come from.
ROUND_METHODS = ("alora", "alora-sensi", "alora-dnas")
# Fault injection for the tests: this process corrupts its rebuilt adapters after round 1.
CORRUPT_ENV = "ALORA_DS_TEST_CORRUPT_RANK"
# Fault injection for tests/faults: `<kind>@<point>:<n>[@<rank>]`, see Fault.
FAULT_ENV = "ALORA_DS_TEST_FAULT"
# Options that may change when a run is resumed: where and how often it logs and saves, how
# processes are laid out (the global batch itself must stay), and how long collectives wait.
RESUME_MAY_DIFFER = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank",
        "dist_timeout", "logging_steps", "save_steps", "save_total_limit", "progress_bar",
        "report_to", "per_device_train_batch_size", "gradient_accumulation_steps",
        "skip_nonfinite", "scoring", "scoring_max_rows", "scoring_batch_size",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Fault:
    """A fault the tests inject: `kill` (SIGKILL, as a lost node), `raise` (an exception in one
    process), `nan` (a non-finite loss) or `disk` (a file-size limit, so the checkpoint write
    fails as on a full disk), at `step:N` (after optimizer step N; `nan`: in step N),
    `scoring:N` (round N's ablations done, nothing applied) or `save:N` (the checkpoint of
    step N, half written); on every process, or on process `rank`."""

    kind: str
    point: str
    at: int
    rank: int | None

    @staticmethod
    def parse(text: str | None) -> Fault | None:
        if not text:
            return None
        kind, where, *rank = text.split("@")
        point, at = where.split(":")
        return Fault(kind, point, int(at), int(rank[0]) if rank else None)

    def hits(self, kind: str, point: str, at: int, rank: int) -> bool:
        return (self.kind, self.point, self.at) == (kind, point, at) and self.rank in (None, rank)


def fire(fault: Fault | None, kind: str, point: str, at: int, rank: int) -> None:
    """Carry out an injected `kill` or `raise` fault when it is due."""
    if fault is None or not fault.hits(kind, point, at, rank):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at {point} {at} on process {rank}")


def log(info: D.DistInfo | None, message: str) -> None:
    if info is None or info.is_main:
        print_line(message)  # through tqdm, so an open progress bar is redrawn below it


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds another run, unless told to overwrite."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output_dir {output_dir} exists and is not a directory")
    check_output_location(output_dir, "--output_dir", inside=True)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(
            f"output_dir {output_dir} already holds another run; pass --overwrite_output_dir "
            "to replace it or choose another directory"
        )


def check_resume_config(output_dir: Path, cfg: TrainConfig, global_batch: int) -> None:
    """A run is resumed with the options it was started with (RESUME_MAY_DIFFER aside)."""
    marker = output_dir / RUN_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot resume: {marker} cannot be read ({exc})") from exc
    for key, value in to_json(cfg).items():
        if key not in RESUME_MAY_DIFFER and key in saved and saved[key] != value:
            raise InputError(
                f"cannot resume: --{key} is {value!r} but the run in {output_dir} was started "
                f"with {saved[key]!r}; resume with the same value"
            )
    started = saved.get("resolved", {}).get("global_batch", global_batch)
    if started != global_batch:
        raise InputError(
            f"cannot resume: the global batch is {global_batch} but the run was started with "
            f"{started}; set --gradient_accumulation_steps so that micro batch x accumulation x "
            "processes is the same"
        )


def limit_file_size(limit: int) -> None:
    """For the `disk` fault: files cannot grow past `limit` bytes from now on, so the next
    write fails with a real OSError (EFBIG) as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def load_tokenizer(cfg: TrainConfig):
    source = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if source is None:
        return build_tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise InputError(
                f"tokenizer {source} ships its own Python code, which runs only with "
                "--trust_remote_code"
            ) from exc
        raise InputError(f"cannot load tokenizer {source!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # LLaMA ships without a pad token
    return tokenizer


def shard_batches(examples, batch_size: int, info: D.DistInfo, pad_id: int, device) -> list:
    """This process's share of `examples` as micro-batches; every process gets the same number
    (ZeRO-3 forwards are collective), padded with batches that supervise nothing."""
    mine = examples[info.rank :: info.world_size]
    per_process = -(-len(examples) // info.world_size)
    count = -(-per_process // batch_size)
    filler = {"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX, IGNORE_INDEX]}
    batches = []
    for i in range(count):
        chunk = mine[i * batch_size : (i + 1) * batch_size] or [filler]
        batches.append({k: v.to(device) for k, v in collate(chunk, pad_id).items()})
    return batches


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return train(argv)
    except RuntimeError as exc:
        if not D.is_collective_failure(exc):
            raise
        # A peer died or stopped answering within --dist_timeout: say so in one line.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFailure(
            f"lost contact with another process ({first}); resume with "
            "--resume_from_checkpoint auto"
        ) from exc


def train(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    # Aliases of models we can build offline ("smollm2"): converted once, then a local path,
    # which config.json records.
    cfg = dataclasses.replace(
        cfg,
        model_name_or_path=resolve_model_alias(cfg.model_name_or_path),
        tokenizer_name_or_path=resolve_model_alias(cfg.tokenizer_name_or_path),
    )

    # ---- every input is checked before anything is started or written ------------------
    output_dir = Path(cfg.output_dir)
    resume_path = (
        find_checkpoint(output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint and not cfg.overwrite_output_dir
        else None
    )
    # `auto` with no checkpoint yet: the run died before its first one (a requeued job); start
    # it again from scratch, once its options are checked to be the same run's.
    restart = (
        resume_path is None
        and cfg.resume_from_checkpoint == "auto"
        and (output_dir / RUN_MARKER).is_file()
    )
    if resume_path is None:
        check_output_dir(output_dir, cfg.overwrite_output_dir or restart)
    # Under srun nothing has set WORLD_SIZE yet: map Slurm's variables first (a no-op under
    # deepspeed or torchrun, which set RANK).
    os.environ.update(D.slurm_environment(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = resolve_batch_sizes(load_ds_config(cfg.ds_config), cfg, world_size, cfg.ds_config)
    dtype = D.model_dtype(ds_config)
    check_task(cfg.task)
    check_report_to(cfg.report_to)
    if cfg.load_in_4bit:
        check_load_in_4bit(cfg.model_name_or_path)
    tokenizer = load_tokenizer(cfg)
    train_examples, train_stats = build_split(
        cfg.task, cfg.train_file, "train", tokenizer, cfg.max_seq_length, cfg.dataset_name
    )
    dev_examples, dev_stats = build_split(
        cfg.task, cfg.validation_file, "validation", tokenizer, cfg.max_seq_length, cfg.dataset_name
    )
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if resume_path is not None or restart:
        check_resume_config(output_dir, cfg, global_batch)
    if cfg.skip_nonfinite and cfg.gradient_accumulation_steps > 1:
        raise InputError(
            "--skip_nonfinite needs --gradient_accumulation_steps 1 (a step whose gradients are "
            f"already partly accumulated cannot be dropped), got {cfg.gradient_accumulation_steps}"
        )
    # AdaLoRA prunes over the same window as ALoRA's rounds (from K1 to the last round), so the
    # schedule is built with them; it just does no rounds at their steps.
    rounds = cfg.num_rounds if cfg.method in (*ROUND_METHODS, "adalora") else 0
    if cfg.method == "adalora" and cfg.num_rounds < 1:
        raise InputError("--method adalora prunes between K1 and the last round: --num_rounds >= 1")
    dnas = cfg.method == "alora-dnas"
    # DNAS's bi-level split: adapter weights learn on D1, gate logits on D2, alternating steps.
    pools = (
        bilevel_split(len(train_examples), cfg.seed)
        if dnas
        else (list(range(len(train_examples))),)
    )
    pool_steps = [len(pool) // global_batch for pool in pools]  # steps per epoch of each pool
    if min(pool_steps) == 0:
        raise InputError(
            f"--method {cfg.method}: {min(len(p) for p in pools)} training examples per split are "
            f"fewer than one global batch of {global_batch}"
        )
    schedule = make_schedule(
        len(train_examples),
        global_batch,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_ratio=cfg.warmup_ratio,
        num_rounds=rounds,
        initial_epochs=cfg.initial_epochs,
        round_epochs=cfg.round_epochs,
        initial_steps=cfg.initial_steps,
        round_steps=cfg.round_steps,
    )
    # The architecture on the meta device: target modules and budget checked before loading.
    skeleton = (
        empty_causal_lm(cfg.model_name_or_path, cfg.trust_remote_code)
        if cfg.model_name_or_path
        else empty_from_config(cfg.model_config or TINY_LLAMA_CONFIG)
    )
    num_modules = len(find_target_modules(skeleton, cfg.target_modules))
    rank_budget = cfg.rank_budget or 8 * num_modules
    sora, adalora = cfg.method == "sora", cfg.method == "adalora"
    identity_gates = sora or adalora
    # SoRA and AdaLoRA start at twice the rank and end pruned to the budget (as in their papers).
    start_budget = 2 * rank_budget if identity_gates else rank_budget
    r_init = initial_rank(start_budget, num_modules)
    vocab = skeleton.get_input_embeddings().num_embeddings
    del skeleton
    if len(tokenizer) > vocab:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}"
        )
    val_examples = min(cfg.val_examples, len(dev_examples))

    # ---- processes, data and model ----------------------------------------------------------
    if not torch.cuda.is_available():
        keep_freed_memory()  # see alora_ds/cpu.py: tens of MB page-faulted in afresh at every op
    info = D.init_distributed(cfg.dist_timeout)
    quiet_library_noise(info.is_main)
    if info.world_size != world_size:
        raise InputError(f"WORLD_SIZE is {world_size} but the process group has {info.world_size}")
    torch.manual_seed(cfg.seed)
    log(
        info,
        f"alora-ds: {cfg.method} on {cfg.task}, {info.world_size} process(es), "
        f"ZeRO stage {D.zero_stage(ds_config)}, {str(dtype).removeprefix('torch.')}, "
        f"backend {info.backend}",
    )
    log(
        info,
        f"batch: micro {cfg.per_device_train_batch_size} x accumulation "
        f"{cfg.gradient_accumulation_steps} x {info.world_size} processes = {global_batch} "
        f"examples per optimizer step",
    )
    log(info, f"data: train {train_stats.describe()}; dev {dev_stats.describe()}")
    if val_examples < cfg.val_examples and rounds:
        log(
            info,
            f"warning: the dev split has {len(dev_examples)} examples, fewer than "
            f"|B_val| = {cfg.val_examples}; scoring uses all {val_examples}",
        )
    log(
        info,
        f"schedule: {schedule.steps_per_epoch} steps per epoch, {schedule.total_steps} "
        f"steps, warm-up {schedule.warmup_steps}, rounds after steps {list(schedule.round_after)}",
    )

    if info.is_main and resume_path is None:
        if output_dir.exists() and (cfg.overwrite_output_dir or restart):
            shutil.rmtree(output_dir)
        (output_dir / "allocation").mkdir(parents=True)
        atomic_write_json(
            output_dir / RUN_MARKER,
            {
                **to_json(cfg),
                "resolved": {
                    "world_size": info.world_size,
                    "rank_budget": rank_budget,
                    "r_init": r_init,
                    "n_prune": cfg.prune_per_round,
                    "global_batch": global_batch,
                    "total_steps": schedule.total_steps,
                    "round_after": list(schedule.round_after),
                    "zero_stage": D.zero_stage(ds_config),
                    "dtype": str(dtype),
                    "val_examples": val_examples,
                },
            },
        )
    attn = resolve_attn_implementation(cfg.attn_implementation)
    log(info, f"attention: {attn}; gradient checkpointing: {cfg.gradient_checkpointing}")
    model, random_init = load_base_model(
        cfg.model_name_or_path,
        cfg.model_config,
        dtype=dtype,
        attn_implementation=attn,
        seed=cfg.seed,
        loading_context=D.partitioned_loading(ds_config),
        load_in_4bit=cfg.load_in_4bit,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False
    base_name = cfg.model_name_or_path
    if random_init:  # saved once, so every adapter can be loaded by peft on its own
        base_dir = output_dir / "base_model"
        if resume_path is None:
            state = D.full_state_dict(model, info)
            if info.is_main:
                model.save_pretrained(base_dir, state_dict=state)
                tokenizer.save_pretrained(base_dir)
            del state
        base_name = str(base_dir.resolve())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    modules = inject_gated_lora(
        model,
        start_budget,
        target_modules=cfg.target_modules,
        lora_alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        seed=cfg.seed,
        relaxed_gates=dnas or identity_gates,
        gate_activation="identity" if identity_gates else "sigmoid",
        dtype=dtype,
    )
    model.to(info.device)
    log(
        info,
        f"adapters: {len(modules)} modules, r_init = {r_init}, budget {rank_budget} ranks; "
        f"{count_parameters(model)}",
    )
    settings = D.OptimizerSettings(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    engine = D.create_engine(model, ds_config, settings)
    # Parameters per rank: A's row and B's column, plus the gate logit in DNAS.
    rank_costs = {
        name: m.in_features + m.out_features + m.relaxed_gates for name, m in modules.items()
    }
    tracker = SensitivityTracker() if cfg.method == "alora-sensi" else None
    ada_schedule = (
        AdaLoraSchedule(
            list(modules),
            init_r=r_init,
            target_r=r_init // 2,
            total_step=schedule.total_steps,
            tinit=schedule.round_after[0],
            tfinal=schedule.total_steps - schedule.last_round_step,
        )  # fmt: skip
        if adalora
        else None
    )
    # Importance statistics that a checkpoint must carry (Sensi's, AdaLoRA's).
    statistics = tracker or (ada_schedule.tracker if ada_schedule else None)
    initial_ranks = rank_map(model)
    param_budget = parameter_count(rank_map(model), rank_costs) if cfg.cap_parameters else None
    peak_params = parameter_count(rank_map(model), rank_costs)  # "equal budget" is checkable
    pad_id = tokenizer.pad_token_id
    dev_batches = shard_batches(
        dev_examples, cfg.per_device_train_batch_size, info, pad_id, info.device
    )

    def export(directory: Path, history: list[dict]) -> None:
        tensors = D.gathered_adapter_tensors(model)
        if info.is_main:
            write_peft_adapter(
                tensors,
                directory,
                base_model_name_or_path=base_name,
                metadata={
                    "rank_map": rank_map(model),
                    "rounds": history,
                    "lora_alpha": cfg.lora_alpha,
                    "r_init": r_init,
                },
            )
        D.barrier()

    # ---- the loop state, fresh or from a checkpoint --------------------------------------------
    history: list[dict] = []  # per round: ranks and scores (the adapter metadata)
    best_loss, evals_without_gain, round_index = float("inf"), 0, 0
    start_step, skipped_steps, earlier_wall_s, all_tokens = 0, 0, 0.0, 0.0
    metrics_file = output_dir / "metrics.jsonl"
    if resume_path is not None:
        checkpoint = read_checkpoint(resume_path)
        saved = checkpoint.state
        try:
            states = D.unflatten_states(checkpoint.tensors, list(modules), str(resume_path))
        except ValueError as exc:
            raise InputError(f"cannot resume: {exc}") from exc
        engine = D.install_adapter_states(
            engine, model, ds_config, settings, info, states, saved["optimizer_step"]
        )
        modules = D.gated_modules(model)
        assert rank_map(model) == saved["rank_map"]
        if statistics is not None:
            statistics.load_state_tensors(checkpoint.tensors)
        same_rng = D.restore_rng(checkpoint.rng, info)
        start_step, round_index = saved["step"], saved["round_index"]
        history, best_loss = saved["history"], saved["best_loss"]
        evals_without_gain, skipped_steps = saved["evals_without_gain"], saved["skipped_steps"]
        earlier_wall_s, all_tokens = saved["wall_s"], saved["tokens"]
        peak_params = saved["peak_params"]
        if info.is_main:  # what the interrupted run logged after its checkpoint is redone
            kept = [
                line
                for line in metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ] if metrics_file.exists() else []  # fmt: skip
            atomic_write_text(metrics_file, "".join(f"{line}\n" for line in kept))
            for stale in (output_dir / "allocation").glob("*round_*"):
                if int(stale.stem.rsplit("_", 1)[1]) > round_index:
                    stale.unlink()
        log(
            info,
            f"resumed from {resume_path} at step {start_step}, round {round_index}"
            + ("" if same_rng else "; random generators re-seeded (different process count)"),
        )
        if not same_rng:
            torch.manual_seed(cfg.seed + start_step)
        del checkpoint, states

    def save(done: int) -> None:
        """A checkpoint of everything the loop needs to go on from step `done` (collective)."""
        tensors, rng = D.gathered_training_state(engine, model, info)
        if statistics is not None:
            tensors.update(statistics.state_tensors())
        state = {
            "step": done, "round_index": round_index, "rank_map": rank_map(model),
            "history": history, "best_loss": best_loss, "evals_without_gain": evals_without_gain,
            "optimizer_step": D.optimizer_step_count(engine), "skipped_steps": skipped_steps,
            "world_size": info.world_size, "global_batch": global_batch,
            "tokens": all_tokens, "wall_s": earlier_wall_s + time.perf_counter() - run_start,
            "peak_params": peak_params,
        }  # fmt: skip
        failure = None
        if info.is_main:
            if fault is not None and fault.hits("disk", "save", done, info.rank):
                limit_file_size(4096)
            try:
                write_checkpoint(
                    output_dir, done, tensors, rng, state, keep=cfg.save_total_limit,
                    fault="kill" if fault and fault.hits("kill", "save", done, 0) else None,
                )  # fmt: skip
            except OSError as exc:
                failure = f"{exc.strerror or exc} ({exc.filename or output_dir})"
        if not D.all_agree(failure is None, info.device):
            raise RunFailure(
                f"could not write the checkpoint of step {done}: {failure or 'see process 0'}; "
                f"{last_checkpoint()}"
            )

    def last_checkpoint() -> str:
        previous = list_checkpoints(output_dir)
        if not previous:
            return "no checkpoint has been written yet"
        return f"the last good checkpoint is {previous[-1]}"

    # ---- the loop -----------------------------------------------------------------------------
    corrupt_rank = int(os.environ.get(CORRUPT_ENV, "-1"))
    fault = Fault.parse(os.environ.get(FAULT_ENV))
    tokens_seen, window_start = 0.0, time.perf_counter()
    run_start = time.perf_counter()
    sink = MetricsSink(
        output_dir, is_main=info.is_main, report_to=cfg.report_to, run_config=to_json(cfg),
        resume_step=start_step if resume_path is not None else None,
    )  # fmt: skip
    show_bars = info.is_main and cfg.progress_bar
    progress = TrainProgress(schedule.total_steps, enabled=show_bars, initial=start_step)
    tokens_per_s = None
    with sink, progress:  # closed, and the bar cleared, before any error line is printed
        for step in range(start_step, schedule.total_steps):
            model.train()
            lr = schedule.lr_at(step, cfg.learning_rate)
            part = step % len(
                pools
            )  # DNAS: even steps train the weights on D1, odd the gates on D2
            if dnas:
                for module in modules.values():
                    module.train_only = ("weights", "gates")[part]
                D.set_learning_rate(engine, lr * (part == 0), gates_lr=lr * (part == 1))
            else:
                D.set_learning_rate(engine, lr)
            pool = pools[part]
            stepped = True
            micro_batches = micro_batch_indices(
                len(pool),
                seed=cfg.seed + part,
                step=step // len(pools),
                steps_per_epoch=pool_steps[part],
                micro_batch=cfg.per_device_train_batch_size,
                accumulation=cfg.gradient_accumulation_steps,
                world_size=info.world_size,
                rank=info.rank,
            )
            for micro, indices in enumerate(micro_batches):
                batch = {
                    k: v.to(info.device)
                    for k, v in collate([train_examples[pool[i]] for i in indices], pad_id).items()
                }
                loss = engine(**batch).loss  # mean over this micro-batch's supervised tokens
                if fault is not None and fault.hits("nan", "step", step + 1, info.rank):
                    loss = loss * float("nan")
                # One process's NaN must stop (or skip) every process: agree before the backward.
                if not D.all_agree(bool(torch.isfinite(loss.detach())), info.device):
                    if not cfg.skip_nonfinite:
                        raise RunFailure(
                            f"the loss is not finite at step {step + 1}; {last_checkpoint()}; resume "
                            "from it with a lower --learning_rate, or pass --skip_nonfinite to skip "
                            "such steps"
                        )
                    # gradient_accumulation_steps is 1 (checked at start): nothing is accumulated
                    # yet, so leaving out backward and step leaves weights and Adam untouched.
                    skipped_steps += 1
                    stepped = False
                    log(
                        info,
                        f"step {step + 1}: non-finite loss, step skipped ({skipped_steps} so far)",
                    )
                    break
                engine.backward(loss)
                if statistics is not None and micro == len(micro_batches) - 1:
                    # The step's whole gradient exists only now, between backward and step.
                    observed = D.adapter_values_and_grads(engine, modules)
                    if tracker is not None:
                        tracker.update(observed)
                    else:
                        ada_schedule.observe(step + 1, observed)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
                tokens_seen += float(batch["attention_mask"].sum())
                all_tokens += float(batch["attention_mask"].sum())
            done = step + 1
            if sora and stepped:
                D.proximal_gate_step(modules, lr * cfg.sora_lambda)
            if adalora and stepped:  # peft's update_and_allocate moment: after the step
                masked = ada_schedule.mask(done, D.gate_value_scores(model))
                if masked is not None:
                    D.set_gate_values(modules, masked)
            record: dict = {}
            fire(fault, "kill", "step", done, info.rank)
            fire(fault, "raise", "step", done, info.rank)

            if (
                cfg.method in ROUND_METHODS
                and round_index < len(schedule.round_after)
                and done == schedule.round_after[round_index]
            ):
                round_index += 1
                start = time.perf_counter()
                s_m = None  # S(M), the validation score of the full model: AB-LoRA's reference
                if cfg.method == "alora":
                    val_ids = draw_validation_indices(
                        len(dev_examples), val_examples, seed=cfg.seed, round_index=round_index
                    )
                    val_batches = make_batches(
                        [dev_examples[i] for i in val_ids],
                        cfg.scoring_batch_size,
                        pad_id,
                        info.device,
                    )
                    with ScoringProgress(
                        sum(rank_map(model).values()), enabled=show_bars, round_index=round_index
                    ) as scoring_bar:
                        scores = D.distributed_ab_lora_scores(
                            model,
                            val_batches,
                            info,
                            method=cfg.scoring,
                            max_rows=cfg.scoring_max_rows,
                            engine=engine,
                            progress=scoring_bar,
                        )
                    importance, s_m = scores.importance, scores.S_M
                elif cfg.method == "alora-sensi":
                    importance = tracker.rank_scores(rank_map(model))
                else:  # alora-dnas: the relaxed gate values themselves
                    importance = D.gate_value_scores(model)
                fire(fault, "kill", "scoring", round_index, info.rank)
                try:
                    check_scores(importance)
                except NonFiniteScore as exc:
                    raise RunFailure(f"round {round_index}: {exc}; {last_checkpoint()}") from exc
                live = sum(len(v) for v in importance.values())
                n_prune = resolve_prune_count(cfg.prune_per_round, live)
                plan = plan_round(
                    importance, n_prune, rank_costs=rank_costs, param_budget=param_budget
                )
                round_file = {
                    "round": round_index,
                    "ranks_before": plan.ranks_before,
                    "scores": importance,
                    "S_M": s_m,
                    "pruned": [list(p) for p in plan.pruned],
                    "added": plan.added,
                    "ranks_after": plan.ranks_after,
                }
                scored_s = time.perf_counter() - start
                engine = D.rebuild_engine(
                    engine,
                    model,
                    ds_config,
                    settings,
                    info,
                    plan.to_json(),
                    pruned_by_module(plan),
                    plan.added,
                    seed=cfg.seed,
                    round_index=round_index,
                    corrupt=(round_index == 1 and info.rank == corrupt_rank),
                )
                assert rank_map(model) == plan.ranks_after
                if tracker is not None:
                    tracker.apply_plan(pruned_by_module(plan), plan.added)
                peak_params = max(peak_params, parameter_count(plan.ranks_after, rank_costs))
                assert sum(plan.ranks_after.values()) <= rank_budget
                assert (
                    param_budget is None
                    or parameter_count(rank_map(model), rank_costs) <= param_budget
                )
                if info.is_main:
                    atomic_write_json(
                        output_dir / "allocation" / f"round_{round_index:02d}.json", round_file
                    )
                    plot_rank_heatmap(
                        plan.ranks_after,
                        output_dir / "allocation" / f"ranks_round_{round_index:02d}.png",
                        title=f"LoRA ranks after round {round_index}",
                    )
                history.append(
                    {
                        "round": round_index,
                        "S_M": s_m,
                        "scores": importance,
                        "ranks_after": plan.ranks_after,
                    }
                )
                round_s = time.perf_counter() - start
                window_start += round_s  # tokens per second counts training time only
                record.update(
                    round=round_index,
                    pruned=len(plan.pruned),
                    scoring_s=round(scored_s, 3),
                    rebuild_s=round(round_s - scored_s, 3),
                )
                pruned_types = Counter(module_type(n) for n, _ in plan.pruned)
                log(
                    info,
                    f"round {round_index}: "
                    + (f"S(M) {s_m:.4f}, " if s_m is not None else "")
                    + f"pruned {len(plan.pruned)} "
                    f"{dict(pruned_types)}, added {sum(plan.added.values())} {plan.added}; "
                    f"scored in {scored_s:.1f}s",
                )

            evaluating = done > schedule.last_round_step and (
                (done - schedule.last_round_step) % cfg.eval_steps == 0
                or done == schedule.total_steps
            )
            if evaluating:
                dev_loss = D.distributed_loss(model, dev_batches, info)
                record["dev_loss"] = dev_loss
                if dev_loss < best_loss:
                    best_loss, evals_without_gain = dev_loss, 0
                    if not identity_gates:  # SoRA/AdaLoRA fit the budget after their final prune
                        export(output_dir / "best_adapter", history)
                else:
                    evals_without_gain += 1

            if done % cfg.logging_steps == 0 or record or done == schedule.total_steps:
                elapsed = time.perf_counter() - window_start
                tokens = D.all_reduce_sum([tokens_seen], info.device)[0]
                record = {
                    "step": done,
                    "epoch": round(done / schedule.steps_per_epoch, 4),
                    "loss": float(loss.detach()) if stepped else None,  # a skipped step has none
                    **({"skipped_steps": skipped_steps} if skipped_steps else {}),
                    "lr": schedule.lr_at(step, cfg.learning_rate),
                    "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
                    **record,
                }
                tokens_seen, window_start = 0.0, time.perf_counter()
                tokens_per_s = record["tokens_per_s"]
                sink.log(record, step=done)
                log(
                    info,
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in record.items()
                    ),
                )
            progress.update(
                done,
                loss=float(loss.detach()),
                lr=schedule.lr_at(step, cfg.learning_rate),
                tokens_per_s=tokens_per_s,
            )
            round_boundary = "round" in record
            if done < schedule.total_steps and (
                round_boundary or (cfg.save_steps and done % cfg.save_steps == 0)
            ):
                save(done)
            if evals_without_gain >= cfg.patience:
                log(
                    info,
                    f"early stopping at step {done}: no better dev loss in {cfg.patience} evaluations",
                )
                break

    if identity_gates:  # keep the rank_budget ranks with the largest |g| (gates at 0 go first)
        gates = D.gate_value_scores(model)
        magnitude = {name: [abs(g) for g in values] for name, values in gates.items()}
        live = sum(len(v) for v in magnitude.values())
        zeros = sum(g == 0 for values in gates.values() for g in values)
        pruned = select_pruned(magnitude, max(live - rank_budget, zeros))
        by_module: dict[str, list[int]] = defaultdict(list)
        for name, index in pruned:
            by_module[name].append(index)
        final_plan = {"gates": gates, "pruned": [list(p) for p in pruned]}
        engine = D.rebuild_engine(
            engine, model, ds_config, settings, info, final_plan, by_module, {},
            seed=cfg.seed, round_index=0,
        )  # fmt: skip
        final_plan["ranks_after"] = rank_map(model)
        if info.is_main:
            atomic_write_json(output_dir / "allocation" / "final_prune.json", final_plan)
        log(info, f"{cfg.method}: {zeros} gates at zero; pruned {len(pruned)} ranks to the budget")
    export(output_dir / "adapter", history)
    final = rank_map(model)
    wall_s = earlier_wall_s + time.perf_counter() - run_start
    peak = (
        torch.cuda.max_memory_allocated(info.device)
        if info.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS, bytes
    )
    peaks = D.all_gather_tensor(torch.tensor([peak], dtype=torch.int64, device=info.device))
    tokens_total = D.all_reduce_sum([all_tokens], info.device)[0]
    if info.is_main:
        plot_rank_heatmap(final, output_dir / "ranks.png")
        summary = summarize_run(
            initial_ranks=initial_ranks, final_ranks=final, params_per_rank=rank_costs,
            peak_memory_bytes=[int(p) for p in peaks], wall_time_s=wall_s, tokens=int(tokens_total),
            adapter_params_peak=peak_params,
        )  # fmt: skip
        atomic_write_json(output_dir / "summary.json", summary.to_dict())
        log(info, summary.to_text())
    by_type: dict[str, list[int]] = defaultdict(list)
    for name, r in final.items():
        by_type[module_type(name)].append(r)
    log(
        info,
        "final ranks per module type (layer order): "
        + "; ".join(f"{t} {v}" for t, v in by_type.items()),
    )
    log(
        info,
        f"total ranks {sum(final.values())} of budget {rank_budget}; "
        f"most common rank {Counter(final.values()).most_common(1)[0][0]}; best dev loss {best_loss:.4f}",
    )
    log(
        info,
        f"outputs in {output_dir}: adapter/, "
        + ("" if identity_gates else "best_adapter/, ")
        + "allocation/, metrics.jsonl, "
        "config.json, summary.json, ranks.png, checkpoints/"
        + (", tensorboard/" if "tensorboard" in cfg.report_to else "")
        + (", base_model/" if random_init else ""),
    )
    D.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

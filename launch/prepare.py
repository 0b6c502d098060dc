"""Everything before the first training step (launch/train.py): every input checked while
nothing is started or written yet (`prepare`), then the processes, the run directory, the model,
its adapters and the engine (`start`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alora_ds.config import (
    TrainConfig,
    load_ds_config,
    resolve_batch_sizes,
    resolve_ds_config,
    to_json,
)
from alora_ds.core.allocation import parameter_count, resolve_prune_count
from alora_ds.core.inject import (
    count_parameters,
    find_target_modules,
    initial_rank,
    inject_gated_lora,
)
from alora_ds.core.schedule import Schedule, make_schedule
from alora_ds.errors import InputError
from alora_ds.io.checkpoint import find_checkpoint
from alora_ds.io.examples import collate, shard_batches
from alora_ds.io.files import atomic_write_json, open_permissions_under
from alora_ds.io.models import (
    TINY_LLAMA_CONFIG,
    check_load_in_4bit,
    empty_causal_lm,
    empty_from_config,
    load_base_model,
    load_tokenizer,
    resolve_attn_implementation,
)
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.io.run_dir import RUN_MARKER, check_output_dir, check_resume_config, holds_run
from alora_ds.io.splits import SplitStats, build_split, check_task
from alora_ds.methods import Method, MethodSettings, build_method
from alora_ds.report.tracking import (
    LOG_FILE,
    check_report_to,
    log_to_file,
    print_line,
    quiet_library_noise,
)
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.cpu import keep_freed_memory
from alora_ds.runtime.engine import Engine
from alora_ds.runtime.slurm import slurm_environment
from alora_ds.runtime.zero import zero_stage
from alora_ds.scoring.cost import ModuleSite, RoundCost, describe, round_cost, site_of
from alora_ds.scoring.fast import LlamaStack, max_rows_for_length
from alora_ds.scoring.screened import first_candidates
from launch.faults import Faults
from launch.state import ScoringForecast


@dataclass
class Setup:
    """A run's inputs, all checked, and what they resolve to."""

    cfg: TrainConfig
    output_dir: Path
    resume_path: Path | None  # the checkpoint to resume from
    restart: bool  # `--resume_from_checkpoint auto` on a run that died before its first one
    world_size: int
    ds_config: dict[str, Any]
    tokenizer: Any
    train_examples: list[dict]
    dev_examples: list[dict]
    stats: tuple[SplitStats, SplitStats]  # train, dev
    global_batch: int
    method: Method
    pools: tuple[list[int], ...]  # the training examples each kind of step reads
    pool_steps: list[int]  # optimizer steps per epoch of each pool
    schedule: Schedule
    rank_budget: int
    start_budget: int
    r_init: int
    val_examples: int  # |B_val| as resolved (at most the dev split)
    round_cost: RoundCost | None = None  # one AB-LoRA round's work (methods that score so)
    naive_cost: RoundCost | None = None  # the same round scored the naive way, for comparison
    notes: tuple[str, ...] = ()  # more lines for the banner (where an alias's checkpoint is)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def banner(self, world_size: int, backend: str, dtype: torch.dtype) -> list[str]:
        """What the run prints at start: what runs where, the batch arithmetic, data, schedule."""
        cfg = self.cfg
        lines = [
            f"alora-ds: {cfg.method} on {cfg.task}, {world_size} process(es), "
            f"ZeRO stage {zero_stage(self.ds_config)}, {str(dtype).removeprefix('torch.')}, "
            f"backend {backend}",
            f"batch: micro {cfg.per_device_train_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} x {world_size} processes = {self.global_batch} "
            "examples per optimizer step",
            f"data: train {self.stats[0].describe()}; dev {self.stats[1].describe()}",
        ]
        if self.val_examples < cfg.val_examples and self.schedule.round_after:
            lines.append(
                f"warning: the dev split has {len(self.dev_examples)} examples, fewer than "
                f"|B_val| = {cfg.val_examples}; scoring uses all {self.val_examples}"
            )
        lines.append(
            f"schedule: {self.schedule.steps_per_epoch} steps per epoch, "
            f"{self.schedule.total_steps} steps, warm-up {self.schedule.warmup_steps}, rounds "
            f"after steps {list(self.schedule.round_after)}"
        )
        if self.round_cost is not None and self.schedule.round_after:
            lines.append(describe(self.round_cost, self.naive_cost))
        return [*self.notes, *lines]

    def outputs_line(self, *, base_model: bool) -> str:
        cfg = self.cfg
        return (
            f"outputs in {self.output_dir}: adapter/, adapter_portable/, "
            + (
                "best_adapter/, best_adapter_portable/, "
                if self.method.fits_budget_while_training
                else ""
            )
            + "allocation/, train.log, metrics.jsonl, loss.png, config.json, summary.json, "
            "ranks.png, checkpoints/"
            + (", tensorboard/" if "tensorboard" in cfg.report_to else "")
            + (", base_model/" if base_model else "")
        )


def prepare(cfg: TrainConfig) -> Setup:
    """Check every input before anything is started or written."""
    # Aliases of models we can build offline ("smollm2"): converted once, then a local path,
    # which config.json records; so is the file a bare --ds_config name (zero3.json) resolves to.
    given = cfg
    cfg = dataclasses.replace(
        cfg,
        model_name_or_path=resolve_model_alias(cfg.model_name_or_path),
        tokenizer_name_or_path=resolve_model_alias(cfg.tokenizer_name_or_path),
        ds_config=resolve_ds_config(cfg.ds_config),
    )
    output_dir = Path(cfg.output_dir)
    resume_path = (
        find_checkpoint(output_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint and not cfg.overwrite_output_dir
        else None
    )
    # `auto` with no checkpoint yet: the run died before its first one (a requeued job); start
    # it again from scratch, once its options are checked to be the same run's.
    restart = resume_path is None and cfg.resume_from_checkpoint == "auto" and holds_run(output_dir)
    if resume_path is None:
        check_output_dir(output_dir, cfg.overwrite_output_dir or restart)
    # Under srun nothing has set WORLD_SIZE yet: map Slurm's variables first (a no-op under
    # deepspeed or torchrun, which set RANK).
    os.environ.update(slurm_environment(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = resolve_batch_sizes(load_ds_config(cfg.ds_config), cfg, world_size, cfg.ds_config)
    zero.check_dtype_supported(ds_config, cfg.ds_config)
    check_task(cfg.task)
    check_report_to(cfg.report_to)
    if cfg.load_in_4bit:
        check_load_in_4bit(cfg.model_name_or_path)
    tokenizer = load_tokenizer(
        cfg.tokenizer_name_or_path or cfg.model_name_or_path, cfg.trust_remote_code
    )
    train_examples, train_stats = build_split(
        cfg.task, cfg.train_file, "train", tokenizer, cfg.max_seq_length, cfg.dataset_name
    )
    dev_examples, dev_stats = build_split(
        cfg.task, cfg.validation_file, "validation", tokenizer, cfg.max_seq_length, cfg.dataset_name
    )
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if resume_path is not None or restart:
        check_resume_config(output_dir, to_json(cfg), global_batch)
    if cfg.skip_nonfinite and cfg.gradient_accumulation_steps > 1:
        raise InputError(
            "--skip_nonfinite needs --gradient_accumulation_steps 1 (a step whose gradients are "
            f"already partly accumulated cannot be dropped), got {cfg.gradient_accumulation_steps}"
        )
    method = build_method(cfg.method, method_settings(cfg))
    pools = method.data_pools(len(train_examples))
    pool_steps = [len(pool) // global_batch for pool in pools]  # steps per epoch of each pool
    if min(pool_steps) == 0:
        raise InputError(
            f"--method {cfg.method}: {min(len(p) for p in pools)} training examples per split are "
            f"fewer than one global batch of {global_batch}"
        )
    schedule = make_schedule(
        len(train_examples), global_batch, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, warmup_ratio=cfg.warmup_ratio,
        num_rounds=method.schedule_rounds(), initial_epochs=cfg.initial_epochs,
        round_epochs=cfg.round_epochs, initial_steps=cfg.initial_steps,
        round_steps=cfg.round_steps,
    )  # fmt: skip
    # The architecture on the meta device: target modules and budget checked before loading.
    skeleton = (
        empty_causal_lm(cfg.model_name_or_path, cfg.trust_remote_code)
        if cfg.model_name_or_path
        else empty_from_config(cfg.model_config or TINY_LLAMA_CONFIG)
    )
    module_names = find_target_modules(skeleton, cfg.target_modules)
    num_modules = len(module_names)
    rank_budget = cfg.rank_budget or 8 * num_modules
    start_budget = method.start_budget(rank_budget)
    r_init = initial_rank(start_budget, num_modules)
    check_start_rank(skeleton, module_names, r_init, rank_budget, start_budget)
    vocab = skeleton.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}"
        )
    val_examples = min(cfg.val_examples, len(dev_examples))
    costs = (
        scoring_costs(cfg, skeleton, module_names, r_init, dev_examples, val_examples, world_size)
        if method.scores_by_ablation
        else (None, None)
    )
    notes = tuple(
        f"model {name!r}: the converted checkpoint in {resolved} (converted once; "
        f"ALORA_DS_CACHE moves it)"
        for name, resolved in {
            given.model_name_or_path: cfg.model_name_or_path,
            given.tokenizer_name_or_path: cfg.tokenizer_name_or_path,
        }.items()
        if name is not None and name != resolved
    )
    return Setup(
        cfg, output_dir, resume_path, restart, world_size, ds_config, tokenizer, train_examples,
        dev_examples, (train_stats, dev_stats), global_batch, method, pools, pool_steps,
        schedule, rank_budget, start_budget, r_init, val_examples, *costs, notes=notes,
    )  # fmt: skip


def check_start_rank(
    skeleton: torch.nn.Module, names: list[str], r_init: int, rank_budget: int, start_budget: int
) -> None:
    """Refuse a starting rank above min(d_in, d_out) of an adapted module: B A of such a module
    has rank min(d_in, d_out) at most, so the extra ranks only cost parameters and scoring."""
    sides = {}
    for name in names:
        module = skeleton.get_submodule(name)  # sizes from in/out_features: weights are on meta
        sides[name] = (module.in_features, module.out_features)
    name = min(names, key=lambda n: min(sides[n]))
    smallest = min(sides[name])
    if r_init <= smallest:
        return
    factor = start_budget // rank_budget
    starts = f" (the method starts at {factor} x the budget)" if factor > 1 else ""
    raise InputError(
        f"--rank_budget {rank_budget} starts every one of the {len(names)} adapted modules at "
        f"r_init = {r_init}{starts}, above what {name} can use ({sides[name][0]} -> "
        f"{sides[name][1]}: at most min(d_in, d_out) = {smallest} ranks); the most this model "
        f"takes is --rank_budget {smallest // factor * len(names)}"
    )


def scoring_costs(
    cfg: TrainConfig,
    skeleton: torch.nn.Module,
    names: list[str],
    r_init: int,
    dev_examples: list[dict],
    val_examples: int,
    world_size: int,
) -> tuple[RoundCost | None, RoundCost | None]:
    """The first round's work with --scoring and with the naive scorer (per process), counted
    on the meta-device skeleton; None when the scorer cannot run it the fast way (not a
    LLaMA-style model: the engine then scores naively)."""
    if not LlamaStack.supports(skeleton):
        return None, None
    decoder_layers = {id(layer) for layer in skeleton.model.layers}
    prefixes = [n for n, m in skeleton.named_modules() if id(m) in decoder_layers]
    layers = {prefix: index for index, prefix in enumerate(prefixes)}
    sites = [ModuleSite(*site_of(name, layers), r_init) for name in names]
    chunk = cfg.scoring_batch_size
    chunk_rows = [min(chunk, val_examples - i) for i in range(0, val_examples, chunk)]
    longest = max(len(e["input_ids"]) for e in dev_examples)
    live = r_init * len(names)
    n_prune = resolve_prune_count(cfg.prune_per_round, live)
    settings = dict(
        num_layers=len(layers), chunk_rows=chunk_rows, world_size=world_size,
        max_rows=cfg.scoring_max_rows or max_rows_for_length(longest),
        exact_ranks=first_candidates(cfg.screen_candidates, n_prune),
    )  # fmt: skip
    return round_cost(cfg.scoring, sites, **settings), round_cost("naive", sites, **settings)


def method_settings(cfg: TrainConfig) -> MethodSettings:
    return MethodSettings(
        seed=cfg.seed,
        num_rounds=cfg.num_rounds,
        prune_per_round=cfg.prune_per_round,
        sora_lambda=cfg.sora_lambda,
        val_examples=cfg.val_examples,
        scoring=cfg.scoring,
        scoring_batch_size=cfg.scoring_batch_size,
        scoring_max_rows=cfg.scoring_max_rows,
        screen_candidates=cfg.screen_candidates,
        screen_verify=cfg.screen_verify,
        screen_exact_means=cfg.screen_exact_means,
    )


def write_run_config(setup: Setup, world_size: int, dtype: torch.dtype) -> None:
    """config.json: the options and what they resolved to; it marks the directory as a run."""
    (setup.output_dir / "allocation").mkdir(parents=True)
    atomic_write_json(
        setup.output_dir / RUN_MARKER,
        {
            **to_json(setup.cfg),
            "resolved": {
                "world_size": world_size,
                "rank_budget": setup.rank_budget,
                "r_init": setup.r_init,
                "n_prune": setup.cfg.prune_per_round,
                "global_batch": setup.global_batch,
                "total_steps": setup.schedule.total_steps,
                "round_after": list(setup.schedule.round_after),
                "zero_stage": zero_stage(setup.ds_config),
                "dtype": str(dtype),
                "val_examples": setup.val_examples,
            },
        },
    )


@dataclass
class Run:
    """The started run: what the loop reads and never changes (the engine rebuilds itself)."""

    setup: Setup
    info: P.DistInfo
    engine: Engine
    dev_batches: list  # this process's share of the dev split, for the dev loss
    rank_costs: dict[str, int]  # parameters one rank of each module costs
    initial_ranks: dict[str, int]
    param_budget: int | None  # the adapter parameter cap (--cap_parameters), or None
    base_name: str  # the base model the exported adapters name
    random_init: bool  # the base was built at random and saved in output_dir/base_model
    faults: Faults
    show_bars: bool
    forecast: ScoringForecast  # says once, after the first steps, what a scoring round will take

    @property
    def cfg(self) -> TrainConfig:
        return self.setup.cfg


def start(setup: Setup) -> Run:
    """Processes, model, adapters, engine; the run directory on a fresh start."""
    cfg = setup.cfg
    if not torch.cuda.is_available():
        keep_freed_memory()  # see alora_ds/runtime/cpu.py: tens of MB page-faulted in at every op
    info = P.init_distributed(cfg.dist_timeout)
    quiet_library_noise(info.is_main)
    if info.world_size != setup.world_size:
        raise InputError(
            f"WORLD_SIZE is {setup.world_size} but the process group has {info.world_size}"
        )
    torch.manual_seed(cfg.seed)
    dtype = zero.model_dtype(setup.ds_config)
    if info.is_main and setup.resume_path is None:
        if setup.output_dir.exists() and (cfg.overwrite_output_dir or setup.restart):
            shutil.rmtree(setup.output_dir)
        write_run_config(setup, info.world_size, dtype)
    if info.is_main:  # every log line from here on also goes to the run's own log file
        log_to_file(setup.output_dir / LOG_FILE)
    for line in setup.banner(info.world_size, info.backend, dtype):
        log(info, line)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    log(info, f"attention: {attn}; gradient checkpointing: {cfg.gradient_checkpointing}")
    model, random_init = load_base_model(
        cfg.model_name_or_path, cfg.model_config, dtype=dtype, attn_implementation=attn,
        seed=cfg.seed, loading_context=zero.partitioned_loading(setup.ds_config),
        load_in_4bit=cfg.load_in_4bit, trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    model.config.use_cache = False
    base_name = cfg.model_name_or_path
    if random_init:  # saved once, so every adapter can be loaded by peft on its own
        base_dir = setup.output_dir / "base_model"
        if setup.resume_path is None:
            state_dict = zero.full_state_dict(model, info.is_main)
            if info.is_main:
                model.save_pretrained(base_dir, state_dict=state_dict)
                setup.tokenizer.save_pretrained(base_dir)
                open_permissions_under(base_dir)  # safetensors writes 0600 whatever the umask
            del state_dict
        base_name = str(base_dir.resolve())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    method = setup.method
    modules = inject_gated_lora(
        model, setup.start_budget, target_modules=cfg.target_modules, lora_alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout, seed=cfg.seed, gate_kind=method.gate_kind, dtype=dtype,
    )  # fmt: skip
    model.to(info.device)
    log(info, f"adapters: {len(modules)} modules, r_init = {setup.r_init}, budget "
              f"{setup.rank_budget} ranks; {count_parameters(model)}")  # fmt: skip
    settings = zero.OptimizerSettings(
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    engine = Engine(model, setup.ds_config, settings, info)
    rank_costs = {name: m.params_per_rank for name, m in modules.items()}
    method.setup(list(modules), setup.r_init, setup.schedule)
    faults = Faults.from_env(info.rank)
    faults.watch(engine)
    dev_batches = shard_batches(
        setup.dev_examples, cfg.per_device_train_batch_size, rank=info.rank,
        world_size=info.world_size, pad_token_id=setup.pad_id, device=info.device,
    )  # fmt: skip
    initial_ranks = engine.rank_map()
    param_budget = parameter_count(initial_ranks, rank_costs) if cfg.cap_parameters else None
    forecast = ScoringForecast(
        setup.round_cost, lambda rows: timed_dev_forward(setup, engine, rows)
    )
    return Run(setup, info, engine, dev_batches, rank_costs, initial_ranks, param_budget,
               base_name, random_init, faults, show_bars=info.is_main and cfg.progress_bar,
               forecast=forecast)  # fmt: skip


def timed_dev_forward(setup: Setup, engine: Engine, rows: int) -> float:
    """Seconds of one no_grad forward of `rows` dev examples (repeated when the split holds fewer),
    as the scorers run them; collective under ZeRO-3, like every forward."""
    dev = setup.dev_examples
    examples = [dev[i % len(dev)] for i in range(rows)]
    batch = {k: v.to(engine.info.device) for k, v in collate(examples, setup.pad_id).items()}
    started = time.perf_counter()
    engine.dev_loss([batch])
    return time.perf_counter() - started


def log(info: P.DistInfo, message: str) -> None:
    """A log line, on the main process only."""
    if info.is_main:
        print_line(message)  # through tqdm, so an open progress bar is redrawn below it

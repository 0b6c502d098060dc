"""The training loop's state (launch/train.py), what it logs and exports, and the checkpoints
that carry it across launches: written at round boundaries and every --save_steps, read back by
--resume_from_checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alora_ds.io.checkpoint import (
    flatten_states,
    list_checkpoints,
    read_checkpoint,
    unflatten_states,
    write_checkpoint,
)
from alora_ds.io.files import atomic_write_json
from alora_ds.io.peft_portable import portable_dir, write_portable_adapter
from alora_ds.io.peft_write import lora_config, write_peft_adapter
from alora_ds.io.run_dir import rewind
from alora_ds.methods import Method
from alora_ds.report.summary import plot_loss_curves, plot_rank_heatmap, rank_scale
from alora_ds.report.tracking import read_metrics
from alora_ds.runtime import process as P
from alora_ds.runtime.engine import Engine
from alora_ds.scoring.cost import RoundCost, seconds
from launch.faults import Faults


@dataclass
class LoopState:
    """Where the loop is. The first fields are what a checkpoint carries (trainer_state.json)."""

    step: int = 0  # optimizer steps done
    round_index: int = 0  # rounds done
    history: list[dict] = field(default_factory=list)  # per round: ranks and scores
    best_loss: float = float("inf")
    evals_without_gain: int = 0
    skipped_steps: int = 0
    wall_s: float = 0.0  # wall time of the run's earlier launches
    tokens: float = 0.0  # this process's training tokens (+ everyone's before a resume, on 0)
    peak_params: int = 0  # the most adapter parameters held at any time
    # Not checkpointed: the logging window and this launch's start.
    tokens_seen: float = 0.0
    window_start: float = field(default_factory=time.perf_counter)
    launch_start: float = field(default_factory=time.perf_counter)
    tokens_per_s: float | None = None

    def saved(self) -> dict:
        return {
            "step": self.step, "round_index": self.round_index, "history": self.history,
            "best_loss": self.best_loss, "evals_without_gain": self.evals_without_gain,
            "skipped_steps": self.skipped_steps, "tokens": self.tokens,
            "wall_s": self.wall_s + time.perf_counter() - self.launch_start,
            "peak_params": self.peak_params,
        }  # fmt: skip


@dataclass
class ScoringForecast:
    """Says once, after the first training steps of a launch, how long an AB-LoRA scoring round
    will take: the round's counted calls (Setup.round_cost) timed by two forwards of dev rows,
    a chunk's and a large block's (a forward's time is then per call + per row: on small models
    the per-call part dominates, on large ones the per-row part), and set against the time of a
    training step. The launch's first step is left out of the timing (ZeRO and the allocator
    warm up in it)."""

    cost: RoundCost | None
    forward_s: Callable[[int], float]  # seconds of one no_grad forward of n dev rows (collective)
    timed_steps: int = 3
    _start: tuple[int, float] | None = None  # (step, time) after the launch's first step
    _said: bool = False

    def after_step(self, step: int, rounds_ahead: Sequence[int]) -> list[str]:
        """Call after every optimizer step, on every process (the forwards are collective), with
        the steps the remaining rounds come after; returns the line to log, once."""
        if self.cost is None or self._said or not rounds_ahead:
            return []
        now = time.perf_counter()
        if self._start is None:
            self._start = (step, now)
            return []
        first, started = self._start
        timed = step - first
        if timed < self.timed_steps and step != rounds_ahead[0]:
            return []
        self._said = True
        step_s = (now - started) / timed
        small = min(p.rows for p in self.cost.passes)
        large = max(2 * small, max(p.rows for p in self.cost.passes))
        # Each twice, the faster kept: a first forward of a new shape pays for its memory.
        small_s, large_s = (
            min(self.forward_s(round(rows)) for _ in range(2)) for rows in (small, large)
        )
        per_row = max(large_s - small_s, 0.0) / (round(large) - round(small))
        per_call = max(small_s - per_row * round(small), 0.0)
        round_s = seconds(self.cost, per_call, per_row)
        return [
            f"scoring estimate: a round takes about {round_s:.1f} s, the time of "
            f"{round_s / step_s:.1f} training steps (steps {first + 1}-{step}: {step_s:.2f} s "
            f"each; a forward of {round(small)} dev rows {small_s:.2f} s, of {round(large)} "
            f"{large_s:.2f} s)"
        ]


def log_record(
    state: LoopState, sink, info: P.DistInfo, schedule, lr: float, loss, extra: dict
) -> str:
    """Log step `state.step` to the metric sinks (collective: the tokens are summed over the
    processes); returns the console line."""
    elapsed = time.perf_counter() - state.window_start
    tokens = P.all_reduce_sum([state.tokens_seen], info.device)[0]
    record = {
        "step": state.step,
        "epoch": round(state.step / schedule.steps_per_epoch, 4),
        "loss": None if loss is None else float(loss.detach()),  # a skipped step has none
        **({"skipped_steps": state.skipped_steps} if state.skipped_steps else {}),
        "lr": lr,
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
        **extra,
    }
    state.tokens_seen, state.window_start = 0.0, time.perf_counter()
    state.tokens_per_s = record["tokens_per_s"]
    sink.log(record, step=state.step)
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def draw_plots(
    output_dir: Path,
    initial_ranks: dict[str, int],
    history: Sequence[dict],
    round_steps: Sequence[int],
    final: dict[str, int] | None = None,
) -> None:
    """loss.png (training and dev loss, the rounds marked) and the rank heatmaps, every one on
    the same colour scale: after a round its own heatmap (on the scale of the maps so far); at
    the end (`final` given) every round's again and ranks.png, on the scale of all of them.
    Main process only."""
    maps = [initial_ranks, *(entry["ranks_after"] for entry in history)]
    scale = rank_scale(*maps, *([final] if final is not None else []))
    for entry in history if final is not None else history[-1:]:
        plot_rank_heatmap(
            entry["ranks_after"], output_dir / "allocation" / f"ranks_round_{entry['round']:02d}.png",
            title=f"LoRA ranks after round {entry['round']}", vmax=scale,
        )  # fmt: skip
    if final is not None:
        plot_rank_heatmap(final, output_dir / "ranks.png", vmax=scale)
    plot_loss_curves(
        read_metrics(output_dir), output_dir / "loss.png", round_steps=round_steps[: len(history)]
    )


def export_adapter(engine: Engine, directory: Path, base_name: str | None, metadata: dict) -> None:
    """The adapters as a PEFT adapter directory, and its portable twin beside it (`directory` +
    `_portable`: one rank and one scale for every module, for vLLM and llama.cpp); gathered on
    every process, written by the main one."""
    tensors = engine.adapter_tensors()
    if engine.info.is_main:
        write_peft_adapter(tensors, directory, base_model_name_or_path=base_name, metadata=metadata)
        write_portable_adapter(
            tensors, portable_dir(directory), base_model_name_or_path=base_name, metadata=metadata
        )
    P.barrier()


def write_allocation_config(
    engine: Engine, output_dir: Path, base_name: str | None, lora_dropout: float
) -> None:
    """allocation/lora_config.json: a PEFT LoraConfig whose rank_pattern is the final allocation
    and whose alpha_pattern keeps every module's trained scale, for a fresh run of any
    peft-based trainer (`get_peft_model(model, LoraConfig(**json))`). Main process only."""
    live = {name: module for name, module in engine.modules.items() if module.r > 0}
    if engine.info.is_main and live:
        config = lora_config(
            {name: module.r for name, module in live.items()},
            {name: module.scale for name, module in live.items()},
            base_model_name_or_path=base_name, lora_dropout=lora_dropout, inference_mode=False,
        )  # fmt: skip
        atomic_write_json(output_dir / "allocation" / "lora_config.json", config)


def last_checkpoint(output_dir: Path) -> str:
    """What a failure message says is left to resume from."""
    previous = list_checkpoints(output_dir)
    if not previous:
        return "no checkpoint has been written yet"
    return f"the last good checkpoint is {previous[-1]}"


def save(
    engine: Engine, method: Method, state: LoopState, output_dir: Path, *, keep: int,
    global_batch: int, faults: Faults,
) -> str | None:  # fmt: skip
    """A checkpoint of everything the loop needs to go on from `state.step` (collective; the
    main process writes). Returns why the write failed, on every process, or None."""
    info = engine.info
    tensors = flatten_states(engine.read_states())
    rng = P.gathered_rng_states(info)
    tensors.update(method.state_tensors())
    trainer_state = {
        **state.saved(), "rank_map": engine.rank_map(),
        "optimizer_step": engine.optimizer_step_count(), "world_size": info.world_size,
        "global_batch": global_batch,
        # Every process's tokens: each counts only its own, and only process 0's state is saved.
        "tokens": P.all_reduce_sum([state.tokens], info.device)[0],
    }  # fmt: skip
    failure = None
    if info.is_main:
        faults.before_save(state.step)
        try:
            write_checkpoint(output_dir, state.step, tensors, rng, trainer_state, keep=keep)
        except OSError as exc:
            failure = f"{exc.strerror or exc} ({exc.filename or output_dir})"
    if P.all_agree(failure is None, info.device):
        return None
    return failure or "see process 0"


def resume(
    path: Path, engine: Engine, method: Method, output_dir: Path, seed: int,
    log: Callable[[str], None],
) -> LoopState:  # fmt: skip
    """The loop state of checkpoint `path`, with the adapters, Adam's state, the method's
    statistics and the random generators put back; the logs are rewound to it."""
    info = engine.info
    checkpoint = read_checkpoint(path)
    saved = checkpoint.state
    states = unflatten_states(checkpoint.tensors, list(engine.modules), str(path))
    engine.install(states, saved["optimizer_step"])
    assert engine.rank_map() == saved["rank_map"]
    method.load_state_tensors(checkpoint.tensors)
    same_rng = P.restore_rng(checkpoint.rng, info)
    state = LoopState(**{key: saved[key] for key in LoopState().saved()})
    if not info.is_main:  # the saved count is every process's: the summary's sum counts it once
        state.tokens = 0.0
    if info.is_main:  # what the interrupted run logged after its checkpoint is redone
        rewind(output_dir, state.step, state.round_index)
    log(
        f"resumed from {path} at step {state.step}, round {state.round_index}"
        + ("" if same_rng else "; random generators re-seeded (different process count)")
    )
    if not same_rng:
        torch.manual_seed(seed + state.step)
    return state

"""Train a LLaMA-family model with ALoRA (or a method it is compared with) under DeepSpeed.

    deepspeed --num_gpus N launch/train.py --ds_config ds_configs/zero3.json \\
        [--config configs/X.yaml] [--key value ...]

Read top to bottom: `prepare` checks every input before anything starts, `start` builds the
processes, the (partitioned) model, its adapters and the engine, then one loop for every method:

    batch -> forward -> backward -> step -> (round boundary? score, plan, rebuild) -> log

`finish` prunes to the budget where the method says so and writes the adapter and the summary.
The method (alora_ds.methods) decides only what differs between methods; nothing here tests
which one runs.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Runnable as `python launch/train.py` and `deepspeed launch/train.py` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alora_ds.config_help import answer_early

if __name__ == "__main__":  # --help, and options that do not parse, before torch is imported
    answer_early(sys.argv[1:])

import torch

from alora_ds.config import parse_args, to_json
from alora_ds.core.allocation import (
    NonFiniteScore,
    check_scores,
    parameter_count,
    plan_round,
    pruned_by_module,
    resolve_prune_count,
)
from alora_ds.core.schedule import micro_batch_indices
from alora_ds.errors import RunFailure, run_cli
from alora_ds.io.examples import collate
from alora_ds.io.files import atomic_write_json
from alora_ds.methods.base import RoundInputs
from alora_ds.report.summary import final_rank_lines, summarize_run
from alora_ds.report.tracking import (
    MetricsSink,
    ScoringProgress,
    TrainProgress,
)
from alora_ds.runtime import process as P
from launch.prepare import Run, log, prepare, start
from launch.state import (
    LoopState,
    draw_plots,
    export_adapter,
    last_checkpoint,
    log_record,
    resume,
    save,
    write_allocation_config,
)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return train(argv)
    except RuntimeError as exc:
        if not P.is_collective_failure(exc):
            raise
        # A peer died or stopped answering within --dist_timeout: say so in one line.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFailure(
            f"lost contact with another process ({first}); resume with "
            "--resume_from_checkpoint auto"
        ) from exc


def train(argv: Sequence[str] | None = None) -> int:
    setup = prepare(parse_args(sys.argv[1:] if argv is None else argv))
    run = start(setup)
    if setup.resume_path is not None:
        state = resume(setup.resume_path, run.engine, setup.method, setup.output_dir,
                       setup.cfg.seed, lambda line: log(run.info, line))  # fmt: skip
    else:  # "equal budget" is checkable: the peak starts at the start
        state = LoopState(peak_params=parameter_count(run.initial_ranks, run.rank_costs))
    sink = MetricsSink(
        setup.output_dir, is_main=run.info.is_main, report_to=setup.cfg.report_to,
        run_config=to_json(setup.cfg), resume_step=state.step if setup.resume_path else None,
    )  # fmt: skip
    progress = TrainProgress(setup.schedule.total_steps, enabled=run.show_bars, initial=state.step)
    with sink, progress:  # closed, and the bar cleared, before any error line is printed
        going = True
        while going and state.step < setup.schedule.total_steps:
            loss, stepped = train_step(run, state)
            state.step += 1
            run.faults.fire("step", state.step)
            going = after_step(run, state, loss, stepped, sink, progress)
    finish(run, state)
    return 0


def train_step(run: Run, state: LoopState) -> tuple[torch.Tensor, bool]:
    """One optimizer step: the method's part of it, the micro-batches, the hooks. Returns the
    last micro-batch's loss and whether the step was taken (a non-finite one may be skipped)."""
    setup, cfg, engine, info, step = run.setup, run.cfg, run.engine, run.info, state.step
    lr = setup.schedule.lr_at(step, cfg.learning_rate)
    part = setup.method.step_part(step)  # which data pool, which part of the adapters
    engine.model.train()
    engine.set_trained_part(part.trains)
    engine.set_learning_rates(lr * (part.trains != "gates"), lr * (part.trains != "weights"))
    pool = setup.pools[part.pool]
    micro_batches = micro_batch_indices(
        len(pool), seed=cfg.seed + part.pool, step=part.pool_step,
        steps_per_epoch=setup.pool_steps[part.pool], micro_batch=cfg.per_device_train_batch_size,
        accumulation=cfg.gradient_accumulation_steps, world_size=info.world_size, rank=info.rank,
    )  # fmt: skip
    for micro, indices in enumerate(micro_batches):
        examples = [setup.train_examples[pool[i]] for i in indices]
        batch = {k: v.to(info.device) for k, v in collate(examples, setup.pad_id).items()}
        loss = run.faults.poison(engine.loss(batch), step + 1)
        # One process's NaN must stop (or skip) every process: agree before the backward.
        if not P.all_agree(bool(torch.isfinite(loss.detach())), info.device):
            if not cfg.skip_nonfinite:
                raise RunFailure(
                    f"the loss is not finite at step {step + 1}; "
                    f"{last_checkpoint(setup.output_dir)}; resume from it with a lower "
                    "--learning_rate, or pass --skip_nonfinite to skip such steps"
                )
            # gradient_accumulation_steps is 1 (checked at start): nothing is accumulated yet,
            # so leaving out backward and step leaves weights and Adam untouched.
            state.skipped_steps += 1
            log(
                run.info,
                f"step {step + 1}: non-finite loss, step skipped ({state.skipped_steps} so far)",
            )
            return loss, False
        engine.backward(loss)
        if micro == len(micro_batches) - 1:  # the step's whole gradient exists only now
            setup.method.after_backward(step + 1, engine)
        engine.step()
        tokens = float(batch["attention_mask"].sum())
        state.tokens_seen, state.tokens = state.tokens_seen + tokens, state.tokens + tokens
    setup.method.after_step(step + 1, lr, engine)
    return loss, True


def after_step(run: Run, state: LoopState, loss: torch.Tensor, stepped: bool, sink, bar) -> bool:
    """What is due after optimizer step `state.step`: a round, the dev loss, a log line, a
    checkpoint. False when early stopping ends the run."""
    setup, cfg, schedule, done = run.setup, run.cfg, run.setup.schedule, state.step
    record: dict = {}
    rounds = schedule.round_after
    for line in run.forecast.after_step(done, rounds[state.round_index :]):
        log(run.info, line)
    if (
        setup.method.allocates
        and state.round_index < len(rounds)
        and done == rounds[state.round_index]
    ):
        record.update(allocation_round(run, state))
    since_rounds = done - schedule.last_round_step
    if since_rounds > 0 and (since_rounds % cfg.eval_steps == 0 or done == schedule.total_steps):
        record["dev_loss"] = evaluate(run, state)
    lr = schedule.lr_at(done - 1, cfg.learning_rate)
    if done % cfg.logging_steps == 0 or record or done == schedule.total_steps:
        log(
            run.info,
            log_record(state, sink, run.info, schedule, lr, loss if stepped else None, record),
        )
    bar.update(done, loss=float(loss.detach()), lr=lr, tokens_per_s=state.tokens_per_s)
    if done < schedule.total_steps and (
        "round" in record or (cfg.save_steps and done % cfg.save_steps == 0)
    ):
        failure = save(run.engine, setup.method, state, setup.output_dir, keep=cfg.save_total_limit,
                       global_batch=setup.global_batch, faults=run.faults)  # fmt: skip
        if failure is not None:
            raise RunFailure(f"could not write the checkpoint of step {done}: {failure}; "
                             f"{last_checkpoint(setup.output_dir)}")  # fmt: skip
    if state.evals_without_gain >= cfg.patience:
        log(
            run.info,
            f"early stopping at step {done}: no better dev loss in {cfg.patience} evaluations",
        )
        return False
    return True


def allocation_round(run: Run, state: LoopState) -> dict:
    """One round of Algorithm 1: scores -> plan -> rebuild (with the agreement check) -> round
    file. Returns the round's fields of the metrics record."""
    setup, cfg, engine = run.setup, run.cfg, run.engine
    state.round_index += 1
    index, started = state.round_index, time.perf_counter()
    scores = setup.method.round_scores(RoundInputs(
        index, engine, setup.dev_examples, setup.pad_id, run.info.device,
        progress=lambda n: ScoringProgress(n, enabled=run.show_bars, round_index=index),
    ))  # fmt: skip
    run.faults.fire("scoring", index)
    try:
        check_scores(scores.importance)
    except NonFiniteScore as exc:
        raise RunFailure(f"round {index}: {exc}; {last_checkpoint(setup.output_dir)}") from exc
    live = sum(len(v) for v in scores.importance.values())
    plan = plan_round(
        scores.importance, resolve_prune_count(cfg.prune_per_round, live),
        rank_costs=run.rank_costs, param_budget=run.param_budget,
    )  # fmt: skip
    scored_s = time.perf_counter() - started
    pruned = pruned_by_module(plan.pruned)
    engine.rebuild(pruned, plan.added, seed=cfg.seed, round_index=index)
    assert engine.rank_map() == plan.ranks_after
    setup.method.after_rebuild(pruned, plan.added)
    params = parameter_count(plan.ranks_after, run.rank_costs)
    state.peak_params = max(state.peak_params, params)
    assert sum(plan.ranks_after.values()) <= setup.rank_budget
    assert run.param_budget is None or params <= run.param_budget
    if run.info.is_main:
        allocation = setup.output_dir / "allocation"
        atomic_write_json(allocation / f"round_{index:02d}.json", {
            "round": index, "ranks_before": plan.ranks_before, "scores": scores.importance,
            "S_M": scores.s_m, "pruned": [list(p) for p in plan.pruned], "added": plan.added,
            "ranks_after": plan.ranks_after, **scores.extra,
        })  # fmt: skip
    state.history.append({"round": index, "S_M": scores.s_m, "scores": scores.importance,
                          "ranks_after": plan.ranks_after})  # fmt: skip
    if run.info.is_main:
        draw_plots(setup.output_dir, run.initial_ranks, state.history, setup.schedule.round_after)
    round_s = time.perf_counter() - started
    state.window_start += round_s  # tokens per second counts training time only
    types = dict(Counter(name.rsplit(".", 1)[-1] for name, _ in plan.pruned))
    log(run.info, f"round {index}: " + (f"S(M) {scores.s_m:.4f}, " if scores.s_m is not None else "")
        + f"pruned {len(plan.pruned)} {types}, added {sum(plan.added.values())} {plan.added}; "
        f"scored in {scored_s:.1f}s" + (f" ({scores.note})" if scores.note else ""))  # fmt: skip
    return {"round": index, "pruned": len(plan.pruned), "scoring_s": round(scored_s, 3),
            "rebuild_s": round(round_s - scored_s, 3)}  # fmt: skip


def evaluate(run: Run, state: LoopState) -> float:
    """The dev loss; a better one is kept as best_adapter/ where the adapters fit the budget."""
    dev_loss = run.engine.dev_loss(run.dev_batches)
    if dev_loss < state.best_loss:
        state.best_loss, state.evals_without_gain = dev_loss, 0
        if run.setup.method.fits_budget_while_training:
            export(run, state, "best_adapter")
    else:
        state.evals_without_gain += 1
    return dev_loss


def export(run: Run, state: LoopState, name: str) -> None:
    metadata = {"rank_map": run.engine.rank_map(), "rounds": state.history,
                "lora_alpha": run.cfg.lora_alpha, "r_init": run.setup.r_init}  # fmt: skip
    export_adapter(run.engine, run.setup.output_dir / name, run.base_name, metadata)


def finish(run: Run, state: LoopState) -> None:
    """Prune to the budget where the method says so, export, summarise."""
    setup, engine, info = run.setup, run.engine, run.info
    prune = setup.method.final_prune(engine, setup.rank_budget)
    if prune is not None:
        engine.rebuild(pruned_by_module(prune.pruned), {}, seed=run.cfg.seed, round_index=0)
        if info.is_main:
            atomic_write_json(setup.output_dir / "allocation" / "final_prune.json", {
                "gates": prune.gates, "pruned": [list(p) for p in prune.pruned],
                "ranks_after": engine.rank_map(),
            })  # fmt: skip
        log(run.info, f"{run.cfg.method}: {prune.zero_gates} gates at zero; pruned "
                 f"{len(prune.pruned)} ranks to the budget")  # fmt: skip
    export(run, state, "adapter")
    write_allocation_config(engine, setup.output_dir, run.base_name, run.cfg.lora_dropout)
    final = engine.rank_map()
    wall_s = state.wall_s + time.perf_counter() - state.launch_start
    peaks = P.peak_memory_bytes(info)
    tokens_total = P.all_reduce_sum([state.tokens], info.device)[0]
    if info.is_main:
        draw_plots(setup.output_dir, run.initial_ranks, state.history, setup.schedule.round_after,
                   final)  # fmt: skip
        summary = summarize_run(
            initial_ranks=run.initial_ranks, final_ranks=final, params_per_rank=run.rank_costs,
            peak_memory_bytes=peaks, wall_time_s=wall_s, tokens=int(tokens_total),
            adapter_params_peak=state.peak_params,
        )  # fmt: skip
        atomic_write_json(setup.output_dir / "summary.json", summary.to_dict())
        log(run.info, summary.to_text())
    for line in final_rank_lines(final, setup.rank_budget, state.best_loss):
        log(run.info, line)
    log(run.info, setup.outputs_line(base_model=run.random_init))
    P.barrier()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

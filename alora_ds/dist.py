"""Everything that touches DeepSpeed or torch.distributed, in one file.

A reader finds every collective here. The rest of the library is plain torch; the training
script calls these functions at fixed points (start, every step, every round, export).

Rules every function here keeps:
- Under ZeRO-3 every forward is a collective, so all processes run the same forwards in the same
  order; work is split by giving each process different gate values, never different forwards.
- Functions that gather (safe_get_*, GatheredParameters, all_gather) are called by every process
  in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from alora_ds.fast_scoring import (
    LlamaStack,
    ScoringStats,
    default_max_rows,
    fast_ablation_scores,
)
from alora_ds.inject import gated_modules, module_generator
from alora_ds.lora import (
    ADAPTER_PARAM_NAMES,
    GATE_PARAM_NAMES,
    GatedLoRALinear,
    kaiming_uniform_rows,
)
from alora_ds.scoring import (
    Batch,
    RankScores,
    ablation_scores,
    all_candidates,
    assemble_scores,
    eval_mode,
    reference_scores,
    supervised_loss_totals,
)

ADAM_STATE_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because a peer died or stayed silent past the
    timeout: NCCL raises DistError subclasses, gloo a plain RuntimeError from its transport."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)
    )


class AllocationMismatch(RuntimeError):
    """Processes disagree on the plan or on the rebuilt adapters: the run cannot go on."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---- process group --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, _, rest = head.partition("[")
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from Slurm's variables, for a
    script started by `srun` (one task per GPU) where no launcher set the usual ones."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))),
        # A port derived from the job id: the same on every node, different between jobs.
        "MASTER_PORT": env.get("MASTER_PORT")
        or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }
    return mapped


def _skip_cpu_shared_memory_all_reduce() -> None:
    """Let gloo do every CPU collective instead of DeepSpeed's shared-memory all-reduce op.

    That op is compiled at the first launch (a C++ compiler and about a minute), and every
    later launch takes a file lock in ~/.cache/torch_extensions to check it: a process killed
    while holding that lock (Ctrl-C at start-up, a scheduler's timeout) leaves the lock behind
    and every later run waits on it forever, silently. It also leaves a 68 MB /dev/shm buffer
    per process behind after every run. CPU runs are for tests and demos, where gloo's speed
    is enough; GPU runs use NCCL and never reach this op.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int) -> DistInfo:
    """Join (or, run as a plain script, create) the process group.

    Launched by deepspeed / torchrun the usual RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are set; under `srun` they are derived from Slurm's variables; run as
    `python launch/train.py` it becomes a group of one. `timeout_s` bounds every collective, so
    a dead peer ends the run instead of hanging it.
    """
    os.environ.update(slurm_environment(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        _skip_cpu_shared_memory_all_reduce()
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    dist.barrier()


def all_gather_tensor(value: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `value` (same shape everywhere), in rank order."""
    out = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(out, value.contiguous())
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every process iff `flag` is true on every process."""
    tensor = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor) == 0


# ---- ZeRO helpers ---------------------------------------------------------------------------


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def model_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    """The dtype the ds config trains in (its bf16 / fp16 sections)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def partitioned_loading(ds_config: Mapping[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, build or load the model with its weights partitioned as they are created,
    so no process ever holds the whole model. transformers' from_pretrained looks for an
    HfDeepSpeedConfig object, which must stay alive while loading."""
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(dict(ds_config))
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = None):
    """Gather ZeRO-3 partitioned parameters for the duration (a no-op for the others)."""
    partitioned = [p for p in params if is_partitioned(p)]
    return deepspeed.zero.GatheredParameters(
        partitioned, modifier_rank=modifier_rank, enabled=bool(partitioned)
    )


def adapter_params(modules: Mapping[str, GatedLoRALinear]) -> list[nn.Parameter]:
    """Every adapter parameter (modules with no rank hold none)."""
    params = (getattr(m, name) for m in modules.values() for name in m.trainable_names())
    return [p for p in params if p is not None]


# ---- engine ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


def create_engine(
    model: nn.Module, ds_config: Mapping[str, Any], settings: OptimizerSettings
) -> deepspeed.DeepSpeedEngine:
    """Wrap the model in a DeepSpeed engine with torch's AdamW over the trainable parameters.

    torch's AdamW rather than the ds config's "AdamW", which means FusedAdam and a 45 s compile on
    CPU. zero_force_ds_cpu_optimizer is off so that ZeRO-Offload accepts it.
    """
    # Gate logits (DNAS) get their own group, so that their learning rate can be set apart.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.endswith(GATE_PARAM_NAMES)]},
        {"params": [p for n, p in named if n.endswith(GATE_PARAM_NAMES)]},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    config = dict(ds_config)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def destroy_engine(engine: deepspeed.DeepSpeedEngine, model: nn.Module) -> None:
    """Release an engine so the same model can be wrapped again after its adapters changed.

    ZeRO-3 caches autograd hook classes in each module's __dict__ (pre_bwd_fn, post_bwd_fn); if
    they survive, the first backward of the next engine fails with a tracing error.
    """
    engine.destroy()
    for module in model.modules():
        module.__dict__.pop("pre_bwd_fn", None)
        module.__dict__.pop("post_bwd_fn", None)


def set_learning_rate(
    engine: deepspeed.DeepSpeedEngine, lr: float, gates_lr: float | None = None
) -> None:
    """Set the adapters' learning rate, and the gate logits' (second group, DNAS) to
    `gates_lr` (default: the same)."""
    for index, group in enumerate(engine.optimizer.param_groups):
        group["lr"] = lr if index == 0 or gates_lr is None else gates_lr


def _inner_optimizer(engine: deepspeed.DeepSpeedEngine) -> torch.optim.Optimizer:
    # ZeRO and the bf16 optimizer wrap the torch optimizer (which steps the fp32 partitions).
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_flat_params(engine: deepspeed.DeepSpeedEngine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps: ZeRO's and the bf16 optimizer's flat fp32
    partitions (ZeRO-3 only puts them into the param groups during its step), else the
    parameters themselves."""
    wrapper = engine.optimizer
    for attribute in (
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_groups_flat_partition",  # bf16 optimizer
    ):
        flats = getattr(wrapper, attribute, None)
        if flats:
            return [f for f in flats if f is not None]
    return [p for group in _inner_optimizer(engine).param_groups for p in group["params"]]


def optimizer_step_count(engine: deepspeed.DeepSpeedEngine) -> int:
    """Adam's step counter (the same for every parameter: they are all stepped together)."""
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _relink_optimizer_state(engine: deepspeed.DeepSpeedEngine) -> None:
    """ZeRO-1/2 link each parameter's fragment to Adam's state once, after the first step, but
    they step one param group at a time and link after the first group's step, when a second
    group (DNAS/SoRA/AdaLoRA gates) has no state yet; link again now that every group has it."""
    optimizer = engine.optimizer
    if getattr(optimizer, "_hp_optimizer_states_linked", None) is not None:
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _materialize_adam_state(engine: deepspeed.DeepSpeedEngine, step: int) -> None:
    """Create AdamW's state (zero moments, the given step) before the first step.

    torch creates it lazily at the first step, but surviving ranks' moments must be written into
    it now; DeepSpeed's fragment links to it are made lazily too, so make them as well.
    """
    inner = _inner_optimizer(engine)
    for param in _optimizer_flat_params(engine):
        state = inner.state[param]
        if not state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)
            for key in ADAM_STATE_KEYS:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


@dataclass
class AdapterState:
    """Full fp32 values and Adam moments of one module's adapter, plus its gates."""

    values: dict[str, torch.Tensor]  # lora_A (r, d_in), lora_B (d_out, r)[, gate_logits (r,)]
    moments: dict[str, dict[str, torch.Tensor]]  # param name -> exp_avg / exp_avg_sq
    gate: torch.Tensor  # (r,)


def _has_master_copy(param: torch.Tensor) -> bool:
    # ZeRO-1/2 and the bf16 optimizer give every trainable parameter an _hp_mapping attribute,
    # None on the processes that do not own a fragment of it; reading it is still collective,
    # so test for the attribute, not its value.
    return is_partitioned(param) or hasattr(param, "_hp_mapping")


def read_adapter_states(
    engine: deepspeed.DeepSpeedEngine, modules: Mapping[str, GatedLoRALinear]
) -> dict[str, AdapterState]:
    """The full fp32 master values and Adam moments of every adapter (collective under ZeRO).

    fp32 masters rather than the bf16 / fp16 working copies, so surviving ranks keep their exact
    values through a rebuild.
    """
    inner = _inner_optimizer(engine)
    stepped = optimizer_step_count(engine) > 0  # before the first step Adam has no state
    if stepped:
        _relink_optimizer_state(engine)
    states: dict[str, AdapterState] = {}
    for name, module in modules.items():
        values: dict[str, torch.Tensor] = {}
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for pname in module.trainable_names():
            param = getattr(module, pname)
            if param is None:  # a module with no rank left holds no parameter
                shape = tuple(module.adapter_tensor(pname).shape)
                values[pname] = torch.zeros(shape)
                moments[pname] = {key: torch.zeros(shape) for key in ADAM_STATE_KEYS}
                continue
            shape = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
            if _has_master_copy(param):
                values[pname] = safe_get_full_fp32_param(param).reshape(shape).float().cpu()
                moments[pname] = {
                    key: safe_get_full_optimizer_state(param, key).reshape(shape).float().cpu()
                    if stepped
                    else torch.zeros(shape)
                    for key in ADAM_STATE_KEYS
                }
            else:  # fp32 without ZeRO: the parameter is its own master copy
                values[pname] = param.detach().float().cpu().clone()
                state = inner.state.get(param, {})
                moments[pname] = {
                    key: state[key].float().cpu().clone() if key in state else torch.zeros(shape)
                    for key in ADAM_STATE_KEYS
                }
        states[name] = AdapterState(
            values, moments, module.lora_gate.detach().float().cpu().clone()
        )
    return states


def _set_full(param: torch.Tensor, value: torch.Tensor, key: str | None = None) -> None:
    """safe_set_full_fp32_param / safe_set_full_optimizer_state, also for a ZeRO-3 parameter
    whose size is not a multiple of the process count (DNAS's gate logits): DeepSpeed 0.19.8
    slices past the end of the value for the last, padded partition; here the slice is cut
    short and the padding zeroed."""
    if not is_partitioned(param) or param.ds_numel % dist.get_world_size() == 0:
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(
        param, release_swap_buffers=False, optim_state_key=key
    )
    size = partition.numel()
    start = size * optimizer._get_param_partition_rank(param)
    mine = value.flatten()[start : start + size]
    partition.data.zero_()
    partition.data[: mine.numel()].copy_(mine)


def write_adapter_states(
    engine: deepspeed.DeepSpeedEngine,
    modules: Mapping[str, GatedLoRALinear],
    states: Mapping[str, AdapterState],
    step: int,
) -> None:
    """Put exact fp32 masters and moments into a freshly created engine (no communication:
    every process writes its own partition of the same full tensors)."""
    _materialize_adam_state(engine, step)
    inner = _inner_optimizer(engine)
    for name, module in modules.items():
        for pname in module.trainable_names():
            param = getattr(module, pname)
            value = states[name].values[pname]
            if param is None:
                continue
            if _has_master_copy(param):
                device = param.device
                _set_full(param, value.to(device))
                for key in ADAM_STATE_KEYS:
                    _set_full(param, states[name].moments[pname][key].to(device), key)
            else:
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))
                for key in ADAM_STATE_KEYS:
                    inner.state[param][key].copy_(states[name].moments[pname][key])


def adapter_values_and_grads(
    engine: deepspeed.DeepSpeedEngine, modules: Mapping[str, GatedLoRALinear]
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Full fp32 value and (process-averaged) gradient of every A, B and gate logit (collective
    under ZeRO).

    Call it after the backward of the last micro-batch of a step and before engine.step(): that
    is the only moment DeepSpeed holds the step's whole gradient.
    """
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, module in modules.items():
        out[name] = {}
        for pname in module.trainable_names():
            param = getattr(module, pname)
            if param is None:
                continue
            if _has_master_copy(param):
                shape = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
                value = safe_get_full_fp32_param(param).reshape(shape).float().cpu()
                grad = safe_get_full_grad(param)
                grad = torch.zeros(shape) if grad is None else grad.reshape(shape).float().cpu()
            else:
                value = param.detach().float().cpu()
                grad = (
                    param.grad.float().cpu() if param.grad is not None else torch.zeros_like(value)
                )
            out[name][pname] = (value, grad)
    return out


@torch.no_grad()
def _write_trained(param: nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite a trained parameter between steps (collective under ZeRO-3): its fp32 master
    and its working copy, so the next forward and the next optimizer step both see `value`."""
    if _has_master_copy(param):
        _set_full(param, value.to(param.device))
    with gathered([param], modifier_rank=0):
        param.data.copy_(value.reshape(param.shape).to(param.device, param.dtype))


def _full_value(param: nn.Parameter) -> torch.Tensor:
    if _has_master_copy(param):
        return safe_get_full_fp32_param(param).float().cpu()
    return param.detach().float().cpu()


def proximal_gate_step(modules: Mapping[str, GatedLoRALinear], threshold: float) -> None:
    """SoRA's L1 proximal step on every gate after the optimizer step:
    g <- sign(g) max(|g| - threshold, 0) (collective under ZeRO)."""
    for module in modules.values():
        if module.gate_logits is not None:
            value = _full_value(module.gate_logits)
            _write_trained(
                module.gate_logits, torch.sign(value) * (value.abs() - threshold).clamp(min=0)
            )


def set_gate_values(modules: Mapping[str, GatedLoRALinear], gates: Mapping[str, list]) -> None:
    """Overwrite the identity gates (SoRA, AdaLoRA) of every module (collective under ZeRO)."""
    for name, module in modules.items():
        if module.gate_logits is not None:
            _write_trained(module.gate_logits, torch.tensor(gates[name], dtype=torch.float32))


def gate_value_scores(model: nn.Module) -> dict[str, list[float]]:
    """ALoRA-DNAS's importance: every live rank's relaxed gate value 2 sigmoid(a), on every
    process (the gate logits are gathered under ZeRO-3)."""
    modules = gated_modules(model)
    logits = [m.gate_logits for m in modules.values() if m.gate_logits is not None]
    with gathered(logits):
        return {
            name: m.gate_values().detach().float().cpu().tolist() if m.r else []
            for name, m in modules.items()
        }


# ---- allocation rounds ----------------------------------------------------------------------


def distributed_ab_lora_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    info: DistInfo,
    *,
    method: str = "fast",
    max_rows: int = 0,
    stats: ScoringStats | None = None,
    engine: deepspeed.DeepSpeedEngine | None = None,
    progress: Callable[[int], None] | None = None,
) -> RankScores:
    """AB-LoRA scores with the ablations shared out over the processes.

    `fast` (alora_ds.fast_scoring): prefix caching and candidate batching, each process with its
    own share of every (layer, half) group. `naive`: two full forwards per rank. Both exact.

    Every process runs the same number of forwards over the same batches (ZeRO-3 forwards are
    collective) but switches off different ranks in its own gate buffers: process p takes
    candidates p, p + W, p + 2W, ...; shorter shares are padded with no-op candidates. The
    (S(M \\ r), S(M_r)) pairs are all-gathered, so every process ends with every score.
    """
    if method == "fast" and LlamaStack.supports(model):

        def gather(local: torch.Tensor) -> list[torch.Tensor]:
            return [t.cpu() for t in all_gather_tensor(local.to(info.device))]

        # The fast path calls the decoder layers one by one, never the model's own forward,
        # where ZeRO-3 resets its fetch bookkeeping; without the reset every pass looks like
        # a step of one endless forward and the bookkeeping grows without bound.
        offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
        reset = offload.get_param_coordinator().reset_step if offload is not None else None
        return fast_ablation_scores(
            model,
            batches,
            max_rows=max_rows or default_max_rows(batches),
            rank=info.rank,
            world_size=info.world_size,
            gather=gather,
            stats=stats,
            start_of_pass=reset,
            progress=progress,
        )
    modules = gated_modules(model)
    candidates = all_candidates(modules)
    world = info.world_size
    per_process = -(-len(candidates) // world)
    share: list[tuple[str, int] | None] = list(candidates[info.rank :: world])
    share += [None] * (per_process - len(share))
    s_m, s_base = reference_scores(model, batches)
    mine = torch.tensor(ablation_scores(model, batches, share, progress), dtype=torch.float64)
    mine = mine.reshape(per_process, 2).to(info.device)
    everyone = [t.cpu() for t in all_gather_tensor(mine)]
    results = [tuple(everyone[i % world][i // world].tolist()) for i in range(len(candidates))]
    return assemble_scores(modules, s_m, s_base, candidates, results)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def check_agreement(
    info: DistInfo, round_index: int, plan: Mapping[str, Any], states: Mapping[str, AdapterState]
) -> None:
    """Prove that every process holds the same plan and the same rebuilt adapters.

    Each process hashes the plan and every module's full adapter tensors; the hashes are
    all-gathered and compared. On a mismatch every process raises the same error naming the
    first module that differs, so all of them stop: no hang, no silent divergence.
    """
    labels = ["the allocation plan"]
    digests = [_digest(json.dumps(plan, sort_keys=True).encode())]
    for name, state in states.items():
        labels.append(f"module {name}")
        payload = b"".join(
            state.values[p].contiguous().numpy().tobytes() for p in sorted(state.values)
        )
        digests.append(_digest(payload + state.gate.numpy().tobytes()))
    everyone = all_gather_tensor(torch.tensor(digests, dtype=torch.int64, device=info.device))
    table = torch.stack([t.cpu() for t in everyone])  # (world, 1 + modules)
    for column, label in enumerate(labels):
        differing = (table[:, column] != table[0, column]).nonzero().flatten().tolist()
        if differing:
            raise AllocationMismatch(
                f"after round {round_index}, process {differing[0]} disagrees with process 0 on "
                f"{label}: the processes no longer hold the same adapters"
            )


def plan_states(
    states: Mapping[str, AdapterState],
    pruned: Mapping[str, Sequence[int]],
    added: Mapping[str, int],
    *,
    seed: int,
    round_index: int,
) -> dict[str, AdapterState]:
    """The adapters after a round, as full tensors: pruned ranks removed, new ranks appended
    (A from module_generator(seed, round, name), B zero, gate on, zero moments)."""
    out: dict[str, AdapterState] = {}
    for name, state in states.items():
        r = state.gate.shape[0]
        drop = set(pruned.get(name, ()))
        keep = torch.tensor([i for i in range(r) if i not in drop], dtype=torch.long)
        k = added.get(name, 0)
        a, b = state.values["lora_A"], state.values["lora_B"]
        new_a = kaiming_uniform_rows(k, a.shape[1], module_generator(seed, round_index, name))
        values = {
            "lora_A": torch.cat([a.index_select(0, keep), new_a], dim=0),
            "lora_B": torch.cat([b.index_select(1, keep), torch.zeros(b.shape[0], k)], dim=1),
        }
        moments = {
            "lora_A": {
                key: torch.cat([m.index_select(0, keep), torch.zeros(k, a.shape[1])], dim=0)
                for key, m in state.moments["lora_A"].items()
            },
            "lora_B": {
                key: torch.cat([m.index_select(1, keep), torch.zeros(b.shape[0], k)], dim=1)
                for key, m in state.moments["lora_B"].items()
            },
        }
        gate = torch.cat([state.gate.index_select(0, keep), torch.ones(k)])
        if "gate_logits" in state.values:  # DNAS: new ranks start at a = 0 (g = 1)
            values["gate_logits"] = torch.cat(
                [state.values["gate_logits"].index_select(0, keep), torch.zeros(k)]
            )
            moments["gate_logits"] = {
                key: torch.cat([m.index_select(0, keep), torch.zeros(k)])
                for key, m in state.moments["gate_logits"].items()
            }
        out[name] = AdapterState(values, moments, gate)
    return out


def rebuild_engine(
    engine: deepspeed.DeepSpeedEngine,
    model: nn.Module,
    ds_config: Mapping[str, Any],
    settings: OptimizerSettings,
    info: DistInfo,
    plan: Mapping[str, Any],
    pruned: Mapping[str, Sequence[int]],
    added: Mapping[str, int],
    *,
    seed: int,
    round_index: int,
    corrupt: bool = False,
) -> deepspeed.DeepSpeedEngine:
    """Apply a round's plan to a running engine; returns the new engine.

    Every process reads the full fp32 adapters and moments (collective), computes the same new
    tensors from the same plan (no adapter value is broadcast), proves agreement with a checksum
    collective, then re-creates the engine, which partitions the new adapters again, and writes
    the exact masters and moments back. `corrupt` perturbs this process's adapters before the
    check (fault-injection for the tests).
    """
    modules = gated_modules(model)
    step = optimizer_step_count(engine)
    new_states = plan_states(
        read_adapter_states(engine, modules), pruned, added, seed=seed, round_index=round_index
    )
    if corrupt:
        first = next(iter(new_states.values()))
        first.values["lora_A"].add_(1.0)
    check_agreement(info, round_index, plan, new_states)
    return install_adapter_states(engine, model, ds_config, settings, info, new_states, step)


def install_adapter_states(
    engine: deepspeed.DeepSpeedEngine,
    model: nn.Module,
    ds_config: Mapping[str, Any],
    settings: OptimizerSettings,
    info: DistInfo,
    states: Mapping[str, AdapterState],
    step: int,
) -> deepspeed.DeepSpeedEngine:
    """Replace every adapter (any rank) with `states` and continue Adam at `step`: the engine is
    re-created, which partitions the new adapters, then the exact masters and moments are
    written back. Every process must pass the same states."""
    modules = gated_modules(model)
    destroy_engine(engine, model)
    dtype = model_dtype(ds_config)
    for name, module in modules.items():
        state = states[name]
        logits = state.values.get("gate_logits")
        module.set_adapter_tensors(
            state.values["lora_A"].to(info.device, dtype),
            state.values["lora_B"].to(info.device, dtype),
            state.gate.to(info.device, dtype),
            None if logits is None else logits.to(info.device, dtype),
        )
    new_engine = create_engine(model, ds_config, settings)
    write_adapter_states(new_engine, modules, states, step)
    return new_engine


# ---- checkpoints ------------------------------------------------------------------------------


def flatten_states(states: Mapping[str, AdapterState]) -> dict[str, torch.Tensor]:
    """AdapterStates as flat safetensors entries: `<module>.<param>`, `<module>.<param>.<moment>`
    and `<module>.lora_gate`."""
    flat: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        for pname in state.values:
            flat[f"{name}.{pname}"] = state.values[pname]
            for key in ADAM_STATE_KEYS:
                flat[f"{name}.{pname}.{key}"] = state.moments[pname][key]
        flat[f"{name}.lora_gate"] = state.gate
    return flat


def unflatten_states(
    flat: Mapping[str, torch.Tensor], names: Sequence[str], source: str
) -> dict[str, AdapterState]:
    """The inverse of flatten_states, for exactly the modules `names`."""
    missing = [n for n in names if f"{n}.lora_gate" not in flat]
    if missing:
        raise ValueError(f"{source} holds no adapter for module {missing[0]}")
    trained = ADAPTER_PARAM_NAMES + GATE_PARAM_NAMES
    return {
        name: AdapterState(
            values={p: flat[f"{name}.{p}"] for p in trained if f"{name}.{p}" in flat},
            moments={
                p: {key: flat[f"{name}.{p}.{key}"] for key in ADAM_STATE_KEYS}
                for p in trained
                if f"{name}.{p}" in flat
            },
            gate=flat[f"{name}.lora_gate"],
        )
        for name in names
    }


def gathered_training_state(
    engine: deepspeed.DeepSpeedEngine, model: nn.Module, info: DistInfo
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a checkpoint holds, on every process (collective): the full fp32 adapters and Adam
    moments, and every process's generator states (`cpu.<rank>`, `cuda.<rank>`)."""
    tensors = flatten_states(read_adapter_states(engine, gated_modules(model)))
    own = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(info.device)
    rng: dict[str, torch.Tensor] = {}
    for kind, state in own.items():
        for rank, gathered_state in enumerate(all_gather_tensor(state.to(info.device))):
            rng[f"{kind}.{rank}"] = gathered_state.cpu()
    return tensors, rng


def restore_rng(rng: Mapping[str, torch.Tensor], info: DistInfo) -> bool:
    """Put this process's generator states back; False when the checkpoint has none for this
    process (it was written by a different number of processes)."""
    if f"cpu.{info.rank}" not in rng or f"cpu.{info.world_size}" in rng:
        return False
    torch.set_rng_state(rng[f"cpu.{info.rank}"])
    if info.device.type == "cuda" and f"cuda.{info.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{info.rank}"], info.device)
    return True


@torch.no_grad()
def distributed_loss(model: nn.Module, batches: Sequence[Batch], info: DistInfo) -> float:
    """Mean supervised cross-entropy over batches that are already split across processes.

    Every process must pass the same number of batches (pad with batches whose labels are all
    -100), because under ZeRO-3 the forwards are collective.
    """
    with eval_mode(model):
        total, count = supervised_loss_totals(model, batches)
    total, count = all_reduce_sum([total, count], info.device)
    return total / max(count, 1.0)


# ---- writing what was trained -----------------------------------------------------------------


def gathered_adapter_tensors(model: nn.Module) -> dict[str, Any]:
    """Full (un-partitioned) adapter tensors of every gated module, on every process.

    Under ZeRO-3 every shard is gathered first (collective), so an export can never come out
    empty; elsewhere this just copies.
    """
    from alora_ds.export import adapter_tensors_from_model

    with gathered(adapter_params(gated_modules(model))):
        return adapter_tensors_from_model(model)


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The model's full state dict on the main process (empty elsewhere), gathering one ZeRO-3
    parameter at a time so no process holds more than one whole tensor beyond its shard."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            if info.is_main:
                state[name] = param.detach().cpu().clone()
    if info.is_main:
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):  # rotary caches are rebuilt from the config
                continue
            state[name] = buffer.detach().cpu().clone()
    return state

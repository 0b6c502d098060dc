"""ZeRO's side of the adapters: partitioned parameters, fp32 masters and Adam's state.

DeepSpeed keeps what the trainer needs to read and write in different places depending on the
stage and precision: ZeRO-3 partitions the parameters themselves; ZeRO-1/2 and the bf16
optimizer keep fp32 masters and Adam moments in flat partitions linked to each parameter;
without ZeRO in fp32 the parameter is its own master. The functions here hide that: they read
and write full fp32 tensors, whatever the stage. Reading is collective under ZeRO (every process
calls, in the same order); writing a freshly created engine is not (each process writes its own
partition of the same full tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from alora_ds.core.layer import GATE_PARAM_NAMES, GatedLoRALinear
from alora_ds.core.surgery import ADAM_STATE_KEYS, AdapterState
from alora_ds.errors import InputError

# ---- configuration ---------------------------------------------------------------------------


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def model_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    """The dtype the ds config trains in (its bf16 / fp16 sections)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def check_dtype_supported(ds_config: Mapping[str, Any], ds_path: str) -> None:
    """Refuse, before anything starts, a bf16 / fp16 ds config that DeepSpeed's accelerator here
    cannot train in: DeepSpeed itself finds out only inside initialize, with a traceback (fp16
    on CPU: "Type fp16 is not supported on your device")."""
    dtype = model_dtype(ds_config)
    accelerator = get_accelerator()
    if dtype not in accelerator.supported_dtypes():
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        raise InputError(
            f"ds config {ds_path}: {name} is not supported by DeepSpeed's "
            f"{accelerator.device_name()} accelerator on this machine; use a ds config in fp32"
            + (" or bf16 (ds_configs/zero3_bf16.json)" if name == "fp16" else "")
        )


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


# ---- the DeepSpeed engine and its optimizer --------------------------------------------------


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's settings (the learning rate is set again before every step)."""

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
    # Trained gates get their own group, so that their learning rate can be set apart (DNAS).
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
def write_trained(param: nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite a trained parameter between steps (collective under ZeRO-3): its fp32 master
    and its working copy, so the next forward and the next optimizer step both see `value`."""
    if _has_master_copy(param):
        _set_full(param, value.to(param.device))
    with gathered([param], modifier_rank=0):
        param.data.copy_(value.reshape(param.shape).to(param.device, param.dtype))


def full_value(param: nn.Parameter) -> torch.Tensor:
    """A trained parameter's full fp32 master value (collective under ZeRO)."""
    if _has_master_copy(param):
        return safe_get_full_fp32_param(param).float().cpu()
    return param.detach().float().cpu()


def full_state_dict(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The model's full state dict on the main process (empty elsewhere), gathering one ZeRO-3
    parameter at a time so no process holds more than one whole tensor beyond its shard
    (collective under ZeRO-3)."""
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        with gathered([param]):
            if is_main:
                state[name] = param.detach().cpu().clone()
    if is_main:
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):  # rotary caches are rebuilt from the config
                continue
            state[name] = buffer.detach().cpu().clone()
    return state


def deepspeed_model_states_estimate(
    stage: int, trainable: int, largest: int, gpus_per_node: int, nodes: int, *, offload: bool
) -> tuple[float, float]:
    """DeepSpeed's own estimate of the model states (CPU bytes, GPU bytes per GPU) of
    `trainable` parameters at ZeRO `stage` (3, or 1/2), for a cross-check of launch.estimate."""
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest, gpus_per_node, nodes, cpu_offload=offload,
            cpu_offload_params=offload, zero_init=True,
        )  # fmt: skip
        return cpu, gpu
    return estimate_zero2_model_states_mem_needs(
        trainable, gpus_per_node, nodes, cpu_offload=offload
    )

"""The gated LoRA module (docs/method.md section 1).

    z = W x + s * B diag(g) A drop(x)

W is the frozen base weight, A (r x d_in) and B (d_out x r) are LoRA's factors, g holds one gate
per rank. Pruning a rank switches its gate off; a rebuild then removes it physically
(alora_ds.core.surgery). The scale s = alpha / r_init is fixed for the life of the module, so
adding or removing ranks never rescales the ranks that stay.

How g is made is the module's `GateKind`, one per method family: a hard switch (ALoRA, LoRA,
ALoRA-Sensi), a relaxed trained gate (ALoRA-DNAS), or a trained gate used as it is (SoRA's
gates, AdaLoRA's singular values).

This file is plain torch: nothing here knows about DeepSpeed or torch.distributed.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

# Names of the trainable adapter tensors, declared once and reused for freezing, saving and
# rebuilding (peft does the same with `adapter_layer_names`).
ADAPTER_PARAM_NAMES: tuple[str, ...] = ("lora_A", "lora_B")
# Trained gates (DNAS, SoRA, AdaLoRA) have their own tensor, kept in its own optimizer group.
GATE_PARAM_NAMES: tuple[str, ...] = ("gate_logits",)


class GateKind(enum.Enum):
    """How a module computes its gates g from the hard mask m (lora_gate) and, for the trained
    kinds, a tensor a (gate_logits)."""

    HARD = "hard"  # g = m: a switch only (ALoRA, LoRA, ALoRA-Sensi)
    RELAXED = "relaxed"  # g = m * 2 sigmoid(a), a from 0 so g = 1 (ALoRA-DNAS)
    IDENTITY = "identity"  # g = m * a, a from 1 (SoRA's L1-driven gates, AdaLoRA's values)

    @property
    def trained(self) -> bool:
        """Whether the gates have a trained tensor (gate_logits)."""
        return self is not GateKind.HARD

    @property
    def initial_logit(self) -> float:
        """The value of a for a new rank: the one that makes its gate 1."""
        return 1.0 if self is GateKind.IDENTITY else 0.0


def kaiming_uniform_rows(
    num_rows: int, in_features: int, generator: torch.Generator | None
) -> torch.Tensor:
    """LoRA's A init (Kaiming-uniform with a=sqrt(5), as nn.Linear and peft), drawn in fp32 on CPU.

    Drawing on CPU in fp32 and casting afterwards makes the values independent of the device and
    dtype the module lives on: every process of a distributed run draws the same numbers from
    the same seed.
    """
    rows = torch.empty(num_rows, in_features, dtype=torch.float32)
    if num_rows == 0:
        return rows
    # kaiming_uniform_ with a=sqrt(5): gain = sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain *
    # sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(in_features)
    return rows.uniform_(-bound, bound, generator=generator)


def compute_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or for a quantised layer (QLoRA's
    bitsandbytes `Linear4bit`, whose weight holds packed 4-bit values in a storage dtype) the
    layer's `compute_dtype`, never the storage dtype."""
    compute = getattr(layer, "compute_dtype", None)  # bitsandbytes Linear4bit
    if compute is not None:
        return compute
    weight = layer.weight
    quantised = hasattr(weight, "quant_state")  # bitsandbytes Params4bit
    return weight.dtype if weight.dtype.is_floating_point and not quantised else torch.float32


def zero_gradient(param: torch.Tensor) -> torch.Tensor:
    """`param`'s value with a zero gradient: it stays in the graph (so ZeRO sees a gradient for
    every parameter, every step) but is not trained by this backward."""
    return param.detach() + 0.0 * param


class GatedLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a LoRA adapter whose ranks each carry a gate.

    The base may be a quantised subclass of nn.Linear (bitsandbytes `Linear4bit` for QLoRA): it
    is only called, and sizes come from `in_features` / `out_features`.

    Args:
        base_layer: the linear layer to adapt; it is frozen and kept as `base_layer`.
        r: initial number of ranks (may be 0).
        alpha: LoRA alpha; the scale is `alpha / r` unless `scale` is given.
        dropout: dropout on the adapter's input (LoRA's `lora_dropout`).
        scale: a fixed scale (used when loading an adapter whose scale is already known, or when
            r = 0 and the scale must still be defined for ranks added later).
        dtype: dtype of A, B and the gates; defaults to the base layer's compute dtype (its
            weight's dtype, or a 4-bit layer's compute_dtype), which is what DeepSpeed expects
            for parameters created after the model was built.
        generator: source of A's initial values (a fixed seed gives the same A everywhere).
        gate_kind: how the gates are made (GateKind); the trained kinds also create the gate
            tensor a (`gate_logits`), at the value that makes every gate 1.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        scale: float | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        gate_kind: GateKind = GateKind.HARD,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"GatedLoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        if r < 0:
            raise ValueError(f"rank r must be >= 0, got {r}")
        if scale is None:
            if r == 0:
                raise ValueError("rank r = 0 needs an explicit scale (alpha / r is undefined)")
            scale = alpha / r
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        # Sizes come from the layer's attributes, not from its weight: under ZeRO-3 the weight
        # tensor of a partitioned layer is empty.
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.scale: float = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        dtype = dtype or compute_dtype(base_layer)
        device = base_layer.weight.device
        self.adapter_dtype: torch.dtype = dtype
        self.lora_A: nn.Parameter | None  # (r, d_in); None when r = 0
        self.lora_B: nn.Parameter | None  # (d_out, r); None when r = 0
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        # The hard gates are a buffer, not a parameter: scoring flips them on and off, and in a
        # distributed run each process may hold different values (its own ablations).
        self.register_buffer("lora_gate", torch.ones(r, device=device, dtype=dtype))
        # Per-row hard gates (N, r) that replace lora_gate while set: batched scoring gives each
        # row of a batch its own ablation. A plain attribute: never saved, never partitioned.
        self.row_gates: torch.Tensor | None = None
        # Set by the fast scorer on modules whose gates are all zero: their delta is exactly zero,
        # so skipping it changes no bit of the output and saves the adapter's two matmuls.
        self.adapter_off: bool = False
        # DNAS's alternating steps: "weights" trains A and B only, "gates" the gate logits only;
        # the other part still takes part in the graph but receives a zero gradient.
        self.train_only: str | None = None
        self.gate_kind: GateKind = GateKind(gate_kind)
        self.gate_logits: nn.Parameter | None = None  # (r,); None for hard gates or r = 0
        if self.gate_kind.trained:
            self.gate_logits = nn.Parameter(self.initial_gate_logits(r, device, dtype))
        self.set_adapter_tensors(
            kaiming_uniform_rows(r, self.in_features, generator).to(device=device, dtype=dtype),
            torch.zeros(self.out_features, r, device=device, dtype=dtype),
            self.lora_gate,
        )

    @property
    def r(self) -> int:
        """Number of ranks currently held (live ranks: pruned ones are removed physically)."""
        return self.lora_gate.shape[0]

    @property
    def params_per_rank(self) -> int:
        """Trained parameters one rank costs: A's row, B's column and its trained gate if any."""
        return self.in_features + self.out_features + int(self.gate_kind.trained)

    def gate_values(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The effective gate g per rank: the hard mask (lora_gate unless given), times
        2 sigmoid(a) in the DNAS variant."""
        mask = self.lora_gate if mask is None else mask
        if self.gate_logits is None:
            return mask
        logits = self.gate_logits
        if self.train_only == "weights":
            logits = zero_gradient(logits)
        if self.gate_kind is GateKind.IDENTITY:
            return mask * logits
        return mask * 2.0 * torch.sigmoid(logits)

    def initial_gate_logits(self, k: int, device=None, dtype=None) -> torch.Tensor:
        """Gate logits of k new ranks: the values that make their gates 1."""
        return torch.full((k,), self.gate_kind.initial_logit, device=device, dtype=dtype)

    def trainable_names(self) -> tuple[str, ...]:
        """The names of this module's trained tensors: A and B, plus the gates when trained."""
        return ADAPTER_PARAM_NAMES + (GATE_PARAM_NAMES if self.gate_kind.trained else ())

    def adapter_tensor(self, name: str) -> torch.Tensor:
        """lora_A, lora_B or gate_logits, as an empty (0, d_in) / (d_out, 0) / (0,) tensor when
        the module has no rank."""
        if name == "gate_logits" and self.gate_logits is None:
            return torch.zeros(0, dtype=self.adapter_dtype, device=self.lora_gate.device)
        param = getattr(self, name)
        if param is not None:
            return param
        shape = (0, self.in_features) if name == "lora_A" else (self.out_features, 0)
        return torch.zeros(shape, dtype=self.adapter_dtype, device=self.lora_gate.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.lora_A is None or self.adapter_off:
            return result
        x = x.to(self.lora_A.dtype)
        a, b = self.lora_A, self.lora_B
        if self.train_only == "gates":
            a, b = zero_gradient(a), zero_gradient(b)
        h = self.dropout(x) @ a.t()  # (..., r)
        # The scale goes with the gates on the r-wide tensor, and the add into the matmul: two
        # fewer passes over a (tokens, d_out) tensor, which is what these small ops cost.
        if self.row_gates is None:
            h = h * (self.gate_values() * self.scale)  # (..., r): s diag(g)
        else:  # (N, ..., r) * (N, 1.., r): each row its own gates
            gates = self.gate_values(self.row_gates.to(h.dtype)) * self.scale
            h = h * gates.view(gates.shape[0], *([1] * (h.dim() - 2)), gates.shape[1])
        if h.dtype != result.dtype:
            return result + (h @ b.t()).to(result.dtype)
        flat = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.t())
        return flat.view(result.shape)

    def delta_weight(self) -> torch.Tensor:
        """s * B diag(g) A as a (d_out, d_in) matrix (for merging and for tests)."""
        a, b = self.adapter_tensor("lora_A"), self.adapter_tensor("lora_B")
        return self.scale * (b * self.gate_values()) @ a

    def set_adapter_tensors(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        gate: torch.Tensor,
        gate_logits: torch.Tensor | None = None,
    ) -> None:
        """Replace A (r, d_in), B (d_out, r) and the gates (r,) with new tensors of any rank r.

        New Parameter objects (rank surgery: alora_ds.core.surgery): the caller rebuilds the
        optimizer. The values given are kept exactly.
        """
        r = gate.shape[0]
        if a.shape != (r, self.in_features) or b.shape != (self.out_features, r):
            raise ValueError(
                f"adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit r={r}, "
                f"d_in={self.in_features}, d_out={self.out_features}"
            )
        # A module with no rank holds no parameter at all: ZeRO-3 cannot gather an empty one.
        trainable = self.lora_A.requires_grad if self.lora_A is not None else True
        if r == 0:
            self.lora_A = None
            self.lora_B = None
        else:
            self.lora_A = nn.Parameter(a.contiguous(), requires_grad=trainable)
            self.lora_B = nn.Parameter(b.contiguous(), requires_grad=trainable)
        self.lora_gate = gate.contiguous()
        if self.gate_kind.trained:
            if gate_logits is None:  # new ranks' trained gates start at g = 1
                gate_logits = self.initial_gate_logits(r, gate.device, gate.dtype)
            self.gate_logits = (
                nn.Parameter(gate_logits.contiguous(), requires_grad=trainable) if r else None
            )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scale={self.scale:g}, gate_kind={self.gate_kind.value}"
        )

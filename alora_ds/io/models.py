"""Loading LLaMA-family models and their tokenizers, and the tiny LLaMA used by the demo and the
tests."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
)

from alora_ds.errors import InputError
from alora_ds.io.hub import check_hub_reachable
from alora_ds.io.tasks import build_tiny_tokenizer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'bf16' / ... -> torch dtype; an unknown name is an InputError naming it."""
    try:
        return DTYPES[name]
    except KeyError as exc:
        raise InputError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})") from exc


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A LLaMA config small enough for CPU tests: hidden 64, 2 layers, 4 heads (2 KV heads)."""
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_random_llama(
    config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A randomly initialised LLaMA, identical for the same config and seed."""
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _check_model_path(model_name_or_path: str) -> None:
    local = Path(model_name_or_path)
    if not local.exists() and (model_name_or_path.startswith((".", "/")) or local.suffix):
        raise InputError(f"model directory {model_name_or_path} does not exist")
    check_hub_reachable(model_name_or_path)  # a hub id: say at once when the hub is out of reach


def _load_error(model_name_or_path: str, exc: Exception) -> InputError:
    if "trust_remote_code" in str(exc):
        return InputError(
            f"model {model_name_or_path} ships its own Python code, which runs only with "
            "--trust_remote_code"
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"cannot load model {model_name_or_path!r}: {first_line}")


# Every load passes trust_remote_code explicitly: transformers' default (None) asks on the
# terminal and runs the model's own code on a "y".


def empty_causal_lm(model_name_or_path: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model's architecture on the meta device (no memory, no weights): enough to check
    module names and shapes before paying for a real load."""
    _check_model_path(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(model_name_or_path, exc) from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_causal_lm(
    model_name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A causal LM from a local directory (or a hub id when the hub can be reached)."""
    model = _from_pretrained(model_name_or_path, dtype, "sdpa", trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def _from_pretrained(
    model_name_or_path: str,
    dtype: torch.dtype,
    attn_implementation: str,
    quantization_config: BitsAndBytesConfig | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """from_pretrained with a missing path or an unloadable model as a one-line InputError."""
    _check_model_path(model_name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=quantization_config,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(model_name_or_path, exc) from exc


TINY_LLAMA_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama.json"


def resolve_attn_implementation(requested: str) -> str:
    """auto: flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def read_model_config(path: str | Path) -> PretrainedConfig:
    """A model config from a config.json file (or a directory holding one)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"model config {path} does not exist")
    try:
        data = json.loads(file.read_text())
        return AutoConfig.for_model(**data)
    except (json.JSONDecodeError, ValueError, KeyError) as exc:
        raise InputError(f"model config {file} is not a valid config ({exc})") from exc


def empty_from_config(path: str | Path) -> torch.nn.Module:
    """The architecture of a config file on the meta device (no memory, no weights)."""
    config = read_model_config(path)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (RuntimeError, ValueError) as exc:  # e.g. a negative size
        raise InputError(f"model config {path} cannot build a model: {exc}") from exc


def check_load_in_4bit(model_name_or_path: str | None) -> None:
    """Raise a one-line InputError unless a 4-bit (QLoRA) base can be loaded: bitsandbytes must
    import, and there must be a pretrained checkpoint to quantise.

    A randomly initialised base is refused rather than quantised after it is built: it is saved
    unquantised to base_model/ so that peft can load the adapter on its own, and an adapter
    trained against the nf4-rounded weights would not match that saved base.
    """
    try:
        import bitsandbytes  # noqa: F401  (optional: only QLoRA needs it)
    except ImportError as exc:
        raise InputError(
            f"load_in_4bit needs bitsandbytes, which cannot be imported ({exc}); "
            "pip install bitsandbytes"
        ) from exc
    if model_name_or_path is None:
        raise InputError(
            "load_in_4bit quantises a pretrained checkpoint: pass model_name_or_path (a randomly "
            "initialised base is saved unquantised for peft, so it is trained unquantised too)"
        )


def nf4_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's quantisation: nf4 weights, matmuls in the run's dtype, and the packed 4-bit
    weights stored in the run's dtype too, so that every parameter ZeRO-3 (or FSDP) shards has
    one dtype, as transformers and peft prescribe for sharded QLoRA. (DeepSpeed 0.19.8 on CPU
    also sharded uint8 storage correctly; GPUs were not tried.)"""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_base_model(
    model_name_or_path: str | None,
    model_config: str | None,
    *,
    dtype: torch.dtype,
    attn_implementation: str,
    seed: int,
    loading_context: contextlib.AbstractContextManager,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, bool]:
    """The base model, and whether it was randomly initialised.

    `loading_context` is entered around the load; under ZeRO-3 it partitions the weights as
    they are created (see alora_ds.runtime.zero.partitioned_loading). A quantised model is never
    partitioned while loading (transformers loads it whole on every process); ZeRO-3 partitions
    its packed weights when the engine is created. `load_in_4bit` loads the linear layers of the
    decoder as bitsandbytes nf4 `Linear4bit` (QLoRA); embeddings, norms and the LM head keep
    `dtype`.
    """
    if load_in_4bit:
        check_load_in_4bit(model_name_or_path)
    with loading_context:
        if model_name_or_path is not None:
            quantization = nf4_config(dtype) if load_in_4bit else None
            model = _from_pretrained(
                model_name_or_path, dtype, attn_implementation, quantization, trust_remote_code
            )
            return model, False
        config = read_model_config(model_config or TINY_LLAMA_CONFIG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn_implementation
            )
        return model, True


def load_tokenizer(source: str | None, trust_remote_code: bool = False):
    """The tokenizer of a model directory or hub id, with LLaMA's missing pad token set to EOS;
    None: the embedded tiny tokenizer, trained from the shipped samples."""
    if source is None:
        return build_tiny_tokenizer()
    check_hub_reachable(source, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
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

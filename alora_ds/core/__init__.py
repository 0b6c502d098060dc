"""The method's core in plain torch: the gated LoRA layer, injection into a model, rank surgery,
the allocation rules and the step schedule. Nothing here knows about DeepSpeed, processes, files
or the command line; everything above builds on it.

This file itself imports nothing, so the configuration (and `launch/train.py --help`) can read
the default target modules without importing torch.
"""

# The N_mod = 7 linear modules of a LLaMA block.
LLAMA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

"""The only layer that imports deepspeed or torch.distributed: the process group and its
collectives (`process`), ZeRO's view of the adapters (`zero`), and the Engine object that owns a
model under DeepSpeed (`engine`). Slurm's variables (`slurm`) and CPU process settings (`cpu`)
are here too: they decide how processes start.
"""

import os

import torch

# DeepSpeed picks its accelerator when it is first imported (by the modules below); name it on a
# machine without CUDA to skip the probing and its warning.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

#!/usr/bin/env bash
# The wheels a GPU machine without a package registry lacks, built or downloaded here (any CPU
# machine that reaches PyPI), into .whl/ at the repository root:
#
#     bash scripts/gpu_wheels.sh            # or: PYTHON=python3 bash scripts/gpu_wheels.sh [DIR]
#
# The GPU machine has Python 3.12 with torch, transformers, peft, accelerate and triton (and
# numpy, packaging, psutil, py-cpuinfo, msgpack, ninja, einops, tqdm, safetensors, pyyaml) but
# no deepspeed, bitsandbytes or flash-attn. bench/gpu.py needs only deepspeed of those; what
# deepspeed itself needs and the machine lacks is hjson and pydantic (with pydantic's compiled
# core for CPython 3.12). There they are installed, without a registry, by
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# (DEVELOPERS.md, "Running a check on the GPU machine"). The script ends by checking that every
# requirement of every wheel is either among the wheels or already on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DIR=${1:-.whl}

# .whl/ must travel to the GPU machine (named in the run's carry) but never be committed.
if [ -d .git ] && ! grep -qxF "/.whl/" .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo "/.whl/" >>.git/info/exclude
fi
rm -rf "$DIR" && mkdir -p "$DIR"

# deepspeed is a source distribution: build a pure-Python wheel. Its ops are compiled just in
# time where they are used (DS_BUILD_OPS=0), and the accelerator is detected at run time, so a
# wheel built on a CPU machine runs on a GPU. No build isolation: its setup.py imports torch,
# which must come from this environment, not a fresh (CUDA, several GB) download.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8

# deepspeed's requirements that the GPU machine lacks, for CPython 3.12 on x86-64 Linux; the
# versions are those this project runs with here.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0

# Every requirement (markers evaluated for CPython 3.12 on Linux, extras left out) must be a
# wheel here or a package the GPU machine has.
"$PYTHON" - "$DIR" <<'EOF'
import sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ON_GPU_MACHINE = {
    "torch", "transformers", "peft", "accelerate", "triton", "numpy", "packaging", "psutil",
    "py-cpuinfo", "msgpack", "ninja", "einops", "tqdm", "safetensors", "pyyaml", "tabulate",
    "nvidia-ml-py",
}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
names = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
assert len(names) == len(wheels), "two versions of one package: the install would refuse both"
environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name not in names and name not in ON_GPU_MACHINE:
            missing.append(f"{wheel.name} needs {requirement}")
if missing:
    sys.exit("error: missing on the GPU machine: " + "; ".join(missing))
size = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{len(wheels)} wheels in {sys.argv[1]} ({size:.1f} MiB): " + ", ".join(w.name for w in wheels))
EOF

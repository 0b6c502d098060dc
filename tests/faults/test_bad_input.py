"""Bad input on every command line, driven the way a user drives it.

One table: each case is a command line (launch/train.py, eval.score, eval.merge, eval.judge,
eval.mt_bench, eval.metrics, alora_ds.score) and the fragment its error must name (the file,
field, flag or value). Every case must end with

- a non-zero exit status (2: bad input),
- stderr's last non-empty line a single `error: ...` line holding the fragment, no traceback,
- nothing written: the whole workspace (inputs and output locations) is byte for byte as before.

The CLIs run in-process through `run_cli`, as their `__main__` blocks run them; a few run as real
subprocesses at the end. launch/train.py never gets as far as starting processes here: a case
that would (its input accepted) stops at `init_distributed` and fails as accepted.

A case marked xfail fails today for a reason in a file this test's authors could not change; the
reason names the change that makes it pass (strict: the mark must go when it does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from transformers import GPT2Config

import alora_ds.score as adapter_score
from alora_ds.errors import run_cli
from alora_ds.runtime import process as P
from eval import judge, merge, metrics, mt_bench, score
from launch import train
from tests.helpers import REPO, build_tiny_setup

ZERO3 = str(REPO / "ds_configs" / "zero3.json")
SST2_TEST = str(REPO / "alora_ds" / "data" / "samples" / "sst2" / "test.jsonl")

MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "train": train.main,
    "eval.score": score.main,
    "eval.merge": merge.main,
    "eval.judge": judge.main,
    "eval.mt_bench": mt_bench.main,
    "eval.metrics": metrics.main,
    "alora_ds.score": adapter_score.main,
}


class TrainingStarted(Exception):
    """Raised in place of init_distributed: launch/train.py accepted the input."""


Flags = Mapping[str, "str | list[str] | None"]


def flags(defaults: Flags, overrides: Flags) -> list[str]:
    """`--key value` pairs from defaults updated by overrides (None drops a flag)."""
    argv: list[str] = []
    for key, value in {**defaults, **overrides}.items():
        if value is not None:
            argv += [f"--{key}", *([value] if isinstance(value, str) else value)]
    return argv


class Workspace:
    """Inputs for every case under one root: a tiny base and adapter, broken copies of them, and
    data files made on demand. Outputs point under the same root, so one snapshot of it shows
    whether a case wrote anything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        setup = build_tiny_setup(root / "tiny", steps=1)
        self.base, self.adapter = str(setup.base), str(setup.adapter)
        self.a_file = self.file("a_file.txt", "a regular file, not a directory\n")
        self.out = str(root / "out")
        self.questions = self.file(
            "question.jsonl",
            json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi.", "More."]})
            + "\n",
        )
        self.answers_a = self.answers("answers_a.jsonl", "alora")
        self.answers_b = self.answers("answers_b.jsonl", "base")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def answers(self, name: str, model_id: str, **record: object) -> str:
        line = {"question_id": 81, "model_id": model_id, "choices": [{"turns": ["a", "b"]}]}
        return self.file(name, json.dumps({**line, **record}) + "\n")

    def adapter_copy(self, name: str, change: Callable[[Path], None]) -> str:
        """A copy of the good adapter with `change` applied to the copy's directory."""
        path = self.root / name
        if not path.exists():
            shutil.copytree(self.adapter, path)
            change(path)
        return str(path)

    def no_eos_model(self) -> str:
        """The base with a tokenizer that defines no EOS token."""
        path = self.root / "no_eos"
        if not path.exists():
            shutil.copytree(self.base, path)
            config_file = path / "tokenizer_config.json"
            config = json.loads(config_file.read_text())
            config.pop("eos_token", None)
            config_file.write_text(json.dumps(config))
        return str(path)

    def gpt2_model(self) -> str:
        """A model directory that is not LLaMA-like (GPT-2: no q_proj ... down_proj)."""
        path = self.root / "gpt2"
        if not path.exists():
            GPT2Config(
                n_layer=1, n_embd=16, n_head=2, vocab_size=1024, bos_token_id=1, eos_token_id=2
            ).save_pretrained(path)
        return str(path)

    def unwritable_dir(self) -> str:
        """A directory path that cannot be created: under a read-only directory, or, where
        chmod does not stop writes (root), under a regular file."""
        read_only = self.root / "read_only"
        if not read_only.exists():
            read_only.mkdir()
            read_only.chmod(0o555)
        probe = read_only / "probe"
        try:
            probe.mkdir()
        except PermissionError:
            return str(read_only / "sub")
        probe.rmdir()
        return str(Path(self.a_file) / "sub")

    # ---- each CLI's good command line; overrides make it bad -------------------------------

    def train(self, **overrides: str | list[str] | None) -> list[str]:
        defaults = {"output_dir": self.out, "ds_config": ZERO3, "per_device_train_batch_size": "4"}
        return flags(defaults, overrides)

    def score(self, **overrides: str | list[str] | None) -> list[str]:
        defaults = {
            "model_name_or_path": self.base, "adapter": self.adapter, "task": "sst2",
            "data": SST2_TEST, "output_dir": self.out, "decoding": "greedy", "max_examples": "2",
        }  # fmt: skip
        return flags(defaults, overrides)

    def adapter_score(self, **overrides: str | list[str] | None) -> list[str]:
        data = self.file("val.jsonl", '{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}\n')
        defaults = {
            "model_name_or_path": self.base, "adapter": self.adapter, "data": data,
            "num_examples": "1", "output": str(self.root / "scores.json"),
        }  # fmt: skip
        return flags(defaults, overrides)

    def merge(self, **overrides: str | list[str] | None) -> list[str]:
        defaults = {
            "model_name_or_path": self.base,
            "adapter": self.adapter,
            "output_dir": self.out,
        }
        return flags(defaults, overrides)

    def judge(self, command: str = "pairwise", **overrides: str | list[str] | None) -> list[str]:
        defaults: dict[str, str | list[str] | None] = {
            "answers": [self.answers_a, self.answers_b], "questions": self.questions,
        }  # fmt: skip
        if command != "rouge":
            defaults |= {
                "judge_model": "judge", "api_base": "http://127.0.0.1:9/v1",
                "output_dir": self.out, "max_retries": "0",
            }  # fmt: skip
        return [command, *flags(defaults, overrides)]

    def mt_bench(self, **overrides: str | list[str] | None) -> list[str]:
        defaults = {
            "model_name_or_path": self.base, "model_id": "alora", "questions": self.questions,
            "output": str(self.root / "mt_answers.jsonl"), "max_new_tokens": "4",
        }  # fmt: skip
        return ["generate", *flags(defaults, overrides)]

    def metrics(self, **overrides: str | list[str] | None) -> list[str]:
        predictions = self.file(
            "predictions.jsonl",
            '{"id": 1, "prediction": "positive", "references": ["positive"]}\n',
        )
        return flags({"task": "sst2", "predictions": predictions}, overrides)


def corrupt_safetensors(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00 not a safetensors file " * 4)


def truncate_safetensors(adapter: Path) -> None:
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def corrupt_bin(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not a torch checkpoint")


def drop_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").unlink()


def malformed_config(adapter: Path) -> None:
    (adapter / "adapter_config.json").write_text('{"r": 4, ')


def tiny_llama_json(**fields: object) -> str:
    config = {
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    }  # fmt: skip
    return json.dumps({**config, **fields})


@dataclass(frozen=True)
class Case:
    id: str
    cli: str
    argv: Callable[[Workspace], list[str]]
    fragment: str
    """Must appear in the error line (a file name, field, flag or value)."""
    xfail: str | None = None
    """Why it fails today: the change, in a file the authors of this test could not edit."""
    env: Mapping[str, str | None] = field(default_factory=dict)


TRAIN_FILE_NEEDED = "needs train.py change: "
CASES: list[Case] = [
    # ---- launch/train.py: config file and ds config ---------------------------------------
    Case("train-config-malformed-yaml", "train",
         lambda w: w.train(config=w.file("bad.yaml", "learning_rate: [1e-4\n")),
         "bad.yaml is not valid YAML"),
    Case("train-config-not-a-mapping", "train",
         lambda w: w.train(config=w.file("list.yaml", "- 1\n- 2\n")),
         "list.yaml: expected a mapping"),
    Case("train-config-missing", "train",
         lambda w: w.train(config=str(w.root / "missing.yaml")), "missing.yaml does not exist"),
    Case("train-config-wrong-type", "train",
         lambda w: w.train(config=w.file("typed.yaml", "learning_rate: fast\n")),
         "typed.yaml: learning_rate='fast' is not a valid float"),
    Case("train-config-unknown-key", "train",
         lambda w: w.train(config=w.file("unknown.yaml", "rank_budgett: 8\n")),
         "unknown option 'rank_budgett' (did you mean rank_budget?)"),
    Case("train-ds-config-malformed-json", "train",
         lambda w: w.train(ds_config=w.file("ds_bad.json", '{"zero_optimization": ')),
         "ds_bad.json is not valid JSON"),
    Case("train-ds-config-not-an-object", "train",
         lambda w: w.train(ds_config=w.file("ds_list.json", "[3]")),
         "ds_list.json: expected a JSON object"),
    Case("train-ds-config-missing", "train",
         lambda w: w.train(ds_config=str(w.root / "ds_missing.json")),
         "ds_missing.json does not exist"),
    Case("train-ds-config-zero-stage-4", "train",
         lambda w: w.train(ds_config=w.file("ds_stage4.json", '{"zero_optimization": {"stage": 4}}')),
         "zero_optimization.stage must be 0, 1, 2 or 3, got 4"),
    Case("train-ds-config-zero-section-not-an-object", "train",
         lambda w: w.train(ds_config=w.file("ds_zero_int.json", '{"zero_optimization": 3}')),
         "zero_optimization"),
    Case("train-ds-config-bf16-not-an-object", "train",
         lambda w: w.train(ds_config=w.file("ds_bf16_bool.json", '{"bf16": true}')),
         "bf16"),
    Case("train-ds-config-optimizer-section", "train",
         lambda w: w.train(ds_config=w.file("ds_opt.json", '{"optimizer": {"type": "AdamW"}}')),
         "remove the 'optimizer'/'scheduler' sections"),
    # fp16 where DeepSpeed's accelerator has none (DeepSpeed's CPU accelerator on most CPUs)
    *([Case("train-ds-config-fp16-unsupported-here", "train",
            lambda w: w.train(ds_config=w.file("ds_fp16.json", '{"fp16": {"enabled": true}}')),
            "fp16 is not supported by DeepSpeed's cpu accelerator on this machine")]
      if torch.float16 not in get_accelerator().supported_dtypes() else []),
    # ---- launch/train.py: option values ------------------------------------------------------
    Case("train-learning-rate-not-a-number", "train",
         lambda w: w.train(learning_rate="abc"), "learning_rate='abc' is not a valid float"),
    Case("train-rank-budget-fraction", "train",
         lambda w: w.train(rank_budget="2.5"), "rank_budget='2.5' is not a valid int"),
    Case("train-rank-budget-zero", "train",
         lambda w: w.train(rank_budget="0"), "--rank_budget must be positive, got 0"),
    Case("train-rank-budget-negative", "train",
         lambda w: w.train(rank_budget="-8"), "--rank_budget must be positive, got -8"),
    Case("train-max-seq-length-zero", "train",
         lambda w: w.train(max_seq_length="0"), "--max_seq_length must be at least 8, got 0"),
    Case("train-batch-size-zero", "train",
         lambda w: w.train(per_device_train_batch_size="0"),
         "--per_device_train_batch_size must be positive, got 0"),
    Case("train-epochs-negative", "train",
         lambda w: w.train(num_train_epochs="-1"),
         "--num_train_epochs or --max_steps must be positive"),
    Case("train-lora-dropout-out-of-range", "train",
         lambda w: w.train(lora_dropout="1.5"), "--lora_dropout must be in [0, 1), got 1.5"),
    Case("train-lora-alpha-infinite", "train",
         lambda w: w.train(lora_alpha="inf"), "lora_alpha"),
    Case("train-bool-not-a-bool", "train",
         lambda w: w.train(overwrite_output_dir="maybe"),
         "overwrite_output_dir='maybe' is not a valid bool"),
    Case("train-resume-not-a-checkpoint", "train",
         lambda w: w.train(resume_from_checkpoint=str(w.root)), "not a checkpoint directory"),
    Case("train-skip-nonfinite-with-accumulation", "train",
         lambda w: w.train(skip_nonfinite="true", gradient_accumulation_steps="2"),
         "--skip_nonfinite needs --gradient_accumulation_steps 1"),
    Case("train-save-total-limit-zero", "train",
         lambda w: w.train(save_total_limit="0"), "--save_total_limit must be positive, got 0"),
    Case("train-report-to-unknown", "train",
         lambda w: w.train(report_to="mlflow"), "--report_to mlflow is not"),
    Case("train-method-unknown", "train",
         lambda w: w.train(method="dora"), "--method 'dora' is not one of"),
    Case("train-unknown-option", "train",
         lambda w: w.train(no_such_option="3"), "unknown option 'no_such_option'"),
    Case("train-stray-argument", "train",
         lambda w: [*w.train(), "stray"], "unexpected argument 'stray'"),
    # ---- launch/train.py: output_dir -----------------------------------------------------------
    Case("train-output-dir-under-a-file", "train",
         lambda w: w.train(output_dir=str(Path(w.a_file) / "run")), "a_file.txt"),
    Case("train-output-dir-not-writable", "train",
         lambda w: w.train(output_dir=w.unwritable_dir()), "cannot be written"),
    # ---- launch/train.py: data -------------------------------------------------------------------
    Case("train-data-row-non-string-field", "train",
         lambda w: w.train(train_file=w.file("nonstring.jsonl", '{"sentence": 5, "label": 1}\n')),
         "nonstring.jsonl row 1: field 'sentence' must be a string"),
    Case("train-data-not-utf8", "train",
         lambda w: w.train(train_file=w.file("latin1.jsonl", b'{"sentence": "caf\xe9", "label": 1}\n')),
         "latin1.jsonl line 1: not UTF-8 text"),
    Case("train-data-csv-not-utf8", "train",
         lambda w: w.train(validation_file=w.file("latin1.csv", b"sentence,label\nna\xefve,1\n")),
         "latin1.csv line 2: not UTF-8 text"),
    Case("train-data-malformed-json", "train",
         lambda w: w.train(train_file=w.file("broken.jsonl", '{"sentence": "x", "label": 1\n')),
         "broken.jsonl row 1: not valid JSON"),
    Case("train-data-corrupt-parquet", "train",
         lambda w: w.train(train_file=w.file("train.parquet", b"PAR1 not really parquet")),
         "train.parquet: not a readable parquet file"),
    Case("train-data-unsupported-extension", "train",
         lambda w: w.train(train_file=w.file("train.txt", "great movie\n")),
         "unsupported extension '.txt'"),
    Case("train-data-missing-file", "train",
         lambda w: w.train(validation_file=str(w.root / "dev_missing.jsonl")),
         "dev_missing.jsonl does not exist"),
    Case("train-pretokenized-non-integer-ids", "train",
         lambda w: w.train(task="pretokenized",
                           train_file=w.file("pretok.jsonl", '{"input_ids": [1, "a"], "labels": [1, 2]}\n'),
                           validation_file=w.file("pretok_dev.jsonl", '{"input_ids": [1, 2], "labels": [1, 2]}\n')),
         "pretok.jsonl line 1: field 'input_ids' must be a list of integers"),
    Case("train-dataset-name-offline", "train",
         lambda w: w.train(dataset_name="glue"), "--dataset_name glue: the hub is offline"),
    # ---- launch/train.py: tokenizer and model ----------------------------------------------------
    Case("train-tokenizer-without-eos", "train",
         lambda w: w.train(tokenizer_name_or_path=w.no_eos_model()), "eos_token"),
    Case("train-target-modules-absent", "train",
         lambda w: w.train(target_modules="nonexistent_proj"),
         "target module 'nonexistent_proj' matches no nn.Linear"),
    Case("train-model-not-llama-like", "train",
         lambda w: w.train(model_config=w.file("gpt2.json", GPT2Config(n_layer=1, n_embd=16, n_head=2).to_json_string())),
         "target module 'q_proj' matches no nn.Linear"),
    Case("train-model-config-malformed", "train",
         lambda w: w.train(model_config=w.file("model_bad.json", '{"model_type": "llama",')),
         "model_bad.json is not a valid config"),
    Case("train-model-config-negative-size", "train",
         lambda w: w.train(model_config=w.file("model_negative.json", tiny_llama_json(hidden_size=-16))),
         "model_negative.json"),
    Case("train-model-vocab-smaller-than-tokenizer", "train",
         lambda w: w.train(model_config=w.file("model_small_vocab.json", tiny_llama_json(vocab_size=64))),
         "the tokenizer has 1024 tokens but the model's vocabulary is 64"),
    Case("train-model-dir-missing", "train",
         lambda w: w.train(model_name_or_path=str(w.root / "no_model")), "no_model"),
    Case("train-model-dir-without-config", "train",
         lambda w: w.train(model_name_or_path=w.adapter), "cannot load"),
    # ---- eval.score ---------------------------------------------------------------------------------
    Case("score-batch-size-not-a-number", "eval.score",
         lambda w: w.score(batch_size="abc"), "argument --batch_size: invalid int value: 'abc'"),
    Case("score-unknown-option", "eval.score",
         lambda w: w.score(bogus="1"), "unrecognized arguments: --bogus 1"),
    Case("score-missing-required-option", "eval.score",
         lambda w: w.score(data=None), "the following arguments are required: --data"),
    Case("score-unknown-task", "eval.score", lambda w: w.score(task="glue/mnli"),
         "unknown task 'glue/mnli'"),
    Case("score-unknown-decoding", "eval.score",
         lambda w: w.score(decoding="nucleus"), "argument --decoding: invalid choice: 'nucleus'"),
    Case("score-max-examples-zero", "eval.score",
         lambda w: w.score(max_examples="0"), "--max_examples must be positive, got 0"),
    Case("score-output-dir-under-a-file", "eval.score",
         lambda w: w.score(output_dir=str(Path(w.a_file) / "eval")),
         "a_file.txt is not a directory"),
    Case("score-output-dir-not-writable", "eval.score",
         lambda w: w.score(output_dir=w.unwritable_dir()), "cannot be written"),
    Case("score-adapter-without-config", "eval.score",
         lambda w: w.score(adapter=w.adapter_copy("adapter_no_config", drop_config)),
         "adapter_no_config has no adapter_config.json"),
    Case("score-adapter-corrupt-safetensors", "eval.score",
         lambda w: w.score(adapter=w.adapter_copy("adapter_corrupt", corrupt_safetensors)),
         "adapter_corrupt/adapter_model.safetensors is not a readable safetensors file"),
    Case("score-adapter-truncated-safetensors", "eval.score",
         lambda w: w.score(adapter=w.adapter_copy("adapter_truncated", truncate_safetensors)),
         "adapter_truncated/adapter_model.safetensors is not a readable safetensors file"),
    Case("score-adapter-corrupt-bin", "eval.score",
         lambda w: w.score(adapter=w.adapter_copy("adapter_bad_bin", corrupt_bin)),
         "adapter_bad_bin/adapter_model.bin is not a readable weights-only torch checkpoint"),
    Case("score-data-not-utf8", "eval.score",
         lambda w: w.score(data=w.file("test_latin1.jsonl", b'{"sentence": "caf\xe9", "label": 1}\n')),
         "test_latin1.jsonl line 1: not UTF-8 text"),
    Case("score-tokenizer-without-eos", "eval.score",
         lambda w: w.score(model_name_or_path=w.no_eos_model()), "no_eos has no eos_token"),
    Case("score-base-not-llama-like", "eval.score",
         lambda w: w.score(model_name_or_path=w.gpt2_model()),
         "does not exist in the base model"),
    # ---- alora_ds.score ---------------------------------------------------------------------------
    Case("adapter-score-corrupt-safetensors", "alora_ds.score",
         lambda w: w.adapter_score(adapter=w.adapter_copy("adapter_corrupt", corrupt_safetensors)),
         "adapter_model.safetensors is not a readable safetensors file"),
    Case("adapter-score-without-config", "alora_ds.score",
         lambda w: w.adapter_score(adapter=w.adapter_copy("adapter_no_config", drop_config)),
         "has no adapter_config.json"),
    Case("adapter-score-num-examples-not-a-number", "alora_ds.score",
         lambda w: w.adapter_score(num_examples="all"),
         "argument --num_examples: invalid int value: 'all'"),
    Case("adapter-score-data-malformed-json", "alora_ds.score",
         lambda w: w.adapter_score(data=w.file("val_bad.jsonl", '{"input_ids": [1, 2]\n')),
         "val_bad.jsonl line 1: not valid JSON"),
    Case("adapter-score-output-under-a-file", "alora_ds.score",
         lambda w: w.adapter_score(output=str(Path(w.a_file) / "scores.json")),
         "a_file.txt is not a directory"),
    # ---- eval.merge -----------------------------------------------------------------------------
    Case("merge-adapter-without-config", "eval.merge",
         lambda w: w.merge(adapter=w.adapter_copy("adapter_no_config", drop_config)),
         "has no adapter_config.json"),
    Case("merge-adapter-config-malformed", "eval.merge",
         lambda w: w.merge(adapter=w.adapter_copy("adapter_bad_config", malformed_config)),
         "adapter_bad_config/adapter_config.json is not valid JSON"),
    Case("merge-adapter-corrupt-safetensors", "eval.merge",
         lambda w: w.merge(adapter=w.adapter_copy("adapter_corrupt", corrupt_safetensors)),
         "adapter_model.safetensors is not a readable safetensors file"),
    Case("merge-max-shard-size", "eval.merge",
         lambda w: w.merge(max_shard_size="lots"), "--max_shard_size 'lots' is not a size"),
    Case("merge-output-dir-under-a-file", "eval.merge",
         lambda w: w.merge(output_dir=str(Path(w.a_file) / "merged")),
         "a_file.txt is not a directory"),
    Case("merge-output-dir-holds-other-files", "eval.merge",
         lambda w: w.merge(output_dir=str(Path(w.file("mine/notes.txt", "mine\n")).parent)),
         "is not empty and holds no config.json: refusing to replace it"),
    # ---- eval.judge ---------------------------------------------------------------------------------
    Case("judge-questions-malformed-json", "eval.judge",
         lambda w: w.judge(questions=w.file("questions_bad.jsonl", '{"question_id": 81,\n')),
         "questions_bad.jsonl line 1: not valid JSON"),
    Case("judge-answers-missing-field", "eval.judge",
         lambda w: w.judge(answers=[w.answers("no_choices.jsonl", "x", choices=None), w.answers_b]),
         "no_choices.jsonl line 1: not a FastChat answer ('choices' must be a non-empty list"),
    Case("judge-answers-turns-not-strings", "eval.judge",
         lambda w: w.judge(answers=[w.answers("int_turns.jsonl", "x", choices=[{"turns": [1, 2]}]), w.answers_b]),
         "int_turns.jsonl line 1: not a FastChat answer (missing 'choices[0].turns'"),
    Case("judge-answers-not-utf8", "eval.judge",
         lambda w: w.judge(answers=[w.file("answers_latin1.jsonl", b'{"model_id": "\xe9"}\n'), w.answers_b]),
         "answers_latin1.jsonl line 1: not UTF-8 text"),
    Case("judge-rouge-answers-missing-field", "eval.judge",
         lambda w: w.judge("rouge", answers=[w.file("no_model_id.jsonl", '{"question_id": 81, "choices": []}\n')]),
         "no_model_id.jsonl line 1: not a FastChat answer (missing 'model_id')"),
    Case("judge-parallel-zero", "eval.judge",
         lambda w: w.judge(parallel="0"), "--parallel must be at least 1, got 0"),
    Case("judge-timeout-negative", "eval.judge",
         lambda w: w.judge(timeout="-5"), "--timeout must be positive, got -5.0"),
    Case("judge-turns-out-of-range", "eval.judge",
         lambda w: w.judge(turns="3"), "argument --turns: invalid choice: 3"),
    Case("judge-unknown-command", "eval.judge",
         lambda w: ["grade", *w.judge()[1:]], "argument command: invalid choice: 'grade'"),
    Case("judge-api-base-not-a-url", "eval.judge",
         lambda w: w.judge(api_base="localhost:8000"), "--api-base 'localhost:8000' is not an http(s) URL"),
    Case("judge-api-key-missing", "eval.judge",
         lambda w: w.judge(api_base="https://api.example.com/v1"), "OPENAI_API_KEY is not set",
         env={"OPENAI_API_KEY": None}),
    Case("judge-output-dir-under-a-file", "eval.judge",
         lambda w: w.judge(output_dir=str(Path(w.a_file) / "judged")), "a_file.txt is not a directory"),
    Case("judge-rouge-output-under-a-file", "eval.judge",
         lambda w: w.judge("rouge", references=w.answers_b, output=str(Path(w.a_file) / "rouge.json")),
         "a_file.txt is not a directory"),
    # ---- eval.mt_bench -----------------------------------------------------------------------------
    Case("mt-bench-questions-malformed-json", "eval.mt_bench",
         lambda w: w.mt_bench(questions=w.file("questions_bad.jsonl", '{"question_id": 81,\n')),
         "questions_bad.jsonl line 1: not valid JSON"),
    Case("mt-bench-questions-missing-field", "eval.mt_bench",
         lambda w: w.mt_bench(questions=w.answers_a),
         "answers_a.jsonl line 1: not an MT-Bench question (missing 'category')"),
    Case("mt-bench-existing-answers-not-utf8", "eval.mt_bench",
         lambda w: w.mt_bench(output=w.file("mt_latin1.jsonl", b'{"question_id": 81, "model_id": "\xe9"}\n')),
         "mt_latin1.jsonl line 1: not UTF-8 text"),
    Case("mt-bench-existing-answers-missing-field", "eval.mt_bench",
         lambda w: w.mt_bench(output=w.file("mt_no_id.jsonl", '{"model_id": "alora"}\n')),
         "mt_no_id.jsonl line 1: not a FastChat answer (no question_id)"),
    Case("mt-bench-output-under-a-file", "eval.mt_bench",
         lambda w: w.mt_bench(output=str(Path(w.a_file) / "answers.jsonl")),
         "a_file.txt is not a directory"),
    Case("mt-bench-empty-model-id", "eval.mt_bench",
         lambda w: w.mt_bench(model_id=" "), "--model_id must not be empty"),
    Case("mt-bench-unknown-prompt-format", "eval.mt_bench",
         lambda w: w.mt_bench(prompt_format="vicuna"),
         "argument --prompt_format: invalid choice: 'vicuna'"),
    Case("mt-bench-adapter-corrupt-safetensors", "eval.mt_bench",
         lambda w: w.mt_bench(adapter=w.adapter_copy("adapter_corrupt", corrupt_safetensors)),
         "adapter_model.safetensors is not a readable safetensors file"),
    # ---- eval.metrics -------------------------------------------------------------------------------
    Case("metrics-unknown-task", "eval.metrics",
         lambda w: w.metrics(task="bleu"), "unknown task 'bleu'"),
    Case("metrics-predictions-missing-field", "eval.metrics",
         lambda w: w.metrics(predictions=w.file("no_refs.jsonl", '{"id": 1, "prediction": "positive"}\n')),
         "no_refs.jsonl: row 0 (id 1): missing field 'references'"),
    Case("metrics-output-under-a-file", "eval.metrics",
         lambda w: w.metrics(output=str(Path(w.a_file) / "metrics.json")),
         "a_file.txt is not a directory"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under root (hidden ones too) with (is a directory, size, mtime in ns)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        entries[str(path.relative_to(root))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad_input"))


def stop_before_training(*args: object, **kwargs: object) -> None:
    raise TrainingStarted


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)])
        if c.xfail
        else pytest.param(c, id=c.id)
        for c in CASES
    ],
)
def test_bad_input(case: Case, workspace: Workspace, capsys, monkeypatch) -> None:
    monkeypatch.setattr(P, "init_distributed", stop_before_training)
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    argv = case.argv(workspace)  # creates the case's input files
    before = snapshot(workspace.root)
    capsys.readouterr()
    try:
        code = run_cli(MAINS[case.cli], argv)
    except TrainingStarted:
        code = 0
    out, err = capsys.readouterr()

    assert code == 2, f"exit status {code}: {argv}"
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: "), lines[-1]
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert case.fragment in lines[-1], (case.fragment, lines[-1])
    assert snapshot(workspace.root) == before, "files were written or changed"
    assert not Path(workspace.out).exists()


def test_the_table_covers_every_command_line() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.cli for c in CASES} == set(MAINS)


# ---- from the shell: the exit status and stderr a user sees ------------------------------------

SHELL_CASES = [
    ("train", lambda w: [sys.executable, str(REPO / "launch" / "train.py"), *w.train(learning_rate="abc")],
     "learning_rate='abc' is not a valid float"),
    ("eval.score", lambda w: [sys.executable, "-m", "eval.score", *w.score(num_beams="five")],
     "argument --num_beams: invalid int value: 'five'"),
    ("eval.merge", lambda w: [sys.executable, "-m", "eval.merge",
                              *w.merge(adapter=w.adapter_copy("adapter_corrupt", corrupt_safetensors))],
     "adapter_model.safetensors is not a readable safetensors file"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "command", "fragment"), SHELL_CASES, ids=[c[0] for c in SHELL_CASES]
)
def test_bad_input_from_the_shell(name, command, fragment, workspace: Workspace) -> None:
    argv = command(workspace)
    before = snapshot(workspace.root)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-1]
    assert snapshot(workspace.root) == before

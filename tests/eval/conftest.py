"""Fixtures shared by the eval tests.

- `server`: a fake OpenAI-compatible judge on 127.0.0.1 (stdlib http.server; tests.helpers). In
  pairwise prompts it scores answers containing "GOOD" 9 and others 4, plus one point for
  whichever answer it is shown first; single-answer ratings are 8 for GOOD and 3 otherwise.
- `tiny_setup`: a tiny random LLaMA with the tiny tokenizer, and a PEFT LoRA adapter trained on
  it for a few seconds to answer the SST-2 prompts, so generation reaches a label and EOS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest
import torch

from tests.helpers import SECRET, FakeJudge, JudgeHandler, TinySetup, build_tiny_setup


@pytest.fixture
def server(monkeypatch) -> Iterator[tuple[FakeJudge, str]]:
    """A running fake judge and its base URL; OPENAI_API_KEY set to SECRET."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    httpd.fake = FakeJudge()  # type: ignore[attr-defined]
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd.fake, f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


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

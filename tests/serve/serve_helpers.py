"""A tiny llmkit model whose greedy answers are known, and real servers on free loopback ports.

The scripted model is a real llmkit checkpoint (llama-tiny, random weights) with two changes that
make some of its output predictable: every block's output projections are zero (`zero_init_residual`),
so the logits depend on the last token only, and the embeddings and LM head of four tokens form a
chain. After a newline (the end of every chat prompt) it writes SCRIPT, then IMG, then MORE forever;
after any other token its logits are those of a random model. SCRIPT and IMG are tokens added to the
tokenizer, so the answer to any chat message holds `<script>` and `<img onerror>` as the page test
needs, and the MORE loop makes an answer as long as max_tokens asks (4096 tokens of context).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import torch

from llmkit.config import preset
from llmkit.io.checkpoint import save_checkpoint
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import Tokenizer

SCRIPT, IMG, MORE = "<script>alert(1)</script>", " <img src=x onerror=alert(2)>", " more"
CHAIN_ANSWER = SCRIPT + IMG + MORE  # the greedy answer to any chat prompt, max_tokens=3
CONTEXT = 4096
MODEL_ID = "scripted"
TEXTS = ["What is 2+3? The answer is 5. ", "Say hello. hello world. yes no maybe ", "the quick brown fox jumps "]


def save_scripted_model(root: Path) -> Path:
    tok = Tokenizer.train([t * 20 for t in TEXTS], vocab_size=300)
    tok.backend.add_tokens([SCRIPT, IMG, MORE])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, max_seq_len=CONTEXT, zero_init_residual=True)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    chain = [tok.encode("\n")[0], tok.token_to_id(SCRIPT), tok.token_to_id(IMG), tok.token_to_id(MORE)]
    successor = chain[1:] + chain[-1:]
    with torch.no_grad():
        embed, head = model.embeddings.embed.weight, model.lm_head.weight
        embed[:, :len(chain)] = 0  # other tokens say nothing about the chain's dimensions
        for slot, (token, following) in enumerate(zip(chain, successor)):
            embed[token] = 0
            embed[token, slot] = 1.0
            head[following, slot] = 10.0  # logit ≈ 80 after the RMSNorm: certain at any temperature ≤ 2
    save_checkpoint(root / "checkpoints", 0, tensors={"model.safetensors": model_tensors(model)},
                    json_files={"config.json": {"format": "llmkit", "model": cfg.to_dict()}},
                    copy_files={"tokenizer.json": root / "tokenizer.json"})
    return root


@contextlib.contextmanager
def running_server(lm, *, api_key: str | None = None, max_batch: int = 8, max_queued: int = 32,
                   **app_options) -> Iterator[str]:
    """The app with its own engine, served on 127.0.0.1:<free port>; yields the base URL."""
    from llmkit.serve.app import create_app
    from llmkit.serve.server import ServerThread

    engine = lm.engine(max_batch=max_batch, max_queued=max_queued)
    try:
        app = create_app(lm, engine, model_id=MODEL_ID, api_key=api_key, **app_options)
        with ServerThread(app) as url:
            yield url
    finally:
        engine.close()


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """One unlabelled sample of /metrics."""
    text = httpx.get(url + "/metrics", headers=headers).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def sse_payloads(body: str) -> list:
    """The data payloads of an SSE body: parsed JSON, or the string '[DONE]'. Asserts the framing."""
    assert body.endswith("\n\n"), body[-200:]
    payloads = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        data = block[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def wait_until(condition, seconds: float) -> bool:
    """Poll `condition` every 20 ms for up to `seconds`; its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


LLMKIT = str(Path(sys.executable).with_name("llmkit"))
URL_LINE = re.compile(r"^serving (\S+) at (http://\S+)/ ")


class Serve:
    """`llmkit serve ARGS` in a child process; `url` once it printed its line. Its stderr is a pipe, or
    the file `log` (a long-running server's log, which a pipe nobody reads would fill)."""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen([LLMKIT, "serve", *args], stdout=subprocess.PIPE, text=True,
                                     stderr=log.open("w") if log else subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.url = self.model = None

    def wait_for_url(self, seconds: float = 120) -> str:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if selector.select(timeout=0.1):
                line = self.proc.stdout.readline()
                match = URL_LINE.match(line)
                if match:
                    self.model, self.url = match.groups()
                    return self.url
                if not line:
                    break
        self.stop()
        stderr = self.log.read_text() if self.log else self.proc.stderr.read()
        raise AssertionError(f"no URL line; stderr: {stderr[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "Serve":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

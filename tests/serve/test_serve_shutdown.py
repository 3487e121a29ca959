"""`soulray serve` under SIGTERM (what Kubernetes sends): the request in flight finishes, then
Serve stops cleanly and the command exits 0, with no stack dump. Its own local Ray, as a user's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest
from soulray_testing import QUICKSTART, ROOT, SOULRAY, free_port

pytestmark = pytest.mark.slow


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 420) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"soulray serve did not come up (exit code {proc.poll()})")


def greedy_ids(export, text: str, max_tokens: int) -> int | None:
    """Where the greedy reply to `text` ends its turn (the index of the end-of-turn token among
    the first `max_tokens` generated), or None: the export run with transformers alone, from
    the prompt ids the ingress renders with the quickstart's serve section (its prepare())."""
    import torch
    from transformers import AutoModelForCausalLM

    from soulray.config import load_config
    from soulray.serve.app import build_state
    from soulray.serve.chat import prepare
    from soulray.serve.schemas import ChatCompletionRequest

    cfg = load_config(QUICKSTART, [f"serve.engine.model_dir={export}"])
    state = build_state(cfg.serve, str(export), engine=None)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": text}])
    prompt = prepare(state, request, "ref").gen.prompt_ids
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None
        )
    ids = out[0, len(prompt) :].tolist()
    end = state.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids.index(end) if end in ids else None


def test_sigterm_drains_the_request_in_flight_then_exits_cleanly(tiny_export):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        SOULRAY,
        "serve",
        "--config",
        str(QUICKSTART),
        f"serve.engine.model_dir={tiny_export}",
        f"serve.port={port}",
        "serve.engine.num_cpus=0.5",
        "serve.ingress.num_cpus=0.1",
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray, which ends with it
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_healthy(url, proc)
        hello = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        warm = httpx.post(f"{url}/v1/chat/completions", json=hello, timeout=300)
        assert warm.status_code == 200  # the engine is up, not only the proxy
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {
                "messages": [{"role": "user", "content": "tell me about it"}],
                "max_tokens": 300,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        proc.send_signal(signal.SIGTERM)  # mid-reply
        reader.join(300)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)  # the reply was not cut off
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    # the drained reply is whole: the greedy reply never ends its turn within 300 tokens
    # (greedy_ids, in this process), so all 300 came
    end_of_turn = greedy_ids(tiny_export, "tell me about it", 300)
    assert end_of_turn is None
    assert (finish[-1], chunks[-1]["usage"]["completion_tokens"]) == ("length", 300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping: finishing in-flight requests" in stdout and "stopped" in stdout
    assert "Traceback" not in stderr

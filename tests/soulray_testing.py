"""Paths and helpers the test modules import (tests/ is on sys.path through pytest's pythonpath).

Kept apart from conftest.py: several folders have a conftest.py, and `from conftest import ...`
would bind to whichever of them was imported first.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
SOULRAY = str(Path(sys.executable).parent / "soulray")


def shared_path(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the real corpora live in ../shared/data beside the repo)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_hang_ups_free_the_row(url: str, headers: dict, counters, messages: list) -> None:
    """A client that goes away (streaming or not) stops its generation: the engine runs far
    fewer steps than the reply would take, and holds no row or KV cache afterwards.
    `counters()` returns the engine replica's counters (HFEngine.counters) in either layout."""
    import time

    import httpx

    def no_live_rows(timeout_s: float = 30.0) -> dict:
        deadline = time.time() + timeout_s
        while (now := counters())["live_rows"] and time.time() < deadline:
            time.sleep(0.1)
        return now

    post = f"{url}/v1/chat/completions"
    body = {"messages": messages, "max_tokens": 1000, "temperature": 1, "seed": 0}
    start = sum(counters()["step_sizes"].values())
    whole = httpx.post(post, json=body, headers=headers, timeout=300).json()
    assert whole["choices"][0]["finish_reason"] == "length", whole  # alone: all 1000 tokens
    full = sum(counters()["step_sizes"].values()) - start  # the steps of a whole reply
    assert full >= 1000
    for stream in (True, False):
        before = sum(counters()["step_sizes"].values())
        if stream:
            with httpx.stream("POST", post, json={**body, "stream": True}, headers=headers) as r:
                assert next(r.iter_lines()).startswith("data: ")  # started; then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(post, json=body, headers=headers, timeout=0.3)
        after = no_live_rows()
        assert after["live_rows"] == 0 and after["kv_width"] == 0
        # Cancellation lands within Serve's disconnect detection (a few hundred ms after the
        # hang-up: measured 3-22 steps streamed and 203-279 not, where the 0.3 s before the
        # client's timeout count too); without it the row would run all `full` steps. Steps
        # in a fixed time are a larger share of `full` on a faster machine, so the bound keeps
        # room: half for a stream (measured 2 % at most), 0.8 for the 0.3 s wait (28 %).
        ran = sum(after["step_sizes"].values()) - before
        assert ran < (0.5 if stream else 0.8) * full, (stream, ran, full)


RETRAIN_TEST = "test_safety_train.py::test_retraining_reproduces_the_shipped_weights"
_RETRAIN: list[tuple[subprocess.Popen, Path]] = []


def retrain_in_background() -> tuple[subprocess.Popen, Path]:
    """Retrain the crisis classifier, then the reply head, in a child process at nice 19; returns
    the process and the weights.npz it writes (reply_weights.npz and retrain.log beside it), the
    same on every call. tests/conftest.py
    starts it once the session's tests are collected: its ~15 CPU-minutes use the cores the
    other tests leave idle (they mostly wait on Ray and servers; at nice 19 it yields the CPU
    whenever they want it), and the test that compares its weights, run last, waits for the
    rest. Same command, same weights as in the foreground. The child asks Linux to kill it when
    pytest dies, however it dies (its own workers already die with it)."""
    if not _RETRAIN:
        out = Path(tempfile.mkdtemp(prefix="soulray-retrain-")) / "weights.npz"
        # `python -m soulray.safety.train`, after the trainer's own die-with-parent hook, then
        # `python -m soulray.safety.train_reply` (reply_weights.npz beside it), which finds the
        # ordinary messages' embeddings in the first one's --cache and embeds only the replies
        cache, reply = out.parent / "embeddings.npz", out.parent / "reply_weights.npz"
        boot = (
            "import sys, soulray.safety.train as t, soulray.safety.train_reply as r;"
            "t._die_with_parent(); t.main();"
            f"sys.argv = ['train_reply', '--out', {str(reply)!r}, '--jobs', '2', "
            f"'--cache', {str(cache)!r}]; r.main()"
        )
        cmd = [*("nice", "-n", "19", sys.executable, "-c", boot), "--out", str(out)]
        cmd += ["--jobs", "2", "--cache", str(cache)]
        with (out.parent / "retrain.log").open("w") as log:
            run = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _RETRAIN.append((run, out))
    return _RETRAIN[0]


SCREENED_MODULES = ("safety/test_safety_regression.py", "safety/test_safety_screen.py")
_SCREENING: list[tuple[subprocess.Popen, Path]] = []


def screen_in_background() -> None:
    """Screen the regression sets' messages and the reply sets (tests/safety/screened.py) in a
    child process at nice 19, started once the session's tests are collected, as the retrain
    is: the fixtures that need it (reached ~15 minutes in) then find it done. The same function
    on the same texts as in the foreground, in its own two processes."""
    if not _SCREENING:
        out = Path(tempfile.mkdtemp(prefix="soulray-screened-")) / "screened.json"
        cmd = ["nice", "-n", "19", sys.executable, str(ROOT / "tests/safety/screened.py"), str(out)]
        with (out.parent / "screened.log").open("w") as log:
            run = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _SCREENING.append((run, out))


SCREENING_TIMEOUT_S = 2400  # it takes ~3-5 min on 2 cores beside the suite


def background_screening() -> Path | None:
    """The background screening's JSON once it is written (waiting for it), or None when none
    was started or it failed (its log is printed: the caller then screens in the foreground)."""
    if not _SCREENING:
        return None
    run, out = _SCREENING[0]
    try:
        code = run.wait(timeout=SCREENING_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a hung child fails its tests, not the whole suite
        run.kill()
        run.wait()
        print(f"the background screening did not finish in {SCREENING_TIMEOUT_S} s; killed")
        code = None
    if code != 0 or not out.exists():
        print((out.parent / "screened.log").read_text()[-3000:])
        return None
    return out


def stop_retrain() -> None:
    """Kill the background retrain and screening if they still run (their tests were not
    reached: -x, ^C), and remove their folders."""
    for run, out in [*_RETRAIN, *_SCREENING]:
        if run.poll() is None:
            run.kill()
            run.wait()
        shutil.rmtree(out.parent, ignore_errors=True)

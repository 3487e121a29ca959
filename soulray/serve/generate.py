"""Batched token-by-token generation with transformers: the core of the `hf` engine.

`decode` runs one batch of requests together: left-padded prefill, then one forward per token
with the KV cache, each row sampled with its own temperature, top_p and seed (so a request's
output does not depend on what it was batched with), detokenized incrementally (whole UTF-8
characters only) and checked against its own stop strings. Rows that finish are dropped from the
batch, so the cost follows the rows still running. Plain torch, no Ray: tests call it directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soulray.data.render import find_end_of_turn
from soulray.data.tokenizer import load_tokenizer
from soulray.serve.adapters import forward_args
from soulray.serve.logits import TokenLogprob, TokenText, adjust_logits, token_logprobs
from soulray.serve.prompt import tag_end
from soulray.train.model import pick_dtype


@dataclass(slots=True)
class GenRequest:
    """What an engine needs: the prompt already rendered to ids by the ingress."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # the reply opens with a "[Strategy] " tag the client never sees: stops match after it
    tagged: bool = False
    adapter: str | None = None  # a serve.adapters name; None = the base model
    n: int = 1  # choices: n rows that share one prefill of the prompt
    logprobs: int | None = None  # None = off; k = each token's logprob and the top k tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # Request fields only the vllm engine honours (response_format); the ingress refuses them
    # for the hf engine, so the hf engine never sees them set.
    vllm_only: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Delta:
    """New text of one choice of a request after one step; `tokens` counts that choice's
    completion tokens so far."""

    text: str
    tokens: int
    finish_reason: str | None = None  # "stop" or "length" on the choice's last delta
    index: int = 0  # the choice (0..n-1)
    logprobs: list[TokenLogprob] | None = None  # one entry per token of this delta (if asked)


def join_deltas(first: Delta, then: Delta) -> Delta:
    """Two consecutive deltas of one choice as one."""
    logprobs = None
    if first.logprobs is not None or then.logprobs is not None:
        logprobs = (first.logprobs or []) + (then.logprobs or [])
    return Delta(first.text + then.text, then.tokens, then.finish_reason, then.index, logprobs)


def add_delta(choices: dict[int, Delta], delta: Delta) -> None:
    """Accumulate a streamed delta into its choice's whole reply."""
    held = choices.get(delta.index)
    choices[delta.index] = delta if held is None else join_deltas(held, delta)


def whole_replies(choices: dict[int, Delta]) -> list[Delta]:
    """The accumulated choices in index order."""
    return [choices[k] for k in sorted(choices)]


def pick_device(use_gpu: bool) -> str:
    """cuda only for a replica given GPUs (engine.num_gpus > 0): Ray leaves every GPU of the
    node visible to a replica with none, which must not load onto one Ray did not count."""
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def load_model(
    model_dir: str, adapter_dir: str | None, dtype: str, use_gpu: bool = False
) -> tuple[Any, Any, str]:
    """The export (or base + LoRA adapter, merged) in eval mode, its tokenizer, and the device."""
    from transformers import AutoModelForCausalLM

    device = pick_device(use_gpu)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype, device))
    tokenizer_dir = model_dir
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        if (Path(adapter_dir) / "tokenizer_config.json").exists():
            tokenizer_dir = adapter_dir
    return model.to(device).eval(), load_tokenizer(tokenizer_dir), device


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's eos ids, the tokenizer's, and the
    chat template's end-of-turn token (Gemma's <end_of_turn>, Llama-3's <|eot_id|>, which are
    not eos) when the template's marker is one token."""
    found = model.generation_config.eos_token_id
    ids = set(found if isinstance(found, list) else [found] if found is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if tokenizer.chat_template:
        eot = tokenizer(find_end_of_turn(tokenizer), add_special_tokens=False).input_ids
        if len(eot) == 1:
            ids.add(eot[0])
    return ids


class Detokenizer:
    """Incremental decode: emits text only once it forms whole characters (TGI's offsets)."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend = tokenizer.backend_tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.backend.decode  # the Rust tokenizer: a fraction of the Python wrapper's cost
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first one seen.
    With `tagged`, a leading "[Strategy] " tag passes unmatched: the client sees the text after
    it, so a stop string inside the tag's name must not end the reply."""

    def __init__(self, stops: list[str], tagged: bool = False) -> None:
        self.stops, self.pending = stops, ""
        self.lead: str | None = "" if tagged else None  # the reply's start, until the tag ends

    def push(self, text: str) -> tuple[str, bool]:
        if self.lead is not None:
            self.lead += text
            end = tag_end(self.lead)
            if end is None:
                return "", False
            tag, text, self.lead = self.lead[:end], self.lead[end:], None
            out, stopped = self.push(text)
            return tag + out, stopped
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> tuple[str, bool]:
        """The text held back when the reply ends, and whether a stop string cut it. A start
        not yet told to be a tag or not ("[I see. Go on" when eos or max_tokens ends it) is
        matched against the stops too, or it would reach the client stop strings and all."""
        if self.lead is not None:
            lead, self.lead = self.lead, None
            end = tag_end(lead, final=True)
            out, stopped = self.push(lead[end:])
            return lead[:end] + out + self.flush()[0], stopped
        out, self.pending = self.pending, ""  # a stop's first characters, never a whole one
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for k in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


NUCLEUS_K = 64  # top-p is resolved within the top 64 tokens when they hold the mass (no sort)


def sample(
    logits: torch.Tensor,
    reqs: list[GenRequest],
    gens: list[torch.Generator],
    history: list[list[int]] | None = None,
) -> list[int]:
    """One token per row (temperature 0 = greedy), each row with its own generator, so a row's
    draw never depends on the other rows of the batch. A row's penalties (over `history`, the
    ids it generated so far) and logit_bias apply first (`logits.adjust_logits`).

    The draw is the exponential race argmax(p / E), E ~ Exp(1), which samples exactly from p.
    Top-p keeps the most likely tokens until their mass reaches top_p; it is found among the
    top NUCLEUS_K tokens when they hold that mass (the usual case), else by a full sort.
    """
    logits = adjust_logits(logits.float(), reqs, history or [[] for _ in reqs])
    temps = torch.tensor([max(r.temperature, 1e-5) for r in reqs], device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1).cpu()
    picks = logits.argmax(-1).tolist()
    top_vals, top_idx = probs.topk(min(NUCLEUS_K, probs.shape[-1]), dim=-1)
    covered = top_vals.sum(-1).tolist()
    for i, (req, gen) in enumerate(zip(reqs, gens, strict=True)):
        if req.temperature <= 0:
            continue
        if req.top_p >= 1.0:
            vals, idx = probs[i], torch.arange(probs.shape[-1])
        else:
            in_top = covered[i] >= req.top_p
            vals, idx = (top_vals[i], top_idx[i]) if in_top else probs[i].sort(descending=True)
            # always keeps the top token (top_p 0, which OpenAI accepts, is the top token alone)
            n = max(1, int(((vals.cumsum(0) - vals) < req.top_p).sum()))
            vals, idx = vals[:n], idx[:n]
        race = int((vals / torch.empty(len(vals)).exponential_(generator=gen)).argmax())
        picks[i] = int(idx[race])
    return picks


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


@dataclass(slots=True)
class Row:
    """One request inside a running batch; `tag` is the caller's (where its deltas go)."""

    req: GenRequest
    detok: Detokenizer
    stop: StopMatcher
    gen: torch.Generator
    tag: Any = None
    tokens: int = 0
    index: int = 0  # which of the request's n choices
    text: TokenText | None = None  # set when the request asked for logprobs
    generated: list[int] = field(default_factory=list)  # ids so far, for the penalties


@dataclass(slots=True)
class Running:
    """A batch being decoded: rows, their KV cache, left-padded attention mask, last positions
    ([B, 1]) and the logits the next token of each row is sampled from ([B, V])."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


@torch.inference_mode()
def prefill(
    model: Any, tokenizer: Any, reqs: list[GenRequest], device: str, tags: list[Any] | None = None
) -> Running:
    """Run the prompts (left-padded together) and return the batch ready for its first token.
    A request with n > 1 is prefilled once; its n rows then share copies of that KV cache."""
    rows = [
        build_row(r, tokenizer, tag, j)
        for r, tag in zip(reqs, tags or [None] * len(reqs), strict=True)
        for j in range(r.n)
    ]
    ids, mask = left_pad([r.prompt_ids for r in reqs], tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=1,
        **forward_args(model, [r.adapter for r in reqs]),
    )
    batch = Running(rows, out.cache, mask, positions[:, -1:], out.logits[:, -1])
    if len(rows) > len(reqs):  # rows of one request: the prompt's cache row, repeated
        expand = [k for k, r in enumerate(reqs) for _ in range(r.n)]
        index = torch.tensor(expand, device=mask.device, dtype=torch.long)
        batch.cache.batch_select_indices(index)
        batch.mask, batch.positions = batch.mask[index], batch.positions[index]
        batch.logits = batch.logits[index]
    return batch


def build_row(req: GenRequest, tokenizer: Any, tag: Any, index: int) -> Row:
    """Row `index` of a request; choice j of a seeded request draws with seed + j, so every
    choice differs and the whole reply is reproducible."""
    seed = None if req.seed is None else req.seed + index
    text = TokenText(tokenizer) if req.logprobs is not None else None
    return Row(
        req,
        Detokenizer(tokenizer),
        StopMatcher(req.stop, req.tagged),
        _generator(seed),
        tag,
        0,
        index,
        text,
    )


@torch.inference_mode()
def step(model: Any, batch: Running, eos: set[int]) -> list[tuple[Row, Delta]]:
    """Sample one token for every row, drop the rows that finished, and run the forward pass
    for the rest (so `batch` is ready for the next step). Returns each row's Delta."""
    rows = batch.rows
    history = [r.generated for r in rows]
    picked = sample(batch.logits, [r.req for r in rows], [r.gen for r in rows], history)
    found = token_logprobs(batch.logits, picked, [r.req.logprobs for r in rows])
    out = [
        (row, _advance(row, token, eos, lp))
        for row, token, lp in zip(rows, picked, found, strict=True)
    ]
    keep = [k for k, (_, delta) in enumerate(out) if delta.finish_reason is None]
    picked = [picked[k] for k in keep]
    select(batch, keep)
    if batch.rows:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        batch.positions = batch.positions + 1
        ids = torch.tensor(picked, device=batch.mask.device).unsqueeze(1)
        logits = model(
            input_ids=ids,
            attention_mask=batch.mask,
            position_ids=batch.positions,
            cache=batch.cache,
            **forward_args(model, [r.req.adapter for r in batch.rows]),
        ).logits
        batch.logits = logits[:, -1]
    return out


def select(batch: Running, keep: list[int]) -> None:
    """Keep only the rows at `keep` (in that order): the others leave the KV cache, the mask and
    the logits at once, and the columns left as padding for every remaining row are trimmed."""
    if len(keep) == len(batch.rows):
        return
    index = torch.tensor(keep, device=batch.mask.device, dtype=torch.long)
    if keep:
        batch.cache.batch_select_indices(index)
    batch.mask, batch.positions = batch.mask[index], batch.positions[index]
    batch.logits = batch.logits[index]
    batch.rows = [batch.rows[k] for k in keep]
    trim(batch)


def trim(batch: Running) -> None:
    """Drop the leading columns that no running row attends to. Rows are left-padded, so after
    this the width is the longest live row's length: memory and step time follow the live
    requests, not the history of the batch. (The slices are views; the next forward's cache
    update concatenates into fresh tensors, which releases the old storage.)"""
    if not batch.rows or not can_merge(batch):
        return
    first = int(batch.mask.any(0).int().argmax())  # the first column some row attends to
    if first == 0:
        return
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    batch.mask = batch.mask[:, first:]


def width(batch: Running) -> int:
    """Columns of the batch's mask (and KV cache)."""
    return int(batch.mask.shape[1])


def can_merge(batch: Running) -> bool:
    """Rows can join a running batch when its cache is plain per-layer key/value tensors."""
    layers = getattr(batch.cache, "layers", None) or []
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def merge(batch: Running, joining: Running) -> Running:
    """One batch of both: the shorter cache and mask are left-padded (masked) to equal length,
    so rows that joined later decode alongside the others (continuous batching)."""
    assert can_merge(batch) and can_merge(joining)
    width = max(batch.mask.shape[1], joining.mask.shape[1])

    def pad(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
        missing = width - t.shape[seq_dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[seq_dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=seq_dim)

    # Everything joined is built first and assigned only once all of it exists: a failure
    # part-way (out of memory: a merge copies the whole cache) leaves the running batch as it
    # was, so only the joining rows fail, as the scheduler tells them.
    layers = [
        (
            torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)]),
            torch.cat([pad(mine.values, 2), pad(theirs.values, 2)]),
        )
        for mine, theirs in zip(batch.cache.layers, joining.cache.layers, strict=True)
    ]
    mask = torch.cat([pad(batch.mask, 1), pad(joining.mask, 1)])
    positions = torch.cat([batch.positions, joining.positions])
    logits = torch.cat([batch.logits, joining.logits])
    for layer, (keys, values) in zip(batch.cache.layers, layers, strict=True):
        layer.keys, layer.values = keys, values
    batch.mask, batch.positions, batch.logits = mask, positions, logits
    batch.rows += joining.rows
    trim(batch)
    return batch


def decode(
    model: Any, tokenizer: Any, reqs: list[GenRequest], eos: set[int], device: str
) -> Iterator[list[Delta | None]]:
    """One static batch: yield, per step, one entry per request (its Delta, or None once done).
    One choice per request (the scheduler serves n > 1)."""
    if any(r.n > 1 for r in reqs):
        raise ValueError("decode yields one choice per request; serve n > 1 through Scheduler")
    batch = prefill(model, tokenizer, reqs, device, tags=list(range(len(reqs))))
    while batch.rows:
        out: list[Delta | None] = [None] * len(reqs)
        for row, delta in step(model, batch, eos):
            out[row.tag] = delta
        yield out


def _advance(
    row: Row, token: int, eos: set[int], found: tuple[float, list[int], list[float]] | None = None
) -> Delta:
    """Feed one sampled token to a row; the Delta says what text it adds and if it is done.
    A row that asked for logprobs gets one entry per completion token (not for eos)."""
    if token in eos:
        return Delta(row.stop.flush()[0], row.tokens, "stop", row.index, _no_logprobs(row))
    row.tokens += 1
    row.generated.append(token)
    logprobs = None
    if row.text is not None and found is not None:
        logprobs = [row.text.entries(found, token)]
    text, stopped = row.stop.push(row.detok.push(token))
    if stopped:
        return Delta(text, row.tokens, "stop", row.index, logprobs)
    if row.tokens >= row.req.max_tokens:
        rest, stopped = row.stop.flush()
        finish = "stop" if stopped else "length"
        return Delta(text + rest, row.tokens, finish, row.index, logprobs)
    return Delta(text, row.tokens, None, row.index, logprobs)


def _no_logprobs(row: Row) -> list[TokenLogprob] | None:
    return [] if row.text is not None else None


def generate_text(model: Any, tokenizer: Any, req: GenRequest, device: str) -> Delta:
    """One request to completion (tests and the direct-call benchmark)."""
    text, last = "", Delta("", 0)
    for step in decode(model, tokenizer, [req], eos_ids(model, tokenizer), device):
        last = step[0] or last
        text += last.text
    return Delta(text, last.tokens, last.finish_reason)

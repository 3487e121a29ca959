"""Per-row logit processing of the `hf` engine: OpenAI's penalties and logit_bias, and logprobs.

Each is batched over the rows that use it with tensor ops (no loop over the vocabulary), and
costs nothing when no row in the batch uses it, so the plain sampler stays as fast as it was.
The formulas are OpenAI's (platform docs, "Parameter details"): for a row whose generated
tokens so far count c[j] of token j,

    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    logit[j] += logit_bias[j]

applied to the model's raw logits before temperature and top_p. Logprobs are those of the
model's own distribution (log-softmax of the raw logits, before penalties, bias, temperature
and top_p), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class TokenLogprob:
    """One token of a reply with its logprob, UTF-8 bytes and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[TokenLogprob] = field(default_factory=list)


def uses_penalties(req: Any) -> bool:
    return bool(req.presence_penalty or req.frequency_penalty)


def adjust_logits(logits: torch.Tensor, reqs: list[Any], history: list[list[int]]) -> torch.Tensor:
    """The logits with each row's penalties (over `history`, its generated ids) and logit_bias;
    the same tensor when no row uses either. Only the (row, token) entries a penalty or a bias
    touches are updated: the cost follows the tokens generated, not the vocabulary."""
    penalised = [i for i, r in enumerate(reqs) if uses_penalties(r)]
    biased = [i for i, r in enumerate(reqs) if r.logit_bias]
    if not penalised and not biased:
        return logits
    logits = logits.clone()
    if penalised:
        rows, ids, counts = token_counts([history[i] for i in penalised], logits.shape[-1])
        freq = torch.tensor([reqs[i].frequency_penalty for i in penalised])
        pres = torch.tensor([reqs[i].presence_penalty for i in penalised])
        penalty = penalties(counts, freq[rows], pres[rows])
        where = (torch.tensor(penalised)[rows].to(logits.device), ids.to(logits.device))
        logits.index_put_(where, -penalty.to(logits.dtype).to(logits.device), accumulate=True)
    if biased:
        rows = torch.tensor([i for i in biased for _ in reqs[i].logit_bias])
        ids = torch.tensor([t for i in biased for t in reqs[i].logit_bias])
        bias = torch.tensor([v for i in biased for v in reqs[i].logit_bias.values()])
        where = (rows.to(logits.device), ids.to(logits.device))
        logits.index_put_(where, bias.to(logits.dtype).to(logits.device), accumulate=True)
    return logits


def token_counts(
    history: list[list[int]], vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each (row, token) a row generated, once, with how often: (rows, ids, counts)."""
    rows = torch.tensor([i for i, ids in enumerate(history) for _ in ids], dtype=torch.long)
    ids = torch.tensor([t for ids in history for t in ids], dtype=torch.long)
    keys, counts = torch.unique(rows * vocab + ids, return_counts=True)
    return keys // vocab, keys % vocab, counts.float()


def penalties(
    counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """What OpenAI's formula subtracts from the logit of a token generated `counts` (> 0) times:
    count * frequency_penalty + presence_penalty."""
    return counts * frequency + presence


def token_logprobs(
    logits: torch.Tensor, picked: list[int], wanted: list[int | None]
) -> list[tuple[float, list[int], list[float]] | None]:
    """Per row: (the picked token's logprob, the top-k ids, their logprobs) when the row asked
    for logprobs (`wanted[i]` = k), else None. One log-softmax over the rows that asked."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    out: list[tuple[float, list[int], list[float]] | None] = [None] * len(wanted)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logps = torch.log_softmax(logits[index].float(), dim=-1)
    chosen = logps.gather(1, torch.tensor([[picked[i]] for i in rows], device=logits.device))
    k = max(wanted[i] or 0 for i in rows)
    top_vals, top_ids = logps.topk(k, dim=-1) if k else (logps[:, :0], logps[:, :0].long())
    found = zip(rows, chosen[:, 0].tolist(), top_ids.tolist(), top_vals.tolist(), strict=True)
    for i, lp, ids, vals in found:
        k_i = wanted[i] or 0
        out[i] = (lp, ids[:k_i], vals[:k_i])
    return out


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE writes each byte as one
    printable character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenText:
    """A token id as OpenAI shows it in logprobs: its text and its exact UTF-8 bytes (a token
    that holds part of a character has the bytes of that part; its text is then lossy)."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import decoders

        self.backend = tokenizer.backend_tokenizer
        self.byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)
        self.table = _byte_decoder() if self.byte_level else {}

    def bytes_of(self, token_id: int) -> list[int]:
        piece = self.backend.id_to_token(token_id) or ""
        if self.byte_level and all(c in self.table for c in piece):
            return [self.table[c] for c in piece]
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
            return [int(piece[3:5], 16)]
        return list(self.text_of(token_id).encode("utf-8"))

    def text_of(self, token_id: int) -> str:
        return self.backend.decode([token_id], skip_special_tokens=False)

    def entry(
        self, token_id: int, logprob: float, top: list[TokenLogprob] | None = None
    ) -> TokenLogprob:
        raw = bytes(self.bytes_of(token_id))
        text = raw.decode("utf-8", errors="replace") if self.byte_level else self.text_of(token_id)
        return TokenLogprob(text, logprob, list(raw), top or [])

    def entries(self, found: tuple[float, list[int], list[float]], token_id: int) -> TokenLogprob:
        """The logprob entry of a sampled token with its top alternatives."""
        lp, ids, vals = found
        return self.entry(token_id, lp, [self.entry(i, v) for i, v in zip(ids, vals, strict=True)])

"""The hf engine's decode loop: batched equals alone, seeds, stops, incremental text, LoRA."""

from __future__ import annotations

import pytest
import torch

from soulray.serve.generate import (
    Delta,
    Detokenizer,
    GenRequest,
    StopMatcher,
    decode,
    eos_ids,
    generate_text,
    left_pad,
    load_model,
    sample,
)


def prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(rendered, add_special_tokens=False).input_ids


def run_batch(model, tokenizer, device, reqs):
    texts, last = ["" for _ in reqs], [None for _ in reqs]
    for step in decode(model, tokenizer, reqs, eos_ids(model, tokenizer), device):
        for i, delta in enumerate(step):
            if delta is not None:
                texts[i] += delta.text
                last[i] = delta
    return [Delta(t, d.tokens, d.finish_reason) for t, d in zip(texts, last, strict=True)]


def test_left_pad_puts_padding_first():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_rows_equal_each_request_alone(tiny_model):
    model, tok, device = tiny_model
    texts = ["hi", "I failed my exam and my parents are upset", "最近压力好大，睡不着"]
    reqs = [
        GenRequest(str(i), prompt_ids(tok, t), 12, temperature, 0.9, seed=i)
        for i, t in enumerate(texts)
        for temperature in (0.0, 1.0)
    ]
    alone = [generate_text(model, tok, r, device) for r in reqs]
    together = run_batch(model, tok, device, reqs)
    assert together == alone  # greedy and seeded sampling do not depend on the batch
    assert all(d.tokens == 12 and d.finish_reason == "length" for d in alone)


def test_seed_makes_sampling_repeatable(tiny_model):
    model, tok, device = tiny_model
    ids = prompt_ids(tok, "hello there")
    first = generate_text(model, tok, GenRequest("a", ids, 16, 1.0, 1.0, seed=7), device)
    again = generate_text(model, tok, GenRequest("b", ids, 16, 1.0, 1.0, seed=7), device)
    other = generate_text(model, tok, GenRequest("c", ids, 16, 1.0, 1.0, seed=8), device)
    assert first == again
    assert first.text != other.text


def test_rows_finish_independently(tiny_model):
    model, tok, device = tiny_model
    ids = prompt_ids(tok, "hello")
    out = run_batch(
        model, tok, device, [GenRequest("a", ids, 3, 0.0, 1.0), GenRequest("b", ids, 9, 0.0, 1.0)]
    )
    assert [d.tokens for d in out] == [3, 9]


def test_stop_matcher_cuts_at_a_stop_split_across_pieces():
    stop = StopMatcher(["END", "\n\n"])
    assert stop.push("hello E") == ("hello ", False)  # "E" may start "END": held back
    assert stop.push("N") == ("", False)
    assert stop.push("D and more") == ("", True)
    again = StopMatcher(["END"])
    assert again.push("an EN") == ("an ", False)
    assert again.push("try") == ("ENtry", False)
    assert again.flush() == ("", False)


def test_detokenizer_emits_whole_characters(tiny_model):
    _, tok, _ = tiny_model
    text = "我很难过。I feel sad 😢 今天"
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in tok(text, add_special_tokens=False).input_ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_lora_adapter_is_merged(tiny_export, tiny_model):
    base, tok, device = tiny_model
    merged, _, _ = load_model(str(tiny_export), str(tiny_export / "adapter"), "auto")
    ids = torch.tensor([prompt_ids(tok, "hello")])
    with torch.no_grad():
        base_logits, merged_logits = base(ids).logits, merged(ids).logits
    assert not torch.allclose(base_logits, merged_logits)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_export)), str(tiny_export / "adapter")
    )
    with torch.no_grad():
        assert (reference(ids).logits - merged_logits).abs().max() < 1e-3


def test_sampling_follows_temperature_and_top_p():
    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0))), -30.0]])
    draws = [
        sample(logits, [GenRequest("x", [], 1, 1.0, 1.0)], [_seeded(i)])[0] for i in range(2000)
    ]
    share = draws.count(1) / len(draws)
    assert abs(share - 0.75) < 0.04 and 2 not in draws  # p = softmax = [0.25, 0.75, ~0]
    cooler = [
        sample(logits, [GenRequest("x", [], 1, 0.5, 1.0)], [_seeded(i)])[0] for i in range(2000)
    ]
    # T = 0.5 squares the odds: p ~ [1, 3**2, ~0] -> 0.9 for token 1 (binomial sd 0.007)
    assert abs(cooler.count(1) / len(cooler) - 0.9) < 0.03 and 2 not in cooler
    top = [sample(logits, [GenRequest("x", [], 1, 1.0, 0.5)], [_seeded(i)])[0] for i in range(50)]
    assert set(top) == {1}  # top_p 0.5 keeps only the most likely token
    three = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = [sample(three, [GenRequest("x", [], 1, 1.0, 0.7)], [_seeded(i)])[0] for i in range(2000)]
    # top_p 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: tokens 1 and 2 are kept and
    # renormalised to 0.625 / 0.375; token 0 (0.2) is never drawn
    assert set(kept) == {1, 2} and abs(kept.count(1) / len(kept) - 0.625) < 0.04
    assert sample(logits, [GenRequest("x", [], 1, 0.0, 1.0)], [_seeded(0)]) == [1]  # greedy
    # top_p 0, which OpenAI accepts, keeps the top token alone (it left an empty nucleus)
    flat = torch.zeros(1, 3) + torch.tensor([0.0, 0.1, 0.0])
    assert {
        sample(flat, [GenRequest("x", [], 1, 1.0, 0.0)], [_seeded(i)])[0] for i in range(50)
    } == {1}


def _seeded(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def test_stream_coalescing_keeps_first_and_last_and_all_text():
    import asyncio

    from soulray.serve.engine import coalesce

    async def deltas():
        for i in range(5):
            yield Delta(f"t{i} ", i + 1, "length" if i == 4 else None)

    async def collect(interval):
        return [d async for d in coalesce(deltas(), interval)]

    merged = asyncio.run(collect(10.0))
    assert merged == [Delta("t0 ", 1), Delta("t1 t2 t3 t4 ", 5, "length")]
    assert len(asyncio.run(collect(0.0))) == 5


def test_rows_joining_a_running_batch_decode_as_if_alone(tiny_model):
    """Continuous batching: requests merged into a batch mid-flight (caches of different
    lengths, left-padded) produce exactly what they produce alone."""
    from soulray.serve.generate import can_merge, merge, prefill, step

    model, tok, device = tiny_model
    eos = eos_ids(model, tok)
    first = [
        GenRequest("a", prompt_ids(tok, "hi"), 10, 0.0, 1.0),
        GenRequest("b", prompt_ids(tok, "最近压力好大，睡不着"), 6, 1.0, 0.9, seed=5),
    ]
    later = [
        GenRequest("c", prompt_ids(tok, "I failed my exam and my parents are upset"), 8, 0.0, 1.0),
        GenRequest("d", prompt_ids(tok, "ok"), 9, 1.0, 0.8, seed=2),
    ]
    texts: dict[str, str] = {}
    batch = prefill(model, tok, first, device, tags=["a", "b"])
    for _ in range(3):
        for row, delta in step(model, batch, eos):
            texts[row.tag] = texts.get(row.tag, "") + delta.text
    assert can_merge(batch)
    batch = merge(batch, prefill(model, tok, later, device, tags=["c", "d"]))
    assert len(batch.rows) == 4
    while batch.rows:
        for row, delta in step(model, batch, eos):
            texts[row.tag] = texts.get(row.tag, "") + delta.text
    for req in first + later:
        assert texts[req.request_id] == generate_text(model, tok, req, device).text, req


def test_a_merge_that_fails_part_way_leaves_the_running_batch_as_it_was(tiny_model, monkeypatch):
    """Out of memory in the third copy of a merge (it copies the whole cache): the running
    rows keep their cache, mask and positions, and decode on exactly as if nothing had joined;
    only the joining rows fail (the scheduler tells them so). It left the first layers joined
    and the rest not, and the next step failed every running request."""
    import soulray.serve.generate as generate
    from soulray.serve.generate import merge, prefill, step

    model, tok, device = tiny_model
    eos = eos_ids(model, tok)
    req = GenRequest("a", prompt_ids(tok, "hi"), 12, 0.0, 1.0)
    batch = prefill(model, tok, [req], device, tags=["a"])
    text = "".join(d.text for _, d in step(model, batch, eos))
    joining = prefill(model, tok, [GenRequest("b", prompt_ids(tok, "ok"), 4, 0.0, 1.0)], device)
    before = [(layer.keys.shape, layer.values.shape) for layer in batch.cache.layers]
    mask, positions = batch.mask.clone(), batch.positions.clone()
    calls = {"n": 0}
    cat = torch.cat

    def failing_cat(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("injected")
        return cat(*args, **kwargs)

    monkeypatch.setattr(generate.torch, "cat", failing_cat)
    with pytest.raises(torch.OutOfMemoryError):
        merge(batch, joining)
    monkeypatch.setattr(generate.torch, "cat", cat)
    assert [(layer.keys.shape, layer.values.shape) for layer in batch.cache.layers] == before
    assert torch.equal(batch.mask, mask) and torch.equal(batch.positions, positions)
    assert len(batch.rows) == 1
    while batch.rows:
        text += "".join(d.text for _, d in step(model, batch, eos))
    assert text == generate_text(model, tok, req, device).text


def test_decode_refuses_more_than_one_choice(tiny_model):
    model, tok, device = tiny_model
    two = GenRequest("a", prompt_ids(tok, "hi"), 2, 1.0, 1.0, n=2)
    with pytest.raises(ValueError, match="one choice per request"):
        next(decode(model, tok, [two], eos_ids(model, tok), device))


def test_a_replica_without_gpus_stays_on_the_cpu_of_a_gpu_node(monkeypatch) -> None:
    """Ray leaves a node's GPUs visible to a num_gpus=0 replica: it must not use them."""
    import torch

    from soulray.serve.generate import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(False) == "cpu"
    assert pick_device(True) == "cuda"

"""Multi-LoRA: adapters over one tiny base, each under its own model name. The scheduler with the
adapter pool (mixed batches equal lone runs and a direct peft forward; the LRU bound's exact load
counts), then the whole app on a local Ray Serve with the official openai client over HTTP."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from openai import OpenAI
from soulray_testing import free_port

from soulray.config import Config
from soulray.serve.adapters import AdapterPool
from soulray.serve.generate import GenRequest, eos_ids, load_model
from soulray.serve.scheduler import Scheduler
from soulray.serve.tiny import build_tiny_export, save_random_adapter

NAMES = ("calm", "warm", "brisk")
PROMPT = "I have been feeling lonely since I moved to a new city."


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A tiny export (no strategy tags: replies are the raw generated text) and three random
    LoRA adapters over it, each from its own seed."""
    from transformers import AutoModelForCausalLM

    root = build_tiny_export(tmp_path_factory.mktemp("multi-lora"), strategy_tags=False)
    for seed, name in enumerate(NAMES, start=1):
        torch.manual_seed(seed)
        save_random_adapter(AutoModelForCausalLM.from_pretrained(str(root)), root / name)
    return root


def peft_greedy(root, tok, adapter: str | None, ids: list[int], n: int) -> str:
    """The reference: a fresh peft model of one adapter, greedy, full forward per token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(root))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(root / adapter))
    model.eval()
    eos, out = eos_ids(model, tok), list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return tok.decode(out[len(ids) :], skip_special_tokens=True)


def make_scheduler(root, max_loaded: int, max_rows: int = 8) -> Scheduler:
    model, tok, device = load_model(str(root), None, "auto")
    paths = {name: str(root / name) for name in NAMES}
    pool = AdapterPool(model, paths, max_loaded)
    return Scheduler(model, tok, eos_ids(model, tok), device, max_rows, adapters=pool)


def request(tok, adapter: str | None, i: int = 0) -> GenRequest:
    ids = tok(f"{PROMPT} {i}", add_special_tokens=False).input_ids
    return GenRequest(f"r{i}", ids, 12, 0.0, 1.0, adapter=adapter)


async def run_all(sched: Scheduler, reqs: list[GenRequest]) -> list[str]:
    async def one(req: GenRequest) -> str:
        return "".join([d.text async for d in sched.deltas(sched.submit(req))])

    return await asyncio.gather(*(one(r) for r in reqs))


def test_mixed_batch_equals_lone_runs_and_direct_peft(lora_export):
    sched = make_scheduler(lora_export, max_loaded=3)
    tok = sched.tokenizer
    reqs = [request(tok, name, i) for i, name in enumerate([None, *NAMES])]
    mixed = asyncio.run(run_all(sched, reqs))
    assert sched.step_sizes[4] > 0  # the four adapters (base included) ran in one forward
    alone = [asyncio.run(run_all(make_scheduler(lora_export, 3), [r]))[0] for r in reqs]
    assert mixed == alone
    assert len(set(mixed)) == 4  # every adapter answers differently
    for req, text in zip(reqs, mixed, strict=True):
        assert text == peft_greedy(lora_export, tok, req.adapter, req.prompt_ids, req.max_tokens)


def test_lru_bound_loads_and_evicts_exactly(lora_export):
    sched = make_scheduler(lora_export, max_loaded=2)
    tok = sched.tokenizer
    order = ["calm", "warm", "calm", "brisk", "warm", "warm"]

    async def one_at_a_time() -> None:  # one event loop: the scheduler's task lives on it
        for i, name in enumerate(order):
            await run_all(sched, [request(tok, name, i)])

    asyncio.run(one_at_a_time())
    pool = sched.adapters
    assert pool is not None
    # calm, warm loaded; calm reused (warm is LRU); brisk evicts warm; warm evicts calm
    assert dict(pool.loads) == {"calm": 1, "warm": 2, "brisk": 1}
    assert pool.evictions == 2 and list(pool.loaded) == ["brisk", "warm"]
    assert set(sched.model.peft_config) == {"brisk", "warm"}  # evicted weights are gone


def test_busy_slots_make_requests_wait_not_fail(lora_export):
    """With one slot, a batch of two adapters runs as two turns (no eviction under a row)."""
    sched = make_scheduler(lora_export, max_loaded=1)
    tok = sched.tokenizer
    reqs = [request(tok, "calm", 0), request(tok, "warm", 1)]
    both = asyncio.run(run_all(sched, reqs))
    alone = [asyncio.run(run_all(make_scheduler(lora_export, 1), [r]))[0] for r in reqs]
    assert both == alone
    assert dict(sched.adapters.loads) == {"calm": 1, "warm": 1}
    assert max(sched.step_sizes) == 1


@pytest.mark.slow
def test_adapters_over_http_with_openai_client(ray_local, lora_export):
    from ray import serve

    from soulray.serve.app import start_serving

    adapters = [{"name": n, "path": str(lora_export / n)} for n in NAMES]
    cfg = Config.model_validate(
        {
            "serve": {
                "port": free_port(),
                "model_name": "base",
                "layout": "two_deployments",
                "adapters": adapters,
                "max_loaded_adapters": 2,
                "ingress": {"num_cpus": 0.1},
                "engine": {
                    "model_dir": str(lora_export),
                    "num_cpus": 0.5,
                    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.2},
                },
            }
        }
    )
    url = start_serving(cfg)
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", *NAMES]

        def ask(model: str) -> str:
            messages = [{"role": "user", "content": PROMPT}]
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=12, temperature=0
            )
            assert reply.model == model
            return reply.choices[0].message.content or ""

        alone = {name: ask(name) for name in ["calm", "warm"]}
        assert alone["calm"] != alone["warm"]
        handle = serve.get_deployment_handle("Engine", app_name="soulray")
        assert handle.counters.remote().result()["adapter_loads"] == {"calm": 1, "warm": 1}

        async def together() -> list[str]:
            return await asyncio.gather(*(asyncio.to_thread(ask, n) for n in ["calm", "warm"]))

        assert asyncio.run(together()) == [alone["calm"], alone["warm"]]
        counters = handle.counters.remote().result()
        assert counters["max_batch"] == 2  # the two adapters decoded in one batch
        ask("brisk")  # a third adapter: the least recently used one leaves
        counters = handle.counters.remote().result()
        assert counters["adapter_loads"] == {"calm": 1, "warm": 1, "brisk": 1}
        assert len(counters["adapters_loaded"]) == 2

        with pytest.raises(openai.NotFoundError) as err:
            ask("nope")
        body = err.value.body
        assert body["code"] == "model_not_found"
        assert all(repr(n) in body["message"] for n in ["base", *NAMES])
        ids = ingress_prompt_ids(cfg, PROMPT)
        for name, text in alone.items():
            assert text == peft_greedy(lora_export, state_tok(cfg), name, ids, 12)
    finally:
        serve.shutdown()


def state_tok(cfg: Config):
    from soulray.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.serve_model_dir)


def ingress_prompt_ids(cfg: Config, text: str) -> list[int]:
    """The prompt ids the ingress renders for one user message (system prompt, template)."""
    from soulray.serve.app import build_state
    from soulray.serve.chat import prepare
    from soulray.serve.schemas import ChatCompletionRequest

    state = build_state(cfg.serve, cfg.serve_model_dir, None)  # type: ignore[arg-type]
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": text}]})
    return prepare(state, req, "ref").gen.prompt_ids


def test_serve_build_carries_the_adapter_list(tmp_path, monkeypatch):
    from soulray.serve.app import build_serve_config

    monkeypatch.chdir(tmp_path)
    adapters = [{"name": "a", "path": "runs/a/adapter"}, {"name": "b", "path": "s3://x/b/"}]
    cfg = Config.model_validate({"serve": {"adapters": adapters, "max_loaded_adapters": 3}})
    serve_cfg = build_serve_config(cfg)["applications"][0]["args"]["config"]["serve"]
    assert serve_cfg["adapters"] == [
        {"name": "a", "path": str(tmp_path / "runs/a/adapter")},
        {"name": "b", "path": "s3://x/b"},
    ]
    assert serve_cfg["max_loaded_adapters"] == 3


def test_adapter_names_must_be_unique():
    from pydantic import ValidationError

    adapters = [{"name": "soulray", "path": "p"}, {"name": "a", "path": "q"}]
    with pytest.raises(ValidationError, match=r"\['soulray'\] appear more than once"):
        Config.model_validate({"serve": {"adapters": adapters}})

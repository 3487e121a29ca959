"""The model pieces of training, in process on the CPU: attention over packed rows, attention
choice, LoRA, the LR schedule, the FLOPs formula and FSDP2 sharding."""

from __future__ import annotations

import json
import math

import pytest
import torch
from soulray_testing import QUICKSTART
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from soulray.config import Config, TrainConfig, load_config
from soulray.train.loop import lr_factor
from soulray.train.metrics import flops_per_token
from soulray.train.model import (
    apply_lora,
    build_model_config,
    build_sharded_model,
    load_initial_state,
    pick_dtype,
    resolve_attn_implementation,
)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CPU = torch.device("cpu")


def tiny_model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY) if arch == "qwen2" else LlamaConfig(**TINY)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def packed_vs_separate(model: torch.nn.Module, lengths: list[int], pad: int) -> float:
    """Largest |logit difference| between one packed row and each sequence run alone."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lengths]
    device = next(model.parameters()).device
    ids = torch.cat([*seqs, torch.zeros(pad, dtype=torch.long)])[None].to(device)
    pos = torch.cat([torch.arange(n) for n in [*lengths, pad]])[None].to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        worst, start = 0.0, 0
        for seq in seqs:
            alone = model(input_ids=seq[None].to(device), use_cache=False).logits[0]
            worst = max(worst, (packed[start : start + len(seq)] - alone).abs().max().item())
            start += len(seq)
    return worst


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(arch: str, attn: str) -> None:
    assert packed_vs_separate(tiny_model(arch, attn), [5, 9, 4], pad=3) < 1e-5


def test_packed_forward_without_position_ids_leaks_across_sequences() -> None:
    """The control: the same row without position_ids lets sequences see each other."""
    model = tiny_model("qwen2", "sdpa")
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 97, (n,), generator=g) for n in (6, 6))
    with torch.no_grad():
        joined = model(input_ids=torch.cat([a, b])[None], use_cache=False).logits[0, 6:]
        alone = model(input_ids=b[None], use_cache=False).logits[0]
    assert (joined - alone).abs().max().item() > 1e-3


@pytest.mark.gpu
def test_varlen_kernel_equals_separate_forwards() -> None:
    from soulray.train.model import VARLEN

    assert resolve_attn_implementation("varlen", torch.device("cuda")) == VARLEN
    model = tiny_model("qwen2", VARLEN).to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    assert packed_vs_separate(model, [17, 40, 9], pad=6) < 2e-2  # bf16 kernels


def test_varlen_call_fits_the_installed_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.10's varlen_attn has is_causal and neither window_size nor enable_gqa: the
    adapter passes is_causal and repeats the KV heads, and gives what causal attention over each
    packed sequence alone gives (a stand-in kernel with that signature, built on SDPA)."""
    import torch.nn.attention.varlen as varlen_module
    import torch.nn.functional as F

    from soulray.train import model as model_module

    calls: list[dict] = []

    def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
        calls.append({"is_causal": is_causal, "kv_heads": k.shape[1]})
        assert k.shape[1] == q.shape[1]  # no GQA in this signature
        out = torch.empty_like(q)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            seg = [x[a:b].transpose(0, 1) for x in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=is_causal).transpose(0, 1)
        return out

    monkeypatch.setattr(varlen_module, "varlen_attn", old_varlen)
    model_module._varlen_parameters.cache_clear()
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, 12, 8, generator=g) for h in (4, 2, 2))
        pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
        out, _ = model_module.varlen_attention_forward(None, q, k, v, None, position_ids=pos)
    finally:
        model_module._varlen_parameters.cache_clear()
    assert calls == [{"is_causal": True, "kv_heads": 4}]
    for a, b in [(0, 5), (5, 8), (8, 12)]:
        alone = F.scaled_dot_product_attention(
            q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=True, enable_gqa=True
        )
        torch.testing.assert_close(out[0, a:b], alone[0].transpose(0, 1))


def test_attention_choice_on_cpu() -> None:
    assert resolve_attn_implementation("auto", CPU) == "sdpa"
    # on a GPU in float32 (train.dtype), auto takes sdpa; a FlashAttention kernel is refused
    assert resolve_attn_implementation("auto", torch.device("cuda"), torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="train.dtype is float32; set train.dtype=bfloat16"):
        resolve_attn_implementation("varlen", torch.device("cuda"), torch.float32)
    assert resolve_attn_implementation("eager", CPU) == "eager"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_attn_implementation("varlen", CPU)
    with pytest.raises(ValueError, match="flash_attn"):
        resolve_attn_implementation("flash_attention_2", CPU)


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    t = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, t) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, t) == 1.0
    # the decay spans steps 10..109, the last one trained (train.steps=110: steps 0..109)
    assert lr_factor(60, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert lr_factor(109, t) == pytest.approx(0.1)
    assert lr_factor(108, t) > 0.1


def test_flops_per_token_follows_6n_plus_attention() -> None:
    config = Qwen2Config(**TINY, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters()) - 97 * 32  # input embedding excluded
    assert flops_per_token(model, config, seq_len=64) == 6 * n + 12 * 2 * 4 * 8 * 64
    # LoRA: the frozen base costs 4 per parameter (no gradient of its own), the adapters 6
    lora = apply_lora(model, Config().lora)
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapters > 0
    expected = 4 * n + 6 * adapters + 12 * 2 * 4 * 8 * 64
    assert flops_per_token(lora, config, seq_len=64) == expected


def test_lora_trains_only_adapters_and_rejects_unknown_modules() -> None:
    model = apply_lora(tiny_model("qwen2", "sdpa"), Config().lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    bad = Config().lora.model_copy(update={"target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ValueError, match=r"\['qkv'\] do not exist"):
        apply_lora(tiny_model("qwen2", "sdpa"), bad)


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_model_holds_dtensors_with_the_initial_weights(
    single_process_group, prepared_quickstart
) -> None:
    from soulray.train.data import load_run_tokenizer

    cfg = load_config(None, [f"data.output_dir={prepared_quickstart}"])
    tokenizer = load_run_tokenizer(str(prepared_quickstart))
    model, hf_config, attn, dtype = build_sharded_model(cfg, tokenizer, 0, CPU)
    assert (attn, dtype) == ("sdpa", torch.float32)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    expected = load_initial_state(cfg, build_model_config(cfg.model, tokenizer), attn)
    for name, param in model.state_dict().items():
        assert torch.equal(param.full_tensor(), expected[name]), name


def test_evaluation_reads_only_eval_batches_of_the_split(single_process_group) -> None:
    """train.eval_batches=2: the validation source yields two micro-batches and no more (the
    whole split was read at every evaluation, and kept in memory with eval_batches=0)."""
    from types import SimpleNamespace

    import pyarrow as pa

    from soulray.train.loop import evaluate

    model = tiny_model("qwen2", "sdpa")
    g = torch.Generator().manual_seed(0)
    read = []

    def source(_epoch: int):
        for i in range(6):
            read.append(i)
            ids = torch.randint(0, 97, (16,), generator=g).tolist()
            columns = {"input_ids": ids, "labels": ids, "position_ids": list(range(16))}
            yield pa.table({k: [v] for k, v in columns.items()} | {"num_tokens": [16]})

    rt = SimpleNamespace(device=CPU)
    two = evaluate(model, source, rt, TrainConfig(eval_batches=2, loss_chunk_tokens=0))
    assert read == [0, 1] and 0 < two < 10
    read.clear()
    evaluate(model, source, rt, TrainConfig(eval_batches=0, loss_chunk_tokens=0))
    assert read == list(range(6))


def test_tiny_vocab_size_pads_the_embedding_and_refuses_too_small(prepared_quickstart) -> None:
    from soulray.train.data import load_run_tokenizer

    tokenizer = load_run_tokenizer(str(prepared_quickstart))
    cfg = load_config(None, [])
    assert build_model_config(cfg.model, tokenizer).vocab_size == len(tokenizer)
    padded = load_config(None, [f"model.tiny.vocab_size={len(tokenizer) + 64}"])
    assert build_model_config(padded.model, tokenizer).vocab_size == len(tokenizer) + 64
    small = load_config(None, [f"model.tiny.vocab_size={len(tokenizer) - 1}"])
    with pytest.raises(ValueError, match="model.tiny.vocab_size"):
        build_model_config(small.model, tokenizer)


def lora_bf16_losses(cfg: Config, tokenizer, steps: int) -> tuple[list[float], torch.nn.Module]:
    from soulray.train.loop import accumulate_gradients, build_optimizer

    model, *_ = build_sharded_model(cfg, tokenizer, 0, CPU)
    optimizer = build_optimizer(model, cfg.train, CPU)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=g)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "num_tokens": torch.tensor(ids.numel()),
        "position_ids": torch.arange(48).expand(2, -1).contiguous(),
    }
    rt = type("Rt", (), {"device": CPU, "world_size": 1})()
    losses = []
    for _ in range(steps):
        loss_sum, targets, _ = accumulate_gradients(model, [batch], cfg.train, rt, True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / targets)
    return losses, model


def test_lora_keeps_the_frozen_base_in_the_compute_dtype_with_identical_losses(
    single_process_group, prepared_quickstart, monkeypatch
) -> None:
    """bf16 LoRA: the base is stored in bf16 (no fp32 master copy of weights that never
    change), the adapters in fp32, and training is bit-identical to an fp32-stored base."""
    import soulray.train.model as model_module
    from soulray.train.data import load_run_tokenizer

    overrides = [
        f"data.output_dir={prepared_quickstart}",
        "lora.enabled=true",
        "train.dtype=bfloat16",
        "train.lr=0.01",
    ]
    cfg = load_config(None, overrides)
    tokenizer = load_run_tokenizer(str(prepared_quickstart))
    losses, model = lora_bf16_losses(cfg, tokenizer, 3)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    monkeypatch.setattr(model_module, "store_frozen_in", lambda model, dtype: None)
    fp32_losses, fp32_model = lora_bf16_losses(cfg, tokenizer, 3)
    assert {p.dtype for p in fp32_model.parameters()} == {torch.float32}
    assert losses == fp32_losses
    assert losses[2] < losses[0]


def test_a_bf16_checkpoint_is_read_in_bf16_and_upcast_exactly_into_the_fp32_shards(
    single_process_group, prepared_quickstart, tmp_path
) -> None:
    from soulray.train.data import load_run_tokenizer

    tokenizer = load_run_tokenizer(str(prepared_quickstart))
    cfg = load_config(None, [f"data.output_dir={prepared_quickstart}"])
    hf_config = build_model_config(cfg.model, tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    cfg = load_config(
        None, [f"data.output_dir={prepared_quickstart}", f"model.name_or_path={tmp_path}"]
    )
    initial = load_initial_state(cfg, hf_config, "sdpa")
    assert {t.dtype for t in initial.values()} == {torch.bfloat16}  # half the host memory
    model, *_ = build_sharded_model(cfg, tokenizer, 0, CPU)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.float32, name
        assert torch.equal(param.full_tensor(), initial[name].float()), name


def test_data_prepared_for_another_tokenizer_is_refused_before_training(tmp_path) -> None:
    """Training reads the tokenizer saved with the data but builds model.name_or_path: ids
    prepared for another vocabulary would train silently on the wrong tokens."""
    from soulray.data.tokenizer import train_tokenizer
    from soulray.train.launch import check_data_tokenizer

    texts = ["I can't sleep and I feel alone.", "That sounds hard; what keeps you up?"] * 50
    data, model_a, model_b = tmp_path / "data", tmp_path / "a", tmp_path / "b"
    train_tokenizer(texts, 300).save_pretrained(data / "tokenizer")
    train_tokenizer(texts, 300).save_pretrained(model_a)  # the same tokenizer, elsewhere
    train_tokenizer([t.upper() for t in texts], 300).save_pretrained(model_b)

    def check(source: str, tokenizer: str | None) -> None:
        manifest = {"tokenizer": {"source": source, "hash": "x"}}
        (data / "manifest.json").write_text(json.dumps(manifest))
        cfg = load_config(None, [f"model.tokenizer={tokenizer or 'null'}"])
        check_data_tokenizer(cfg, str(data))

    check("trained", None)  # no model: the tiny one is built for the data's tokenizer
    check(str(model_a), None)
    check(str(model_a), str(model_a))
    check("/elsewhere/a", str(model_a))  # another path, the same vocabulary
    with pytest.raises(ValueError, match="prepared with a tokenizer trained on the corpus, but"):
        check("trained", str(model_a))
    with pytest.raises(ValueError, match=f"whose vocabulary differs from {model_b}'s"):
        check(str(model_a), str(model_b))


def test_a_tokenizer_with_more_tokens_than_the_model_has_embeddings_is_refused(tmp_path) -> None:
    """model.tokenizer from another model: prepare passed, and every worker then failed with
    torch's "IndexError: index out of range in self"."""
    from soulray.data.tokenizer import train_tokenizer
    from soulray.train.model import check_model_vocab

    tokenizer = train_tokenizer(["I can't sleep and I feel alone."] * 50, 300)
    for vocab in (len(tokenizer), len(tokenizer) - 1):
        Qwen2Config(**TINY | {"vocab_size": vocab}).save_pretrained(tmp_path / str(vocab))
    cfg = load_config(None, [f"model.name_or_path={tmp_path}/{len(tokenizer)}"])
    check_model_vocab(cfg, tokenizer)  # as many embeddings as tokens
    small = f"{tmp_path}/{len(tokenizer) - 1}"
    cfg = load_config(None, [f"model.name_or_path={small}", "model.tokenizer=/tok"])
    with pytest.raises(ValueError) as refused:
        check_model_vocab(cfg, tokenizer)
    assert str(refused.value).startswith(
        f"the tokenizer of /tok has {len(tokenizer)} tokens, but the model {small} has "
        f"embeddings for {len(tokenizer) - 1} (its config.json vocab_size)"
    )


def test_what_every_worker_would_trip_on_is_refused_where_the_run_starts(
    prepared_quickstart, tmp_path
) -> None:
    """Both launchers run check_before_workers: a seq_len, mode, strategy tagging or system
    prompt other than the data's, an export over the base model, unknown LoRA modules, a
    model directory without its config or weights and a FlashAttention kernel on the CPU
    (these used to fail in every worker, four times with restarts, then end in a
    WorkerGroupError traceback)."""
    from soulray.train.launch import check_before_workers

    data = str(prepared_quickstart)
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes(b"")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "models" / "base").mkdir(parents=True)
    base = [f"train.data_dir={data}", f"train.storage_path={tmp_path}/ckpt"]
    prepared = load_config(QUICKSTART, base)
    check_before_workers(prepared, data)  # the quickstart's own settings pass
    cases = [
        (["data.seq_len=512"], rf"prepared with data.seq_len={prepared.data.seq_len}, but"),
        (["data.mode=padded"], "prepared with data.mode=packed, but this run has data.mode=padded"),
        (  # the export told serving: no tags to strip, and a prompt the model never saw
            ["data.strategy_tags=false"],
            "prepared with data.strategy_tags=True, but this run has data.strategy_tags=False;",
        ),
        (
            ["data.system_prompt=Be kind."],
            "prepared with data.system_prompt=None, but this run has data.system_prompt='Be kind.'",
        ),
        (
            ["data.strategies.taxonomy=[Question, Others]"],
            r"this run has data.strategies.taxonomy=\['Question', 'Others'\]; the export records",
        ),
        (["lora.enabled=true", "lora.target_modules=[q_projx]"], r"\['q_projx'\] do not exist"),
        (  # it ended in transformers' "Repo id must be in the form" traceback
            [f"model.name_or_path={tmp_path}/none"],
            f"model.name_or_path '{tmp_path}/none' does not exist; set it to a local",
        ),
        (
            [f"model.name_or_path={tmp_path}/no_config"],
            f"model.name_or_path {tmp_path}/no_config has no config.json: it must be a whole",
        ),
        (
            [f"model.name_or_path={tmp_path}/no_weights"],
            f"model.name_or_path {tmp_path}/no_weights holds no weights \\(one of model.safet",
        ),
        (
            ["model.attn_implementation=varlen"],
            "model.attn_implementation=varlen needs a CUDA GPU and this run trains on the CPU",
        ),
        (
            [f"model.name_or_path={tmp_path}/m", f"train.export_dir={tmp_path}/m/"],
            "is model.name_or_path: the export would overwrite the model",
        ),
        (  # the export clears its directory: the checkpoints in it would go
            [f"train.export_dir={tmp_path}"],
            f"train.export_dir {tmp_path} holds train.storage_path {tmp_path}/ckpt: the export",
        ),
        (
            [f"train.export_dir={data}/"],
            f"holds train.data_dir {data}: the export replaces everything in its directory",
        ),
        (  # the base model (and its tokenizer) in a folder of the export
            [f"model.name_or_path={tmp_path}/models/base", f"train.export_dir={tmp_path}/models"],
            f"holds model.name_or_path {tmp_path}/models/base: the export replaces everything",
        ),
        (
            [f"model.tokenizer={tmp_path}/models/base", f"train.export_dir={tmp_path}/models/"],
            f"holds model.tokenizer {tmp_path}/models/base: the export replaces everything",
        ),
    ]
    for overrides, says in cases:
        with pytest.raises(ValueError, match=says):
            check_before_workers(load_config(QUICKSTART, [*base, *overrides]), data)
    lora = load_config(QUICKSTART, [*base, "lora.enabled=true"])  # the default targets exist
    check_before_workers(lora, data)
    aliases = load_config(QUICKSTART, [*base, "data.strategies.fallback=Question"])
    check_before_workers(aliases, data)  # the taxonomy is what serving reads, not the aliases


def test_a_workers_user_error_is_shown_as_one_line(prepared_quickstart, tmp_path) -> None:
    """Ray Train wraps a worker's exception in WorkerGroupError.worker_failures: the CLI shows
    the user error inside it, not the traceback."""
    import ray.train

    from soulray.cli import user_error
    from soulray.train.model import check_lora_targets

    model = tiny_model("qwen2", "sdpa")
    lora = load_config(None, ["lora.enabled=true", "lora.target_modules=[q_projx]"]).lora
    with pytest.raises(ValueError) as raised:
        check_lora_targets(model, lora)
    wrapped = ray.train.WorkerGroupError("Training failed", {0: raised.value, 1: raised.value})
    assert user_error(wrapped) is raised.value


def test_cpu_worker_resources_share_the_cluster_or_wait_for_the_autoscaler(caplog) -> None:
    from soulray.train.launch import worker_resources

    def resources(cpus: float, *overrides: str):
        return worker_resources(load_config(None, ["train.num_workers=2", *overrides]), cpus)

    assert resources(2) == {"CPU": 0.5}  # this machine: 1 CPU left for Ray Data
    assert resources(8) == {"CPU": 1.0}
    with pytest.raises(ValueError, match=r"has 1 CPU\(s\) now.*resources_per_worker='\{CPU: 1\}'"):
        resources(1)
    asked = "train.resources_per_worker={CPU: 1}"
    with caplog.at_level("WARNING", logger="soulray.train"):
        assert resources(0, asked) == {"CPU": 1}  # KubeRay with no worker pod up yet
    assert "need 3 CPUs and the cluster has 0 now: Ray waits for the autoscaler" in caplog.text
    caplog.clear()
    assert resources(4, asked) == {"CPU": 1} and not caplog.text
    assert resources(0, "train.use_gpu=true") is None


def test_a_relative_model_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch) -> None:
    """Ray Train workers run in another directory, where ./my-model was taken for a hub id."""
    from soulray.train.launch import resolve_paths

    monkeypatch.chdir(tmp_path)
    model = resolve_paths(
        load_config(None, ["model.name_or_path=./m", "model.tokenizer=../t"])
    ).model
    assert (model.name_or_path, model.tokenizer) == (f"{tmp_path}/m", f"{tmp_path.parent}/t")
    hub = resolve_paths(load_config(None, ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct"]))
    assert (hub.model.name_or_path, hub.model.tokenizer) == ("Qwen/Qwen2.5-7B-Instruct", None)
    (tmp_path / "base").mkdir()  # a folder here, named without ./: transformers reads it so
    here = resolve_paths(load_config(None, ["model.name_or_path=base"])).model
    assert here.name_or_path == f"{tmp_path}/base"


def test_too_few_gpus_for_the_workers_is_warned_about(caplog) -> None:
    """A local Ray without GPUs used to wait 4 x 60 s, then end with Ray's start-up timeout."""
    from soulray.train.launch import check_gpus

    def check(gpus: float, *overrides: str) -> None:
        check_gpus(load_config(None, ["train.num_workers=2", *overrides]), gpus)

    with caplog.at_level("WARNING", logger="soulray.train"):
        check(0)  # CPU training
        check(2, "train.use_gpu=true")
        check(1, "train.use_gpu=true", "train.resources_per_worker={GPU: 0.5}")
        assert not caplog.text
        check(1, "train.use_gpu=true")
    assert "2 worker(s) need 2 GPU(s) and the cluster has 1 now: Ray waits" in caplog.text


def test_a_resume_refuses_what_it_cannot_change_and_warns_of_what_it_keeps(
    tmp_path, caplog
) -> None:
    from soulray.config import config_to_yaml
    from soulray.train.launch import check_resume_config

    def config(*overrides: str) -> Config:
        return load_config(None, [f"train.storage_path={tmp_path}", "train.run_name=r", *overrides])

    first = config()
    check_resume_config(first)  # no run yet
    for step in (8, 16):
        saved = tmp_path / "r" / f"checkpoint_{step:08d}" / "soulray.yaml"
        saved.parent.mkdir(parents=True)
        saved.write_text(config_to_yaml(first if step == 16 else config("data.seq_len=64")))
    with caplog.at_level("WARNING", logger="soulray.train"):
        check_resume_config(config("train.steps=200", "train.log_every=5"))  # both may change
    assert "resuming r with train.steps=200 (was 100): the learning-rate schedule" in caplog.text
    caplog.clear()
    for override, key, was in (
        ("data.seq_len=512", "data.seq_len", "2048"),
        ("train.grad_accum=4", "train.grad_accum", "1"),
        ("lora.enabled=true", "lora.enabled", "False"),
        ("model.tiny.hidden_size=64", "model.tiny", "{'architecture': 'qwen2',"),
    ):
        with pytest.raises(ValueError) as refused:
            check_resume_config(config(override))
        assert f"train.run_name=r has checkpoints made with another {key} (" in str(refused.value)
        assert f"or put {key} back (was: {was}" in str(refused.value)
    # what leaves the weights' shape and meaning alone may change: the attention kernel,
    # trust_remote_code, and LoRA settings of a run without LoRA
    check_resume_config(config("model.attn_implementation=sdpa", "lora.r=4"))
    with caplog.at_level("WARNING", logger="soulray.train"):
        check_resume_config(config(f"train.data_dir={tmp_path}/other"))
    assert f"resuming r on train.data_dir={tmp_path}/other, but its checkpoints trained on" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="soulray.train"):  # the saved position's order
        check_resume_config(config("train.seed=7", "train.shuffle_window_rows=0"))
    assert "resuming r with train.seed=7 (was 0): the rows are shuffled in another" in caplog.text
    assert "with train.shuffle_window_rows=0 (was 1024): the rows are shuffled" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="soulray.train"):
        applied = check_resume_config(config("train.lr=1e-5", "train.steps=300"))
    assert "keeps train.lr=0.0003 from its checkpoint" in caplog.text
    # what is kept is what the run's later checkpoints and export record
    assert (applied.train.lr, applied.train.steps) == (0.0003, 300)
    # a checkpoint written by another soulray version (an unknown key) is not compared
    latest = tmp_path / "r" / "checkpoint_00000016" / "soulray.yaml"
    latest.write_text("train:\n  old_setting: 1\n")
    with caplog.at_level("WARNING", logger="soulray.train"):
        check_resume_config(config("data.seq_len=512"))
    assert "not checking the resume against" in caplog.text


def test_a_resume_on_data_prepared_again_into_its_folder_is_warned_about(tmp_path, caplog) -> None:
    """The same train.data_dir, prepared again (other inputs, another split): the saved data
    position would count rows of other data, with no word said."""
    from soulray.config import config_to_yaml
    from soulray.data.manifest import TRAINED_TOKENIZER, data_fingerprint
    from soulray.train.launch import check_resume_config

    data = tmp_path / "data"
    data.mkdir()
    manifest = {"splits": {"train": {"rows": 40}, "val": {"rows": 4}}, "seq_len": 2048}

    def prepare(**changes: object) -> None:
        (data / "manifest.json").write_text(json.dumps(manifest | {"seconds": 9} | changes))

    cfg = load_config(
        None, [f"train.storage_path={tmp_path}", "train.run_name=r", f"data.output_dir={data}"]
    )
    prepare()
    checkpoint = tmp_path / "r" / "checkpoint_00000008"
    checkpoint.mkdir(parents=True)
    (checkpoint / "soulray.yaml").write_text(config_to_yaml(cfg))
    state = {
        "step": 8,
        "epoch": 1,
        "epoch_batch": 3,
        "data_fingerprint": data_fingerprint(str(data)),
    }
    (checkpoint / "soulray_state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="soulray.train"):
        prepare(seconds=12)  # the same rows, prepared again: timings do not count
        check_resume_config(cfg)
        assert not caplog.text
        prepare(splits={"train": {"rows": 52}, "val": {"rows": 5}})
        check_resume_config(cfg)
    assert f"resuming r on train.data_dir={data}, which was prepared again since its" in (
        caplog.text
    )
    assert "Set a new train.run_name to train on it from the start" in caplog.text
    # prepared again with a new tokenizer (trained on the corpus): its ids are other tokens
    state["tokenizer_hash"] = "old"
    (checkpoint / "soulray_state.json").write_text(json.dumps(state))
    corpus = TRAINED_TOKENIZER
    prepare(tokenizer={"source": corpus, "hash": "old"})
    check_resume_config(cfg)
    prepare(tokenizer={"source": "/models/qwen", "hash": "new"})  # its vocabulary is checked
    check_resume_config(cfg)
    prepare(tokenizer={"source": corpus, "hash": "new"})
    with pytest.raises(ValueError, match="^train.run_name=r has checkpoints trained on token ids"):
        check_resume_config(cfg)


def test_an_export_never_deletes_what_is_no_export(prepared_quickstart, tmp_path) -> None:
    """The export replaces its directory's content: a folder of other files (notes, code, the
    corpus the same config names) was emptied without a word."""
    from soulray.train.launch import check_before_workers

    data = str(prepared_quickstart)
    base = [f"train.data_dir={data}", f"train.storage_path={tmp_path}/ckpt"]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub").mkdir()
    (folder / "sub" / "code.py").write_text("")
    with pytest.raises(ValueError, match=r"holds files that are no soulray export \(notes.txt, "):
        check_before_workers(load_config(QUICKSTART, [*base, f"train.export_dir={folder}"]), data)
    corpus = tmp_path / "export" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("{}\n")
    named = [f"train.export_dir={corpus.parent}", f"data.inputs=[{corpus}]"]
    with pytest.raises(ValueError, match=f"holds data.inputs {corpus}: the export replaces"):
        check_before_workers(load_config(QUICKSTART, [*base, *named]), data)
    (folder / "soulray.yaml").write_text("")  # an earlier export: replaced, as documented
    check_before_workers(load_config(QUICKSTART, [*base, f"train.export_dir={folder}"]), data)
    check_before_workers(load_config(QUICKSTART, [*base, f"train.export_dir={tmp_path}/new"]), data)


def test_a_warmup_longer_than_the_run_is_warned_about(caplog) -> None:
    from soulray.train.launch import check_warmup

    with caplog.at_level("WARNING", logger="soulray.train"):
        check_warmup(load_config(None, ["train.steps=10", "train.warmup_steps=10"]).train)
        assert not caplog.text  # the peak is reached at the last step
        check_warmup(load_config(None, ["train.steps=5", "train.lr=0.001"]).train)
    assert caplog.messages == [
        "warning: train.warmup_steps=10 is more than train.steps=5: the learning rate rises "
        "for the whole run and peaks at 0.5 of train.lr=0.001; lower train.warmup_steps"
    ]
    # what the warning says is what the schedule does
    t = load_config(None, ["train.steps=5"]).train
    assert [lr_factor(s, t) for s in range(5)] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_rng_state_round_trips_and_reads_older_checkpoints() -> None:
    """A CPU rank saves no CUDA state (and never initialises CUDA); the state restores the
    generator exactly; a checkpoint of the older format (a list of every GPU's state) loads."""
    from soulray.train.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    saved = rng_state()
    assert saved["cuda"] is None
    expected = torch.rand(4)
    for old_format in (saved, {"cpu": saved["cpu"], "cuda": []}):
        torch.rand(10)  # move on
        set_rng_state(old_format)
        assert torch.equal(torch.rand(4), expected)


def test_auto_dtype_is_bf16_on_a_gpu_and_fp32_elsewhere():
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="use auto, float32, bfloat16 or float16"):
        pick_dtype("fp8", "cuda")


def test_train_refuses_a_missing_data_dir_before_ray_starts(tmp_path) -> None:
    """It was said after ~20 s of Ray start-up; no Ray session directory is made now."""
    import os
    import subprocess

    from soulray_testing import ROOT, SOULRAY

    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = os.environ | {"RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp)}
    cmd = [SOULRAY, "train", "--config", str(QUICKSTART), f"train.data_dir={tmp_path}/none"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: no prepared training data in {tmp_path}/none/train: run `soulray prepare` "
        "first, or set train.data_dir to its data.output_dir"
    )
    assert list(ray_tmp.iterdir()) == []  # Ray never started


def test_the_step_a_rerun_resumes_from_and_what_ctrl_c_says(tmp_path) -> None:
    """Ray Train resumes from the latest checkpoint it registered; one written while the run
    was killed can be on disk, unregistered (a rerun with train.steps between the two was
    refused as past them). Without Ray's record (torchrun), the latest complete one."""
    from soulray.train.launch import interrupted, latest_checkpoint_step

    cfg = load_config(None, [f"train.storage_path={tmp_path}", "train.run_name=r"])
    assert latest_checkpoint_step(cfg) == 0
    assert (
        interrupted(cfg)
        == f"training stopped (Ctrl-C or SIGTERM) before its first checkpoint in {tmp_path}/r"
    )
    for step in (8, 12, 16):
        (tmp_path / "r" / f"checkpoint_{step:08d}").mkdir(parents=True)
        if step != 16:  # 16: half written, no state file
            (tmp_path / "r" / f"checkpoint_{step:08d}" / "soulray_state.json").write_text("{}")
    assert latest_checkpoint_step(cfg) == 12
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    snapshot.write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000008"}})
    )
    assert latest_checkpoint_step(cfg) == 8
    assert interrupted(cfg) == (
        f"training stopped (Ctrl-C or SIGTERM); its latest checkpoint is step 8 in {tmp_path}/r: "
        "run the same command again to resume from it"
    )
    snapshot.write_text(json.dumps({"latest_checkpoint_result": None}))  # none registered
    assert latest_checkpoint_step(cfg) == 0
    snapshot.write_text("{}")  # a layout of another Ray version
    assert latest_checkpoint_step(cfg) == 12


def test_the_summary_says_a_run_resumed(capsys) -> None:
    from types import SimpleNamespace

    from soulray.cli import print_train_summary

    cfg = load_config(None, ["train.run_name=r", "train.export_dir=/m", "train.storage_path=/c"])
    result = SimpleNamespace(error=None, metrics={"step": 14, "loss": 6.25, "tokens_per_s": 900})
    print_train_summary(result, cfg, resumed_from=5)
    print_train_summary(result, cfg)
    finished = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 14})})
    print_train_summary(result, finished, resumed_from=14)  # a finished run started again
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "trained r to step 14 (resumed from step 5): loss 6.2500, 900 tokens/s"
    assert lines[3] == "trained r to step 14: loss 6.2500, 900 tokens/s"
    assert lines[6] == "r was already at step 14: nothing to train: loss 6.2500, 900 tokens/s"


def _save_with_a_slow_rank(rank: int, directory: str, port: int) -> None:
    """One rank of a 2-process gloo group saving a checkpoint; rank 1 writes its RNG file late."""
    import time

    import torch.distributed as dist

    from soulray.train import checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            save = torch.save

            def slow_save(obj, path):
                time.sleep(1.0)
                save(obj, path)

            checkpoint.torch.save = slow_save
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state = {"step": 1, "epoch": 0, "epoch_batch": 1}
        checkpoint.save_checkpoint(directory, model, optimizer, scheduler, state, Config())
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_is_marked_complete_only_once_every_ranks_files_are_in(tmp_path) -> None:
    """soulray_state.json marks a checkpoint complete (torchrun resumes from the latest with
    one): rank 0 wrote it while other ranks were still writing their data positions, so a kill
    in between left a "complete" checkpoint without them."""
    import torch.multiprocessing as mp
    from soulray_testing import free_port

    from soulray.train.checkpoint import STATE_FILE

    directory = tmp_path / "checkpoint_00000001"
    directory.mkdir()
    mp.spawn(_save_with_a_slow_rank, args=(str(directory), free_port()), nprocs=2)
    state, last_rng = directory / STATE_FILE, directory / "rng_rank1.pt"
    assert state.stat().st_mtime_ns >= last_rng.stat().st_mtime_ns


def test_a_run_resumes_only_under_the_launcher_that_wrote_it(prepared_quickstart, tmp_path):
    """Ray Train resumes from its own record of checkpoints, which torchrun does not keep: a
    torchrun run rerun with `soulray train` started again from step 0 (saying it resumed from
    step 6), and torchrun went on from a Ray run's folders past Ray's record."""
    from soulray.train.launch import check_before_workers

    data = str(prepared_quickstart)
    base = [f"train.data_dir={data}", f"train.storage_path={tmp_path}", "train.run_name=r"]
    cfg = load_config(QUICKSTART, [*base, "train.steps=7"])
    (tmp_path / "r" / "checkpoint_00000006").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint_00000006" / "soulray_state.json").write_text("{}")
    check_before_workers(cfg, data, torchrun=True)  # torchrun resumes its own run
    with pytest.raises(ValueError) as refused:
        check_before_workers(cfg, data)
    assert str(refused.value) == (
        f"{tmp_path}/r holds checkpoints (latest step 6) that Ray Train has no record of "
        "(checkpoint_manager_snapshot.json; the torchrun launcher's), so `soulray train` would "
        "start it again from step 0: resume it with `torchrun ... -m soulray.train.torchrun`, "
        "or set a new train.run_name"
    )
    latest = {"checkpoint_dir_name": "checkpoint_00000006"}
    snapshot = tmp_path / "r" / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"latest_checkpoint_result": latest}))
    check_before_workers(cfg, data)  # Ray resumes its own run
    with pytest.raises(ValueError) as refused:
        check_before_workers(cfg, data, torchrun=True)
    assert str(refused.value) == (
        f"{tmp_path}/r is a run of `soulray train`, whose checkpoints Ray Train resumes from "
        "its own record (checkpoint_manager_snapshot.json), which torchrun does not keep: "
        "resume it with `soulray train`, or set a new train.run_name"
    )
    fresh = load_config(QUICKSTART, [*base, "train.run_name=new"])
    check_before_workers(fresh, data)  # a new run_name starts either way
    check_before_workers(fresh, data, torchrun=True)
    # a run's marker says which launcher started it: a `soulray train` killed before Ray
    # registered its first checkpoint has no record yet, and is still its own
    from soulray.train.launch import mark_launcher

    killed = load_config(QUICKSTART, [*base, "train.run_name=killed", "train.steps=7"])
    (tmp_path / "killed" / "checkpoint_00000003").mkdir(parents=True)
    (tmp_path / "killed" / "checkpoint_00000003" / "soulray_state.json").write_text("{}")
    mark_launcher(killed, torchrun=False)
    mark_launcher(killed, torchrun=True)  # written once, by the run's first launcher
    check_before_workers(killed, data)
    with pytest.raises(ValueError, match="is a run of `soulray train`"):
        check_before_workers(killed, data, torchrun=True)


def test_sigterm_stops_training_as_ctrl_c_does() -> None:
    """Ray's own SIGTERM handler aborted the driver with a stack dump (exit 134, a crash to a
    scheduler); in `soulray train` and `pipeline` SIGTERM goes to the SIGINT handler (Ray
    Train's, which aborts the run, while it trains), once, and the command exits 143."""
    import os
    import signal

    import typer

    from soulray.cli import sigterm_as_ctrl_c

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(typer.Exit) as e, sigterm_as_ctrl_c() as term:
        os.kill(os.getpid(), signal.SIGTERM)  # the default SIGINT handler: KeyboardInterrupt
        signal.pause()
    assert (e.value.exit_code, term) == (143, [signal.SIGTERM])
    assert signal.getsignal(signal.SIGTERM) is before
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_as_ctrl_c() as term:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one is not passed on
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIGINT] and term == [signal.SIGTERM]


def test_a_resume_on_fewer_workers_names_the_smaller_batch_and_how_to_keep_it(caplog):
    """It warned only of the data order: each step's batch halving went unsaid. The way to keep
    it is the saved number of workers (a resume refuses another train.grad_accum)."""
    from types import SimpleNamespace

    from soulray.config import TrainConfig
    from soulray.train.loop import check_resume_world

    t = TrainConfig(micro_batch_size=2, grad_accum=3)
    state = {"world_size": 4}
    with caplog.at_level("INFO", logger="soulray"):
        check_resume_world(state, SimpleNamespace(rank=0, world_size=2), t)
        check_resume_world({"world_size": 2}, SimpleNamespace(rank=0, world_size=2), t)
    assert caplog.messages == [
        "warning: checkpoint was written by 4 workers, resuming with 2: a step now trains on "
        "12 rows, not 24 (micro_batch_size x grad_accum x workers), and the data order "
        "differs from an uninterrupted run; train.num_workers=4 keeps both (a resume cannot "
        "change train.grad_accum)"
    ]
    assert state["world_size"] == 2

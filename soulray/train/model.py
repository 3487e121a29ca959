"""Build the model a run trains: config, attention kernel, initial weights, LoRA, FSDP2.

Every rank builds the model on the meta device and shards it with FSDP2; only rank 0 holds a
real copy of the initial weights (a local checkpoint, or the tiny default initialised from the
seed), which are broadcast into the shards. So an 8B model never sits in memory eight times.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

import torch
from torch import nn

from soulray.config import Config, LoraConfig, ModelConfig

log = logging.getLogger("soulray.train")

VARLEN = "soulray_varlen"  # name of our packed-varlen kernel in transformers' AttentionInterface
# Kernels that keep packed sequences apart (by their position_ids) only in a batch of ONE row:
# transformers falls back to plain causal attention over the whole row for batch size > 1, so
# every sequence would see the ones packed before it. The loop joins a micro-batch's rows into
# one row for these (soulray_varlen flattens the batch itself; sdpa and eager build a mask).
ONE_ROW_KERNELS = frozenset({"flash_attention_2", "flash_attention_3"})


def resolve_attn_implementation(
    choice: str, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> str:
    """The transformers attn_implementation for a config choice on this device, computing in
    `dtype`: the FlashAttention kernels (flash_attention_2/3, varlen) take only fp16/bf16."""
    cuda = device.type == "cuda"
    match choice:
        case "auto":
            if not cuda or dtype == torch.float32:
                return "sdpa"
            if importlib.util.find_spec("flash_attn_interface"):
                return "flash_attention_3"
            if importlib.util.find_spec("flash_attn"):
                return "flash_attention_2"
            return _register_varlen() if _has_varlen() else "sdpa"
        case "flash_attention_3" | "flash_attention_2":
            package = "flash_attn_interface" if choice.endswith("3") else "flash_attn"
            if not (cuda and importlib.util.find_spec(package)):
                raise ValueError(
                    f"model.attn_implementation={choice} needs a CUDA GPU and the {package} "
                    "package (pip install 'soulray[gpu]'); use 'auto', 'varlen' or 'sdpa'"
                )
            flash_dtype(choice, dtype == torch.float32)
            return choice
        case "varlen":
            if not (cuda and _has_varlen()):
                raise ValueError(
                    "model.attn_implementation=varlen needs CUDA and a torch with "
                    "torch.nn.attention.varlen; use 'sdpa' on CPU"
                )
            flash_dtype(choice, dtype == torch.float32)
            return _register_varlen()
        case "sdpa" | "eager":
            return choice
    raise ValueError(f"unknown model.attn_implementation {choice!r}")


def flash_dtype(choice: str, fp32: bool) -> None:
    """FlashAttention kernels compute in bf16/fp16 only."""
    if fp32 and choice in ("flash_attention_3", "flash_attention_2", "varlen"):
        raise ValueError(
            f"model.attn_implementation={choice} computes in bf16/fp16 only and "
            "train.dtype is float32; set train.dtype=bfloat16 (or auto), or use sdpa"
        )


def _has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _register_varlen() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return VARLEN


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention over packed rows: each sequence (position id 0 starts one) attends only
    to itself, through PyTorch's FlashAttention varlen kernel. Inputs are (B, H, T, D)."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if position_ids is None:
        position_ids = torch.arange(t, device=query.device).expand(b, t)
    starts = torch.nonzero(position_ids.reshape(-1) == 0).flatten()
    total = torch.tensor([b * t], device=starts.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    accepts = _varlen_parameters()
    options: dict[str, Any] = {"scale": scaling}
    if "window_size" in accepts:  # torch >= 2.11; 2.10 has is_causal and no window
        options["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    elif sliding_window:
        raise ValueError("sliding-window attention with varlen needs torch >= 2.11; use sdpa")
    else:
        options["is_causal"] = True
    if h != key.shape[1]:
        if "enable_gqa" in accepts:
            options["enable_gqa"] = True
        else:  # repeat the KV heads for each query group
            k = k.repeat_interleave(h // key.shape[1], dim=1)
            v = v.repeat_interleave(h // key.shape[1], dim=1)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)
    assert isinstance(out, torch.Tensor)  # return_aux is off: the output alone
    return out.reshape(b, t, h, d), None


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    """The keyword arguments this torch's varlen_attn takes (they changed from 2.10 to 2.13)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def build_model_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """The Hugging Face config: a local checkpoint's, or the tiny default's."""
    if cfg.name_or_path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    t = cfg.tiny
    if t.vocab_size is not None and t.vocab_size < len(tokenizer):
        raise ValueError(
            f"model.tiny.vocab_size={t.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens; leave it unset or make it at least {len(tokenizer)}"
        )
    shape = dict(
        vocab_size=t.vocab_size or len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    match t.architecture:
        case "qwen2":
            from transformers import Qwen2Config

            return Qwen2Config(**shape)
        case "llama":
            from transformers import LlamaConfig

            return LlamaConfig(**shape)
    raise ValueError(f"unknown model.tiny.architecture {t.architecture!r}")


def build_model(cfg: Config, hf_config: Any, attn: str, device: str | torch.device) -> nn.Module:
    """The model (with LoRA adapters when enabled) with uninitialised weights on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hf_config,
            attn_implementation=attn,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=torch.float32,
        )
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


def load_initial_state(cfg: Config, hf_config: Any, attn: str) -> dict[str, torch.Tensor]:
    """Rank 0 only: the full initial state dict (pretrained or seeded tiny init, plus LoRA).

    A pretrained checkpoint is read in the dtype it is stored in (a 7B bf16 checkpoint: 15 GB of
    host memory, not 30 in fp32); the sharded fp32 masters it is copied into upcast exactly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.train.seed)
    model: nn.Module
    if cfg.model.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path,
            attn_implementation=attn,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype="auto",
        )
    else:
        model = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attn, dtype=torch.float32
        )
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model.state_dict()


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap with peft LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_lora_targets(model, lora)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def check_lora_targets(model: nn.Module, lora: LoraConfig) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} do not exist in this model; its linear layers are "
            f"named e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}"
        )


def check_lora_on_meta(cfg: Config, tokenizer: Any) -> None:
    """lora.target_modules checked on the driver against the model built on the meta device
    (no weights, about a second for a 7B), not by every worker after the cluster started."""
    from transformers import AutoModelForCausalLM

    hf_config = build_model_config(cfg.model, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=cfg.model.trust_remote_code
        )
    check_lora_targets(model, cfg.lora)


def check_model_vocab(cfg: Config, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the model has embeddings (model.tokenizer from another
    model) prepares fine, and training then failed in every worker with torch's "IndexError:
    index out of range in self"."""
    if not cfg.model.name_or_path:
        return  # the tiny model is built for the tokenizer (build_model_config checks it)
    vocab = build_model_config(cfg.model, tokenizer).get_text_config().vocab_size
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer of {cfg.model.tokenizer_path} has {len(tokenizer)} tokens, but the "
            f"model {cfg.model.name_or_path} has embeddings for {vocab} (its config.json "
            "vocab_size): the ids past them cannot train. Use the model's own tokenizer "
            "(unset model.tokenizer) and prepare again, or a model whose vocab_size is at "
            f"least {len(tokenizer)}"
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the FSDP2 and activation-checkpointing units)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[nn.Module] = [
        m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
    ]
    if not layers:
        raise ValueError(f"found no decoder layers in {type(model).__name__} to shard")
    return layers


def apply_fsdp(
    model: nn.Module, param_dtype: torch.dtype, reshard_after_forward: bool, cpu_offload: bool
) -> None:
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, head).

    The root stays unsharded from forward to the end of backward (as torchtitan keeps its
    output layer): the chunked loss projects hidden states through the head outside the
    model's forward, and backward would gather the root again at once anyway."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = {"mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs | {"reshard_after_forward": False})


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them."""
    unwrap = getattr(model, "get_base_model", None)  # a peft model wraps the transformers one
    base: Any = unwrap() if unwrap is not None else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def reset_rotary_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute rotary `inv_freq` buffers, which are not in the state dict and so are left
    uninitialised by meta-device construction."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    module: Any  # a rotary embedding module (attributes set by transformers)
    for module in model.modules():
        if not hasattr(module, "inv_freq"):
            continue
        rope_type = getattr(module, "rope_type", "default")
        init = (
            module.compute_default_rope_parameters
            if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type]
        )
        inv_freq, module.attention_scaling = init(module.config, device=device)
        module.inv_freq = inv_freq.to(device)
        if hasattr(module, "original_inv_freq"):
            module.original_inv_freq = inv_freq.to(device).clone()


def build_sharded_model(
    cfg: Config, tokenizer: Any, rank: int, device: torch.device
) -> tuple[nn.Module, Any, str, torch.dtype]:
    """The training model: built on meta, sharded with FSDP2, materialized on the device, and
    filled with rank 0's initial weights. Returns (model, hf_config, attention, param dtype)."""
    t = cfg.train
    hf_config = build_model_config(cfg.model, tokenizer)
    param_dtype = pick_dtype(t.dtype, device.type)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, device, param_dtype)
    model = build_model(cfg, hf_config, attn, "meta")
    if cfg.lora.enabled:
        store_frozen_in(model, param_dtype)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    # With one rank there is nothing to reshard: keeping the parameters saves a copy per layer.
    reshard = t.reshard_after_forward and torch.distributed.get_world_size() > 1
    apply_fsdp(model, param_dtype, reshard, t.cpu_offload)
    model.to_empty(device="cpu" if t.cpu_offload else device)
    reset_rotary_buffers(model, device)
    initial = load_initial_state(cfg, hf_config, attn) if rank == 0 else {}
    broadcast_initial_state(model, initial)
    return model, hf_config, attn, param_dtype


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the parameters that never train (LoRA's base) in the compute dtype.

    An fp32 master copy only matters for a parameter the optimizer updates: FSDP2's
    MixedPrecisionPolicy casts every shard to `dtype` when it gathers it, so a frozen base
    stored in `dtype` computes bit-identical forwards and backwards at half the memory in bf16
    (Qwen2.5-7B LoRA on 2 GPUs: 7.1 of 14.3 GiB of parameters per rank, bench/train_memory.py).
    Called on the meta model before sharding; the adapters stay fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of a train.dtype or serve.engine.dtype choice on a device type ("cuda",
    "cpu"): auto is bf16 on a GPU, fp32 elsewhere."""
    match name:
        case "auto":
            return torch.bfloat16 if device == "cuda" else torch.float32
        case "float32":
            return torch.float32
        case "bfloat16":
            return torch.bfloat16
        case "float16":
            return torch.float16
    raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")


def broadcast_initial_state(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict[str, Any](initial), options=options)

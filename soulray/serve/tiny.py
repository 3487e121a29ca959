"""A random tiny export with the exact layout `soulray train` writes, for tests and benchmarks.

It generates gibberish, but it exercises every byte of the serving path (tokenizer, chat template,
strategy tags, batching, streaming) in seconds on a CPU with no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from soulray.config import CONFIG_FILE, METRICS_FILE, Config, config_to_yaml
from soulray.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def corpus_texts(data_dir: Path = ROOT / "jobs" / "data") -> list[str]:
    """Every message of the sample corpora (the tokenizer's training text)."""
    texts = []
    for path in sorted(data_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def build_tiny_export(
    directory: str | Path,
    *,
    strategy_tags: bool = True,
    seed: int = 0,
    adapter: bool = False,
    system_prompt: str | None = None,
) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer, soulray.yaml,
    serving.json, metrics.json; with `adapter`, also a random LoRA adapter in adapter/."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from soulray.data.render import SERVING_RECORD, build_serving_record
    from soulray.train.checkpoint import build_generation_config

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus_texts(), vocab_size=2048)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.3,  # peaked logits: greedy replies differ by prompt, not "\n" * n
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if adapter:
        save_random_adapter(model, out / "adapter")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = build_serving_record(tokenizer, system_prompt)
    build_generation_config(tokenizer, record["end_of_turn_ids"]).save_pretrained(out)
    (out / SERVING_RECORD).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    data = {"strategy_tags": strategy_tags, "system_prompt": system_prompt}
    cfg = Config.model_validate({"data": data})
    (out / CONFIG_FILE).write_text(config_to_yaml(cfg), encoding="utf-8")
    (out / METRICS_FILE).write_text(json.dumps({"note": "random tiny model"}), encoding="utf-8")
    return out


def save_random_adapter(model: Any, directory: Path) -> None:
    """A LoRA adapter with non-zero B (so merging changes the outputs), saved in peft format."""
    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(directory))
    peft_model.unload()  # leave the base model as it was

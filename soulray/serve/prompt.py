"""From an OpenAI message list to prompt token ids, and from reply text back to a strategy.

The conversation window: the model sees the system prompt plus as many of the most recent turns
as fit its context after reserving `max_tokens` for the reply. Turns are dropped whole, oldest
first, and the window always starts at a user turn; a message is never cut in the middle. If the
latest user message alone does not fit, the request is refused (400 context_length_exceeded).

Strategy tags: a model trained with `data.strategy_tags` begins each reply with "[Strategy] ".
The tag is parsed out of the reply and returned as `strategy`; a request's `strategy` is forced by
writing the tag at the start of the reply, so the model continues after it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jinja2 import TemplateError

from soulray import storage
from soulray.config import CONFIG_FILE, ESCONV_STRATEGIES, Config, ServeConfig
from soulray.data.render import SERVING_RECORD, build_serving_record, find_control_token
from soulray.data.tokenizer import load_tokenizer
from soulray.serve.fetch import fetch_model_dir, wait_for_export
from soulray.serve.schemas import APIError, ChatMessage
from soulray.text import SURROGATE

log = logging.getLogger("ray.serve.soulray")

TAG = re.compile(r"^\[([^\[\]\n]{1,48})\] ?")
MAX_TAG_CHARS = 52  # "[" + 48 + "] " + slack: a reply longer than this without "]" has no tag


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server needs to know about the exported model."""

    model_dir: str  # local directory
    strategy_tags: bool
    taxonomy: tuple[str, ...]
    context_tokens: int
    temperature: float  # sampling defaults from generation_config.json
    top_p: float
    system_prompt: str | None  # added to requests without one: as trained unless overridden
    end_of_turn: str  # the chat template's end-of-turn marker (generation stops there)


def check_local_model_dirs(cfg: Config) -> None:
    """Refuse a local export or adapter directory that does not exist or is half written (with
    serve.wait_for_model_s: once waited for), or an adapter on a merged LoRA export, before
    deploying."""
    wait_s = cfg.serve.wait_for_model_s
    for path in (cfg.serve_model_dir, cfg.serve.engine.adapter_dir):
        if path and not storage.is_remote(path):
            fetch_model_dir(path, weights=False, wait_s=wait_s)
    check_model_dir_is_model(cfg.serve_model_dir)
    adapters = [("serve.engine.adapter_dir", cfg.serve.engine.adapter_dir)]
    adapters += [(f"serve.adapters[{i}].path", a.path) for i, a in enumerate(cfg.serve.adapters)]
    for key, path in adapters:
        # loaded lazily at the first request: a wrong path would pass /healthz and then fail
        # every request for it
        if path is None or storage.is_remote(path):
            continue
        if wait_s and key != "serve.engine.adapter_dir":  # that one was waited for above
            wait_for_export(path, wait_s)
        if not Path(storage.normalize(path), "adapter_config.json").is_file():
            raise ValueError(
                f"{key}={path} is not a peft LoRA adapter (no adapter_config.json there); "
                "point it at a LoRA export's adapter/ folder"
            )
    check_merged_root(cfg)


def check_model_dir_is_model(model_dir: str) -> None:
    """A local folder that is no model (a run's checkpoints, the prepared data, an adapter/)
    crashed every replica in transformers ("Unrecognized model ... model_type"), and Serve
    then said only "Deploying application soulray failed"."""
    if storage.is_remote(model_dir) or Path(storage.normalize(model_dir), "config.json").is_file():
        return
    raise ValueError(
        f"serve.engine.model_dir={model_dir} is not a model directory (no config.json there); "
        "point it at an export of soulray train (its train.export_dir), not at the run's "
        "checkpoints or prepared data (a LoRA export's adapter/ goes in serve.engine.adapter_dir)"
    )


def check_merged_root(cfg: Config) -> None:
    """check_adapter_base on a local export, which `serve build` can also check."""
    root = Path(storage.normalize(cfg.serve_model_dir))
    if not storage.is_remote(cfg.serve_model_dir) and (root / CONFIG_FILE).exists():
        check_adapter_base(read_trained(root), cfg.serve, str(root))


def read_trained(root: Path) -> dict[str, Any]:
    """The export's soulray.yaml (the config it was trained with), {} when it has none."""
    path = root / CONFIG_FILE
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def check_adapter_base(trained: dict[str, Any], cfg: ServeConfig, model_dir: str) -> None:
    """A LoRA run's export root holds the MERGED model (base + adapter): an adapter applied on
    it again would serve W0 + 2 dW. Adapters go on the base, which the export keeps in base/."""
    if not (trained.get("lora") or {}).get("enabled"):
        return
    if cfg.engine.adapter_dir or cfg.adapters:
        raise ValueError(
            f"serve.engine.model_dir {model_dir} is the merged export of a LoRA run: its adapter "
            "is already in the weights, and an adapter on top would apply it twice. Serve the "
            f"merged model alone (unset serve.engine.adapter_dir and serve.adapters), or put "
            f"adapters on the base model: serve.engine.model_dir={model_dir.rstrip('/')}/base"
        )


def read_export_info(
    model_dir: str, cfg: ServeConfig, tokenizer: Any = None, adapter_dir: str | None = None
) -> ExportInfo:
    """Strategy tagging from the export's soulray.yaml; context length from its config.json;
    the system prompt and end-of-turn marker as training rendered them (serving.json); the
    sampling defaults from its generation_config.json. With serve.engine.adapter_dir, the
    adapter's own record (a LoRA export writes one into adapter/) rather than the base's."""
    root = Path(model_dir)
    trained = read_trained(root)
    check_adapter_base(trained, cfg, model_dir)
    if adapter_dir is not None and (Path(adapter_dir) / SERVING_RECORD).exists():
        root_of_record = Path(adapter_dir)
        trained = read_trained(root_of_record)
    else:
        root_of_record = root
    data = trained.get("data") or {}
    tags = cfg.strategy_tags if cfg.strategy_tags is not None else bool(data.get("strategy_tags"))
    taxonomy = (data.get("strategies") or {}).get("taxonomy") or ESCONV_STRATEGIES
    model_cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    limit = int(model_cfg.get("max_position_embeddings") or 2048)
    context = min(cfg.context_tokens or limit, limit)
    gen_path = root_of_record / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    temperature = float(gen.get("temperature", 1.0)) if gen.get("do_sample") else 0.0
    top_p = float(gen.get("top_p", 1.0))
    record = read_serving_record(root_of_record, data, tokenizer)
    system = choose_system_prompt(cfg.system_prompt, record["system_prompt"])
    eot = record["end_of_turn"]
    return ExportInfo(model_dir, tags, tuple(taxonomy), context, temperature, top_p, system, eot)


def read_serving_record(root: Path, data: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """serving.json, or for an export written before it existed: the system prompt from
    soulray.yaml and the end-of-turn marker from the tokenizer's chat template."""
    path = root / SERVING_RECORD
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(root))
    return build_serving_record(tokenizer, data.get("system_prompt"))


def choose_system_prompt(override: str | None, trained: str | None) -> str | None:
    """The training system prompt, unless serve.system_prompt deliberately overrides it."""
    if override is None or override == (trained or ""):
        return trained or None
    log.warning(
        "serve.system_prompt overrides the system prompt the model was trained with "
        "(%s chars instead of %s): replies may differ from what training taught",
        len(override),
        len(trained) if trained else "none, 0",
    )
    return override or None


def canonical_strategy(name: str, taxonomy: tuple[str, ...]) -> str | None:
    lowered = name.strip().lower()
    return next((s for s in taxonomy if s.lower() == lowered), None)


def check_messages(
    messages: list[ChatMessage],
    cfg: ServeConfig,
    system_prompt: str | None,
    tags: tuple[str, ...] | None = None,
    control_tokens: re.Pattern[str] | None = None,
) -> list[dict[str, str]]:
    """Validate roles and order; return template messages (system prompt first, if any). With
    `tags` (the taxonomy of a model trained with strategy tags), an earlier reply sent back
    with its `strategy` is rendered "[Strategy] text", as training rendered every reply. A
    message holding one of `control_tokens` (the tokenizer's special tokens) is refused: the
    template would write it as that token, so a user could forge a system or assistant turn."""
    if len(messages) > cfg.max_messages:
        raise APIError(
            400,
            f"too many messages ({len(messages)} > {cfg.max_messages}, serve.max_messages): "
            "send fewer of the oldest turns (the server keeps only the newest that fit anyway)",
            param="messages",
            code="too_many_messages",
        )
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":  # OpenAI's API: only a reply's may be
            raise APIError(
                400,
                f"messages[{i}]: a {m.role} message needs content (a string or text parts)",
                param=f"messages[{i}].content",
            )
        if isinstance(m.content, list) and not m.content:  # as OpenAI's API: one part at least
            raise APIError(
                400,
                f"messages[{i}].content is an empty list; send a string or at least one text part",
                param=f"messages[{i}].content",
            )
        if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
            raise APIError(
                400,
                f"messages[{i}]: only text content is supported",
                param=f"messages[{i}].content",
            )
        if isinstance(m.content, list) and any(p.text is None for p in m.content):
            j = next(j for j, p in enumerate(m.content) if p.text is None)
            raise APIError(
                400,
                f"messages[{i}].content[{j}]: a text part needs its text",
                param=f"messages[{i}].content[{j}].text",
            )
    # half a character (a lone UTF-16 surrogate, where a client cut an emoji in two) cannot
    # be encoded, and would fail the screen and the tokenizer: it is read as U+FFFD
    out = [{"role": _role(m.role), "content": SURROGATE.sub("\ufffd", m.text())} for m in messages]
    for i, message in enumerate(out):
        found = find_control_token(message["content"], control_tokens)
        if found:
            raise APIError(
                400,
                f"messages[{i}].content holds {found!r}, a special token of the model's "
                "tokenizer, which would be read as a turn marker rather than text; remove it",
                param=f"messages[{i}].content",
            )
    for i, m in enumerate(messages):
        if m.strategy is None:
            continue
        if m.role != "assistant":
            raise APIError(
                400,
                f"messages[{i}]: only an assistant message has a strategy",
                param=f"messages[{i}].strategy",
            )
        if tags is not None:
            name = canonical_strategy(m.strategy, tags)
            if name is None:
                raise APIError(
                    400,
                    f"messages[{i}]: unknown strategy {m.strategy!r}; use one of: "
                    f"{', '.join(tags)}",
                    param=f"messages[{i}].strategy",
                )
            out[i]["content"] = f"[{name}] {out[i]['content']}"
    turns = [m for m in out if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise APIError(400, "the last message must have role 'user'", param="messages")
    late = next((i for i, m in enumerate(out) if m["role"] == "system" and i > 0), None)
    if late is not None:
        raise APIError(
            400,
            f"messages[{late}]: a {messages[late].role} message may only come first (one "
            "system or developer message); merge it into messages[0]",
            param=f"messages[{late}].role",
        )
    if out[0]["role"] != "system" and system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def render_ids(tokenizer: Any, messages: list[dict[str, str]], reply_prefix: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # a template's raise_exception(), e.g. "roles must alternate"
        raise APIError(
            400, f"the model's chat template refused these messages: {e}", param="messages"
        ) from None
    return tokenizer(text + reply_prefix, add_special_tokens=False).input_ids


def fit_window(
    tokenizer: Any, messages: list[dict[str, str]], budget: int, reply_prefix: str = ""
) -> tuple[list[int], int]:
    """Prompt ids of the system prompt plus the most recent whole turns within `budget` tokens,
    and how many turns were left out. Binary search over where the window starts."""
    n_system = 1 if messages[0]["role"] == "system" else 0
    system, turns = messages[:n_system], messages[n_system:]
    # A window opens on a user turn, or at the very start: a leading assistant greeting is
    # context that training kept (conversation.py), so it stays while the whole dialogue fits.
    starts = sorted({0} | {i for i, m in enumerate(turns) if m["role"] == "user"})

    def ids_from(start: int) -> list[int]:
        return render_ids(tokenizer, system + turns[start:], reply_prefix)

    lo, hi = 0, len(starts) - 1  # the answer is the first start index whose render fits
    best = ids_from(starts[hi])
    if len(best) > budget:
        raise APIError(
            400,
            f"the latest message is {len(best)} tokens with the system prompt, over the "
            f"{budget} left for the prompt; shorten it or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )
    best_start = hi
    while lo < hi:
        mid = (lo + hi) // 2
        ids = ids_from(starts[mid])
        if len(ids) <= budget:
            best, best_start, hi = ids, mid, mid
        else:
            lo = mid + 1
    return best, starts[best_start]


def tag_end(text: str, final: bool = False) -> int | None:
    """Where a reply's leading "[Strategy] " tag ends in `text` (the reply so far): 0 when it
    has none, None while that cannot be told yet (never with `final`: the whole reply)."""
    match = TAG.match(text)
    if match:  # "[Tag]" with nothing after it yet waits: the space after the tag may follow
        done = len(text) > match.end() or final or text.endswith(" ")
        return match.end() if done else None
    undecided = text.startswith("[") and len(text) < MAX_TAG_CHARS
    return None if undecided and not final and "]" not in text and "\n" not in text else 0


class StrategyParser:
    """Splits a leading "[Strategy] " tag off a reply that arrives in pieces."""

    def __init__(self, taxonomy: tuple[str, ...], enabled: bool, forced: str | None) -> None:
        self.taxonomy, self.buffer = taxonomy, ""
        self.done = forced is not None or not enabled
        self.strategy = forced

    def push(self, text: str, final: bool = False, cut: bool = False) -> str:
        """Text that is safe to emit (the tag removed once it is complete). `cut`: the reply
        ended at max_tokens, so an unfinished "[Strat" is a tag cut short, never shown."""
        if self.done:
            return text
        self.buffer += text
        if not self.buffer and not final:
            return ""
        if final and cut and not TAG.match(self.buffer) and tag_end(self.buffer) is None:
            return self._release("")
        end = tag_end(self.buffer, final)
        if end is None:
            return ""
        match = TAG.match(self.buffer)
        if end and match:
            # A tag outside the taxonomy is noise from the model, not a strategy: strip it from
            # the text, but report no strategy rather than a made-up name.
            self.strategy = canonical_strategy(match.group(1), self.taxonomy)
        return self._release(self.buffer[end:])

    def _release(self, text: str) -> str:
        self.done, self.buffer = True, ""
        return text

"""Multi-LoRA for the `hf` engine: several peft LoRA adapters over one base model in one replica.

Adapters load on first use and at most `max_loaded` stay loaded (least recently used unloaded
first, never one a running row still uses). Rows of different adapters decode in one batch:
peft's LoRA layers take `adapter_names` (one per row, `BASE` for the plain base model) and apply
each row's adapter to that row only (peft's mixed-adapter batch inference). No Ray here.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from soulray.serve.fetch import fetch_model_dir

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def forward_args(model: Any, adapters: list[str | None]) -> dict[str, Any]:
    """Extra forward kwargs for a batch whose rows use `adapters` (None = the base model)."""
    if not hasattr(model, "peft_config"):
        return {}  # no adapter loaded yet: every row is a base row
    return {"adapter_names": [a or BASE for a in adapters]}


class AdapterPool:
    """The adapters a replica may serve (name -> path) and the ones loaded now, in LRU order."""

    def __init__(self, model: Any, paths: dict[str, str], max_loaded: int) -> None:
        self.model = model  # becomes a peft PeftModel on the first load
        self.paths, self.max_loaded = paths, max_loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.loads: Counter[str] = Counter()  # times each adapter was loaded (tests, counters)
        self.evictions = 0

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Make `name` loaded and most recently used. False when every slot holds an adapter in
        `busy` (running rows use it): the request waits for a slot."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        if len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if n not in busy), None)
            if victim is None:
                return False
            self._load(name)  # before the unload: a PeftModel keeps at least one adapter
            self.model.delete_adapter(victim)
            del self.loaded[victim]
            self.evictions += 1
        else:
            self._load(name)
        self.loaded[name] = None
        self.loads[name] += 1
        return True

    def _load(self, name: str) -> None:
        from peft import PeftModel

        # never waits here, at a request: with serve.wait_for_model_s the replica waited for
        # every adapter at its start (HFEngine); a half-written one is refused
        local = fetch_model_dir(self.paths[name])
        check_lora(local, name)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(local, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, local, adapter_name=name)
        self.model.eval()


def check_lora(directory: str, name: str) -> None:
    """Only plain LoRA adapters batch with others in peft (DoRA and other types do not)."""
    config = json.loads(Path(directory, "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(
            f"serve.adapters {name!r} is a {config.get('peft_type')} adapter"
            f"{' with DoRA' if config.get('use_dora') else ''}; multi-adapter serving takes "
            "plain LoRA adapters: merge this one into an export and serve it on its own"
        )

"""Each finished phase of `soulray eval` is saved in <output_dir>/phases/ with a fingerprint of
what it was computed from, so a run that fails in the judge phase after an hour of generation
keeps its replies.

`soulray eval --resume` reuses every saved phase whose fingerprint still matches (the same
endpoint settings, contexts, rubric, ...) and runs the rest. Without --resume nothing is reused:
the same URL may serve another model by now, and its old replies would be scored as new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from soulray import storage
from soulray.endpoints import EndpointConfig

log = logging.getLogger("soulray.eval")

# What decides an endpoint's answers; not its key, timeouts, retries or concurrency, so a run
# that failed on rate limits can resume at a lower concurrency and keep its replies.
ANSWER_FIELDS = ("base_url", "model", "temperature", "max_tokens")


def answer_settings(ep: EndpointConfig | None) -> dict[str, Any] | None:
    if ep is None:
        return None
    settings = {k: getattr(ep, k) for k in ANSWER_FIELDS}
    # the history a model is sent; only when on, so phases saved before it existed still match
    if getattr(ep, "send_strategies", False):
        settings["send_strategies"] = True
    return settings


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class PhaseStore:
    """<output_dir>/phases/<phase>.json: {key: {"fingerprint", "value"}} (key: a model's name
    for its replies, "all" for a phase run once)."""

    def __init__(self, output_dir: str, resume: bool):
        self.dir = storage.join(output_dir, "phases")
        self.resume = resume
        self.reused: list[str] = []
        self.saved: list[str] = []

    @staticmethod
    def _label(phase: str, key: str) -> str:
        return phase if key == "all" else f"{phase} of {key}"

    def _path(self, phase: str) -> str:
        return storage.join(self.dir, f"{phase}.json")

    def _entries(self, phase: str) -> dict[str, Any]:
        path = self._path(phase)
        if not storage.exists(path):
            return {}
        try:
            entries = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            log.warning("eval --resume: %s is not valid JSON (%s); running it again", path, e)
            return {}
        return entries if isinstance(entries, dict) else {}

    def load(
        self,
        phase: str,
        key: str,
        fp: str,
        announce: bool = True,
        changed: str | None = None,
        failed: Callable[[Any], bool] | None = None,
    ) -> Any | None:
        """The saved value, with --resume and the same fingerprint; else None (run it).
        `announce=False`: the caller says what it reuses. `changed`: what this run changed in
        the phase's inputs, if anything (a stale phase is then no warning about settings).
        `failed(value)`: the saved phase holds endpoint failures and is run again whole (not
        recorded as reused)."""
        if not self.resume:
            return None
        label = self._label(phase, key)
        entry = self._entries(phase).get(key)
        if entry is None:
            log.info("eval --resume: no saved %s; running it", label)
            return None
        if entry.get("fingerprint") != fp:
            if changed:
                log.info(
                    "eval --resume: the saved %s is out of date (%s); running it", label, changed
                )
            else:
                log.warning(
                    "eval --resume: the saved %s came from other settings; running it", label
                )
            return None
        if failed is not None and failed(entry["value"]):
            log.info("eval --resume: the saved %s has endpoint failures; running it again", label)
            return None
        if announce:
            log.info("eval --resume: reused the saved %s (%s)", label, self._path(phase))
        self.reused.append(label)
        return entry["value"]

    def forget_reuse(self, phase: str, key: str) -> None:
        """A phase load() returned is run again whole after all: not reused."""
        self.reused.remove(self._label(phase, key))

    def saved_fingerprint(self, phase: str, key: str) -> str | None:
        """The fingerprint a saved phase was computed from (with --resume), or None."""
        entry = self._entries(phase).get(key) if self.resume else None
        return entry.get("fingerprint") if isinstance(entry, dict) else None

    def save(self, phase: str, key: str, fp: str, value: Any) -> None:
        entries = self._entries(phase) | {key: {"fingerprint": fp, "value": value}}
        storage.makedirs(self.dir)
        storage.write_text(self._path(phase), json.dumps(entries, ensure_ascii=False))
        self.saved.append(self._label(phase, key))

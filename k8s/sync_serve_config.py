"""Regenerate the serveConfigV2 blocks in k8s/ from the soulray configs they are built from.

Each RayService file names its source in a comment (`soulray serve build --config jobs/X.yaml`);
this rewrites the block literal under `serveConfigV2: |` (base) or `value: |` (a JSON patch of
/spec/serveConfigV2) with exactly what `soulray serve build` makes of that config.
Run: make k8s-serve-config   (tests/deploy checks the two agree)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from soulray.config import load_config
from soulray.serve.app import build_serve_config

K8S = Path(__file__).resolve().parent
ROOT = K8S.parent
FILES = [K8S / "base" / "rayservice.yaml", K8S / "overlays" / "gpu-h100" / "patch-rayservice.yaml"]
SOURCE = re.compile(r"soulray serve build --config (jobs/[\w./-]+\.yaml)")
BLOCK = re.compile(r"^(?P<indent> *)(serveConfigV2|value): \|\n")


def sync(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    source = SOURCE.search(text)
    if source is None:
        raise SystemExit(f"{path}: no `soulray serve build --config jobs/X.yaml` comment")
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if BLOCK.match(line))
    indent = len(BLOCK.match(lines[start])["indent"]) + 2
    built = build_serve_config(load_config(ROOT / source.group(1)))
    body = yaml.safe_dump(built, sort_keys=False, width=100 - indent)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(" " * indent)):
        end += 1
    block = [(" " * indent + line).rstrip() + "\n" for line in body.splitlines()]
    new = "".join(lines[: start + 1] + block + lines[end:])
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    for f in FILES:
        print(f"{f.relative_to(ROOT)}: {'rewritten' if sync(f) else 'up to date'}")
    sys.exit(0)

"""Render and walk soulray's KubeRay manifests for the deploy tests.

`render(target)` gives the documents of k8s/base or an overlay: rendered by `kubectl kustomize`
when kubectl is installed, else (the base only) read from the files its kustomization lists.
`strict_crd_schema(kind)` is a KubeRay CRD's v1 OpenAPI schema with unknown fields refused.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
TARGETS = ["base", "overlays/dev-cpu", "overlays/gpu-h100"]
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


MIN_KUBECTL_MINOR = 21  # its built-in kustomize v4 reads `resources: [../../base]` and `patches`


@functools.cache
def kubectl() -> str | None:
    """kubectl, when installed and recent enough to render the overlays (Debian 12's
    kubernetes-client is 1.20, whose kustomize v2 cannot)."""
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    probe = subprocess.run(
        [exe, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        return None
    minor = re.match(r"\d+", json.loads(probe.stdout)["clientVersion"]["minor"])
    return exe if minor and int(minor.group()) >= MIN_KUBECTL_MINOR else None


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """The documents of one kustomize target (see the module docstring)."""
    exe = kubectl()
    if exe is not None:
        out = subprocess.run(
            [exe, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise AssertionError(f"kubectl kustomize k8s/{target} failed:\n{out.stderr}")
        return tuple(d for d in yaml.load_all(out.stdout, Loader=Loader) if d)
    if target != "base":
        raise LookupError(
            f"kubectl >= 1.{MIN_KUBECTL_MINOR} is not installed: overlays cannot be rendered"
        )
    kustomization = load_yaml(K8S / "base" / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.load_all((K8S / "base" / name).read_text(), Loader=Loader) if d]
    return tuple(docs)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)


def refuse_unknown_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """Set additionalProperties: false on every object schema that lists its properties and
    neither preserves unknown fields nor says what extra keys may hold (so typos are caught)."""
    out = copy.deepcopy(schema)
    stack: list[Any] = [out]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


@functools.cache
def strict_crd_schema(kind: str) -> dict[str, Any]:
    crd = load_yaml(CRD_DIR / CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return refuse_unknown_fields(version["schema"]["openAPIV3Schema"])


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec") or {}
    match doc["kind"]:
        case "RayCluster":
            return spec
        case "RayJob":
            return spec.get("rayClusterSpec")
        case "RayService":
            return spec.get("rayClusterConfig")
    return None


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a Ray resource creates, the RayJob submitter too."""
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = cluster_spec(doc)
    if spec is not None:
        yield f"{name} head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs") or []:
            yield f"{name} group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield f"{name} submitter", doc["spec"]["submitterPodTemplate"]


def gpus(template: dict[str, Any]) -> int:
    """GPUs a pod asks for (nvidia.com/gpu limits of its containers)."""
    total = 0
    for c in template["spec"]["containers"]:
        total += int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
    return total


def cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 2) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def image_ray_version(image: str) -> str | None:
    """The Ray version an image tag names: rayproject/ray:<v>-... or our <x>-ray<v>-... tags."""
    name, _, tag = image.rpartition(":")
    if re.fullmatch(r"(.*/)?rayproject/ray(-ml|-llm)?", name):
        m = re.match(r"(\d+\.\d+\.\d+)", tag)
    else:
        m = re.search(r"(?:^|-)ray(\d+\.\d+\.\d+)(?:-|$)", tag)
    return m.group(1) if m else None

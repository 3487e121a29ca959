"""The `ray up` configs in cluster/ and the image they run are what Ray and soulray expect.

Each launcher YAML validates against Ray's own cluster-config schema (ray/autoscaler/
ray-schema.json) and passes the checks `ray up` makes before it touches a cloud (defaults
filled in, head type known, min_workers within max_workers). The Dockerfile builds FROM the
Ray image at the pinned version and compiles flash-attn into the image, never at run time.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from k8s_render import ROOT, image_ray_version

LAUNCHER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
DOCKERFILE = ROOT / "cluster" / "Dockerfile"


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def start_commands(cfg: dict) -> list[str]:
    return [*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]]


def test_there_are_aws_and_gcp_h100_configs():
    providers = {load(p)["provider"]["type"] for p in LAUNCHER_CONFIGS}
    assert providers == {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_validates_against_rays_cluster_config_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(path)
    jsonschema.validate(cfg, ray_schema())
    validate_config(cfg)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # as `ray up` does, before any cloud call


def test_the_schema_check_catches_a_typo():
    cfg = load(LAUNCHER_CONFIGS[0])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    head["max_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(cfg, ray_schema())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_cpu_head_and_autoscaled_h100_workers(path):
    cfg = load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), (
        "the head runs drivers only"
    )
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] == 8 for t in workers)
    for t in workers:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    instance = {
        t["node_config"].get("InstanceType") or t["node_config"].get("machineType") for t in workers
    }
    assert instance <= {"p5.48xlarge", "a3-highgpu-8g"}, instance


def test_gcp_gpu_workers_terminate_on_host_maintenance():
    """The Compute API's `scheduling` is an object (instances.insert); a YAML list there (as in
    some of Ray's own examples, ray-project/ray#46248) is not the TERMINATE a GPU VM needs."""
    (cfg,) = [load(p) for p in LAUNCHER_CONFIGS if load(p)["provider"]["type"] == "gcp"]
    workers = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")}
    assert {n: t["node_config"].get("scheduling") for n, t in workers.items()} == {
        "ray_worker_h100": {"onHostMaintenance": "TERMINATE"}
    }


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_image_token_auth_and_shared_storage(path):
    cfg = load(path)
    assert image_ray_version(cfg["docker"]["image"]) == ray.__version__
    for command in start_commands(cfg):
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, f"{path.name}: {command}"
    assert any(target.endswith(".ray/auth_token") for target in cfg["file_mounts"]), (
        "every node needs the cluster's token"
    )
    assert any("/mnt/soulray" in opt for opt in cfg["docker"]["run_options"])
    assert any("/mnt/soulray" in c for c in cfg["initialization_commands"])


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_flash_attn_is_never_installed_at_run_time(path):
    for key in (
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "initialization_commands",
    ):
        for command in load(path).get(key) or []:
            assert not re.search(r"flash[-_]attn", command), f"{path.name} {key}: {command}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, argument) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest))
            current = ""
    return lines


def test_dockerfile_builds_from_the_pinned_ray_image():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    assert args["RAY_VERSION"] == ray.__version__
    (base,) = [a for word, a in instructions if word == "FROM"]
    assert base.startswith("rayproject/ray:${RAY_VERSION}-"), base
    for tag in re.findall(r"-t (\S+)", DOCKERFILE.read_text()):
        assert image_ray_version(tag) == ray.__version__, tag


def test_dockerfile_compiles_flash_attn_into_the_image():
    runs = " ".join(a for word, a in dockerfile_instructions() if word == "RUN")
    install = re.search(r"pip install [^;]*flash-attn[^;]*", runs)
    assert install, "flash-attn must be installed in the image"
    assert "--no-build-isolation" in install.group(0)
    assert re.search(r"MAX_JOBS=\S+", runs), "cap the compile jobs (MAX_JOBS)"
    assert runs.index("torch==") < runs.index("flash-attn"), "torch first: flash-attn builds on it"


def test_k8s_and_launcher_images_are_ones_the_dockerfile_builds():
    built = {tag.rpartition(":")[2] for tag in re.findall(r"-t (\S+)", DOCKERFILE.read_text())}
    images = {load(p)["docker"]["image"] for p in LAUNCHER_CONFIGS}
    images |= set(
        re.findall(r"image: (\S+)", "".join(p.read_text() for p in (ROOT / "k8s").rglob("*.yaml")))
    )
    images |= {
        f"x:{t}"
        for t in re.findall(
            r"newTag: (\S+)",
            "".join(p.read_text() for p in (ROOT / "k8s").rglob("kustomization.yaml")),
        )
    }
    for image in images:
        assert image.rpartition(":")[2] in built, f"{image} is not built by cluster/Dockerfile"

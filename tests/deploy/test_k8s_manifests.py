"""The KubeRay manifests in k8s/ are valid for the operator, not just parseable YAML.

Every target (the base, and the overlays when kubectl can render them) is checked against the
KubeRay CRDs in ../shared/k8s-schemas with unknown fields refused, the operator's own rules
(../shared/k8s-schemas/kuberay/SOURCE.md), and soulray's rules: resources on every container,
/dev/shm in memory for GPU pods, image tags on the pinned Ray version, token auth, a network
policy that keeps the head's ports inside the namespace, and RayJob entrypoints that our CLI
parses with config files that exist and load.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import typer
import yaml
from k8s_render import (
    CRD_DIR,
    K8S,
    ROOT,
    TARGETS,
    cluster_spec,
    cpus,
    gpus,
    image_ray_version,
    kubectl,
    load_yaml,
    pod_templates,
    render,
    strict_crd_schema,
)

from soulray.cli import app
from soulray.config import Config, load_config
from soulray.serve.app import build_serve_config

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
OPERATOR_PORTS = {8265, 52365}  # dashboard (jobs, Serve config) and dashboard agent (Serve health)
PUBLIC_PORTS = {8000}  # Ray Serve HTTP

pytestmark = pytest.mark.skipif(
    not CRD_DIR.is_dir(), reason=f"{CRD_DIR} is absent (the KubeRay CRDs live in ../shared)"
)


def docs_of(target: str) -> tuple[dict[str, Any], ...]:
    try:
        return render(target)
    except LookupError as e:
        pytest.skip(f"{e}; install kubectl >= 1.21 to render the overlays")


def ray_docs(target: str) -> list[dict[str, Any]]:
    return [d for d in docs_of(target) if d["kind"] in RAY_KINDS]


def by_kind(target: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs_of(target) if d["kind"] == kind]


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """The entrypoint's one command as argv. KubeRay's submitter pastes it into its own shell
    after `ray job submit --`, so a second command (after &&, ;, |) would run in the submitter
    pod, not on the cluster (ray-project/kuberay#3929): one command only."""
    argv = shlex.split(entrypoint)
    assert not {"&&", ";", "|", "||", "&"} & set(argv) and ";" not in entrypoint, (
        f"{entrypoint!r}: one command only; its second would run in the submitter pod"
    )
    return [argv]


def parse_soulray(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse `soulray <verb> ...` with the real CLI, without running it: (verb, params)."""
    assert argv[0] == "soulray", f"{argv}: entrypoints run soulray verbs only"
    group = typer.main.get_command(app)
    root = click.Context(group, info_name="soulray")
    verb, command, rest = group.resolve_command(root, argv[1:])
    params = command.make_context(verb, list(rest), parent=root).params
    return verb, params


def job_config(doc: dict[str, Any]) -> tuple[Path, Config]:
    """The config file the RayJob's soulray commands share, loaded."""
    configs = set()
    for argv in entrypoint_commands(doc["spec"]["entrypoint"]):
        _, params = parse_soulray(argv)
        configs.add((str(params["config"]), tuple(params.get("overrides") or ())))
    assert len(configs) == 1, f"the stages of one job must share one config: {configs}"
    ((path, overrides),) = configs
    return ROOT / path, load_config(ROOT / path, list(overrides))


# --- every target: schema and operator rules -------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_ray_resources_validate_against_the_crds_with_unknown_fields_refused(target):
    docs = ray_docs(target)
    assert {d["kind"] for d in docs} == set(RAY_KINDS)
    for doc in docs:
        errors = list(jsonschema.Draft7Validator(strict_crd_schema(doc["kind"])).iter_errors(doc))
        assert not errors, "\n".join(
            f"{doc['kind']}/{doc['metadata']['name']} {'.'.join(map(str, e.absolute_path))}: "
            f"{e.message}"
            for e in errors
        )


@pytest.mark.parametrize(
    "path, typo",
    [
        (("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParam"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0), "minReplica"),
        (
            ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
            "resource",
        ),
        (("spec",), "shutdownAfterJobFinish"),
    ],
)
def test_the_strict_schema_catches_typos(path, typo):
    (doc,) = by_kind("base", "RayJob")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    node = broken
    for key in path:
        node = node[key]
    node[typo] = {}
    with pytest.raises(jsonschema.ValidationError, match=typo):
        jsonschema.Draft7Validator(strict_crd_schema("RayJob")).validate(broken)


@pytest.mark.parametrize("target", TARGETS)
def test_operator_rules(target):
    for doc in ray_docs(target):
        name, kind, spec = doc["metadata"]["name"], doc["kind"], doc["spec"]
        assert DNS_1035.fullmatch(name) and len(name) <= NAME_LIMITS[kind], (
            f"{kind} name {name!r} must be DNS-1035 and at most {NAME_LIMITS[kind]} characters"
        )
        if kind == "RayJob":
            assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), (
                f"RayJob {name}: exactly one of rayClusterSpec / clusterSelector"
            )
            if spec.get("ttlSecondsAfterFinished", 0) > 0:
                assert spec.get("shutdownAfterJobFinishes") is True, (
                    f"RayJob {name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"
                )
        groups = cluster_spec(doc).get("workerGroupSpecs") or []
        assert len({g["groupName"] for g in groups}) == len(groups), f"{name}: duplicate groups"
        for g in groups:
            where = f"{kind}/{name} group {g['groupName']}"
            assert {"minReplicas", "maxReplicas", "replicas"} <= set(g), (
                f"{where}: set replicas, minReplicas and maxReplicas explicitly"
            )
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where


@pytest.mark.parametrize("target", TARGETS)
def test_soulray_cluster_rules(target):
    """Pinned Ray version, token auth, head without GPUs, autoscaling where replicas vary,
    and the RayJob cleans up after itself."""
    for doc in ray_docs(target):
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, where
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: enable token auth"
        assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0", where
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not spec["headGroupSpec"].get("enableIngress", False), where
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True, where
            assert doc["spec"]["ttlSecondsAfterFinished"] > 0, where
            runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
            assert not re.search(r"flash[-_]attn", str(runtime_env)), (
                f"{where}: flash-attn is built into the image, never installed by a runtime_env"
            )
        else:
            assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscale the workers"


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target):
    for doc in ray_docs(target):
        spec = cluster_spec(doc)
        if spec.get("enableInTreeAutoscaling"):
            res = spec.get("autoscalerOptions", {}).get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})) & set(res.get("limits", {}))
        for where, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(part, {})), (
                        f"{where} container {c['name']}: resources.{part} needs cpu and memory"
                    )
                gpu = {p: res[p].get("nvidia.com/gpu") for p in ("requests", "limits")}
                assert gpu["requests"] == gpu["limits"], (
                    f"{where}: nvidia.com/gpu requests must equal limits"
                )


@pytest.mark.parametrize("target", TARGETS)
def test_nccl_pods_mount_dev_shm_in_memory(target):
    """GPU pods, and the RayJob's workers (they run the training loop), get /dev/shm as a
    memory emptyDir: the container runtime's 64 MB default breaks NCCL and Ray's object store."""
    for doc in ray_docs(target):
        for where, template in pod_templates(doc):
            trains = doc["kind"] == "RayJob" and " group " in where
            if not (gpus(template) or trains):
                continue
            pod = template["spec"]
            memory_dirs = {
                v["name"]
                for v in pod.get("volumes", [])
                if (v.get("emptyDir") or {}).get("medium") == "Memory"
            }
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert mounts.get("/dev/shm") in memory_dirs, (
                    f"{where} container {c['name']}: mount /dev/shm from an emptyDir with "
                    "medium: Memory"
                )


@pytest.mark.parametrize("target", TARGETS)
def test_gpu_pods_schedule_on_gpu_nodes(target):
    for doc in ray_docs(target):
        for where, template in pod_templates(doc):
            if gpus(template):
                pod = template["spec"]
                keys = {t.get("key") for t in pod.get("tolerations", [])}
                assert "nvidia.com/gpu" in keys, f"{where}: tolerate the nvidia.com/gpu taint"
                assert pod.get("nodeSelector"), f"{where}: select the GPU nodes"


@pytest.mark.parametrize("target", TARGETS)
def test_image_tags_carry_the_pinned_ray_version(target):
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == ray.__version__, "pyproject's ray pin is the installed Ray"
    for doc in ray_docs(target):
        for where, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                assert image_ray_version(c["image"]) == ray.__version__, (
                    f"{where}: image {c['image']} does not name Ray {ray.__version__}"
                )


@pytest.mark.parametrize("target", TARGETS)
def test_shared_storage_is_mounted_everywhere(target):
    """Checkpoints must be reachable from every node: the same ReadWriteMany claim at the same
    path in every Ray pod, writable by the image's user."""
    claims = {d["metadata"]["name"]: d for d in by_kind(target, "PersistentVolumeClaim")}
    for doc in ray_docs(target):
        for where, template in pod_templates(doc):
            if where.endswith("submitter"):
                continue
            pod = template["spec"]
            pvc = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            assert pvc, f"{where}: mount the shared volume"
            for name in pvc.values():
                assert name in claims, f"{where}: claim {name} is not in k8s/{target}"
                assert "ReadWriteMany" in claims[name]["spec"]["accessModes"], name
            for c in pod["containers"]:
                mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
                assert [mounts.get(v) for v in pvc] == ["/mnt/soulray"] * len(pvc), where
            # the image's ray user (uid 1000, group 100) could not write a root-owned volume
            assert pod.get("securityContext", {}).get("fsGroup") == 100, where


# --- other kinds, and references between documents ------------------------------------------


REQUIRED = {
    "PersistentVolumeClaim": [("spec", "accessModes"), ("spec", "resources", "requests")],
    "NetworkPolicy": [("spec", "podSelector"), ("spec", "policyTypes"), ("spec", "ingress")],
    "ConfigMap": [("data",)],
    "Secret": [("data",)],
    "Namespace": [],
}
API_VERSIONS = {
    "PersistentVolumeClaim": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Namespace": "v1",
}


@pytest.mark.parametrize("target", TARGETS)
def test_other_kinds_have_their_required_keys(target):
    for doc in docs_of(target):
        kind = doc["kind"]
        if kind in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1"
            continue
        assert kind in REQUIRED, f"unexpected kind {kind} in k8s/{target}"
        assert doc["apiVersion"] == API_VERSIONS[kind], f"{kind}: apiVersion"
        assert DNS_1035.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
        for path in REQUIRED[kind]:
            node = doc
            for key in path:
                assert key in node, f"{kind}/{doc['metadata']['name']}: missing {'.'.join(path)}"
                node = node[key]


@pytest.mark.parametrize("target", TARGETS[1:])
def test_overlays_put_everything_in_their_namespace(target):
    docs = docs_of(target)
    (ns,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, doc["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS[1:])
def test_referenced_secrets_and_configmaps_exist_or_are_documented(target):
    """A Secret is either rendered (dev) or created out of band by a command the overlay's
    kustomization.yaml shows (production secrets never live in git)."""
    docs = docs_of(target)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    header = (K8S / target / "kustomization.yaml").read_text()
    documented = set(re.findall(r"create secret generic ([a-z0-9-]+)", header))
    for doc in ray_docs(target):
        secret = cluster_spec(doc)["authOptions"].get("secretName")
        refs = {("Secret", secret)} if secret else set()
        for _, template in pod_templates(doc):
            for c in template["spec"]["containers"]:
                for env in c.get("env", []):
                    if "secretKeyRef" in env.get("valueFrom", {}):
                        refs.add(("Secret", env["valueFrom"]["secretKeyRef"]["name"]))
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        refs.add(("ConfigMap", src["configMapRef"]["name"]))
        for kind, name in refs:
            assert (kind, name) in present or (kind == "Secret" and name in documented), (
                f"{doc['kind']}/{doc['metadata']['name']} needs {kind} {name}, which k8s/{target} "
                "neither renders nor documents (`kubectl create secret generic ...`)"
            )
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] == "soulray-ray-token":
            assert "auth_token" in d["data"], "KubeRay reads the Ray token from key auth_token"


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def rule_reach(rule: dict[str, Any]) -> str:
    """Who an ingress rule lets in: "namespace" (pods of this namespace), "operator" (the
    KubeRay operator's pods, any namespace) or "anyone"."""
    peers = rule.get("from", [])
    if peers and all(set(peer) == {"podSelector"} for peer in peers):
        return "namespace"
    operator = [
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        == "kuberay-operator"
        and "ipBlock" not in peer
        for peer in peers
    ]
    return "operator" if peers and all(operator) else "anyone"


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_keeps_head_ports_inside_the_namespace(target):
    """Every Ray pod is selected by an ingress policy; rules open beyond the namespace allow
    only the operator (dashboard, agent) and Serve's HTTP port."""
    policies = [
        p for p in by_kind(target, "NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]
    ]
    allowed = {"operator": OPERATOR_PORTS, "anyone": PUBLIC_PORTS}
    for doc in ray_docs(target):
        for where, template in pod_templates(doc):
            if where.endswith("submitter"):
                continue
            # the operator adds this label to every Ray pod it creates
            labels = {
                **template["metadata"]["labels"],
                "app.kubernetes.io/created-by": "kuberay-operator",
            }
            selecting = [p for p in policies if labels_match(p["spec"]["podSelector"], labels)]
            assert selecting, f"{where}: no NetworkPolicy restricts its ingress"
            for p in selecting:
                for rule in p["spec"].get("ingress", []):
                    reach = rule_reach(rule)
                    if reach == "namespace":
                        continue
                    ports = {port.get("port") for port in rule.get("ports", [])}
                    assert ports and ports <= allowed[reach], (
                        f"{where}: NetworkPolicy {p['metadata']['name']} opens "
                        f"{ports or 'every port'} to {reach}"
                    )


# --- entrypoints and the serve config ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_rayjob_entrypoints_parse_with_our_cli_and_configs_load(target):
    (doc,) = by_kind(target, "RayJob")
    verbs = []
    for argv in entrypoint_commands(doc["spec"]["entrypoint"]):
        verb, params = parse_soulray(argv)
        verbs.append(verb)
        config = Path(params["config"])
        assert config.parts[0] == "jobs" and (ROOT / config).is_file(), (
            f"{doc['spec']['entrypoint']!r}: --config {config} must name a file in jobs/"
        )
        cfg = load_config(ROOT / config, list(params.get("overrides") or []))
        assert cfg.pipeline.stages == ["prepare", "train"]
    assert verbs == ["pipeline"]
    with pytest.raises(AssertionError, match="one command only"):
        entrypoint_commands("soulray prepare -c jobs/x.yaml && soulray train -c jobs/x.yaml")


def test_cli_parsing_refuses_what_the_cli_refuses():
    with pytest.raises(Exception, match="No such option"):
        parse_soulray(["soulray", "train", "--config", "jobs/k8s-dev-cpu.yaml", "--bogus"])
    with pytest.raises(Exception, match="No such command"):
        parse_soulray(["soulray", "trian", "--config", "jobs/k8s-dev-cpu.yaml"])


@pytest.mark.parametrize("target", TARGETS)
def test_job_config_fits_the_cluster(target):
    """The RayJob's workers can hold train.num_workers, and everything is on shared storage."""
    (doc,) = by_kind(target, "RayJob")
    _, cfg = job_config(doc)
    groups = cluster_spec(doc)["workerGroupSpecs"]
    t = cfg.train
    for path in (t.storage_path, t.export_dir, cfg.data.output_dir):
        assert path.startswith(("/mnt/soulray/", "s3://", "gs://")), f"{path} is not shared"
    if t.use_gpu:
        gpu_total = sum(g["replicas"] * gpus(g["template"]) for g in groups)
        per_worker = t.resources_per_worker.get("GPU", 1)
        assert gpu_total >= t.num_workers * per_worker, (gpu_total, t.num_workers)
    else:
        cpu_total = sum(
            g["replicas"] * cpus(c["resources"]["limits"]["cpu"])
            for g in groups
            for c in g["template"]["spec"]["containers"]
        )
        assert cpu_total >= t.num_workers + 1, "one CPU per training worker + one for Ray Data"


@pytest.mark.parametrize("target", TARGETS)
def test_serve_config_validates_with_ray_serve_schema(target):
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    (doc,) = by_kind(target, "RayService")
    raw = serve_config(doc)
    ServeDeploySchema.model_validate(raw)
    # Serve ignores unknown keys; refuse them here so a typo is not silently dropped.
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    assert set(raw.get("http_options", {})) <= set(HTTPOptionsSchema.model_fields)
    (application,) = raw["applications"]
    assert set(application) <= set(ServeApplicationSchema.model_fields)
    assert application["import_path"] == "soulray.serve.app:build_app"
    assert application["route_prefix"] == "/"
    assert set(application["args"]) == {"config"}
    cfg = Config.model_validate(application["args"]["config"])
    assert raw["http_options"]["port"] == cfg.serve.port == 8000
    assert raw["http_options"]["host"] == "0.0.0.0"
    assert cfg.serve.auth.required and cfg.serve.auth.api_key_env == "SOULRAY_API_KEY"
    for where, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            assert "SOULRAY_API_KEY" in names, f"{where}: SOULRAY_API_KEY from the Secret"


def test_serve_import_path_imports():
    import importlib

    module, _, attr = "soulray.serve.app:build_app".partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_serves_what_the_rayjob_exports(target):
    """One source of truth: serveConfigV2 is exactly what `soulray serve build` makes of the
    config the RayJob trains with, so the RayService serves the model that job exports."""
    (job,) = by_kind(target, "RayJob")
    (service,) = by_kind(target, "RayService")
    path, trained = job_config(job)
    built = build_serve_config(trained)
    assert serve_config(service) == built, (
        f"serveConfigV2 of {target} is stale: regenerate it with "
        f"`make k8s-serve-config` (soulray serve build --config {path.relative_to(ROOT)})"
    )
    (application,) = built["applications"]
    assert application["args"]["config"]["serve"]["engine"]["model_dir"] == trained.train.export_dir


WAIT_FOR_MODEL_S = {"base": 1800, "overlays/dev-cpu": 1800, "overlays/gpu-h100": 7200}


@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_replicas_wait_for_the_rayjobs_export(target):
    """The RayService is applied with the RayJob: its replicas wait for the export instead of
    failing at once, and the overlay's header says so instead of "delete and re-apply"."""
    (service,) = by_kind(target, "RayService")
    (job,) = by_kind(target, "RayJob")
    (application,) = serve_config(service)["applications"]
    serve = Config.model_validate(application["args"]["config"]).serve
    assert serve.wait_for_model_s == WAIT_FOR_MODEL_S[target]
    if target != "base":
        header = (K8S / target / "kustomization.yaml").read_text()
        assert f"serve.wait_for_model_s in {job_config(job)[0].relative_to(ROOT)}" in header


@pytest.mark.parametrize("target", TARGETS)
def test_rayservice_workers_can_hold_the_engine_replicas(target):
    (service,) = by_kind(target, "RayService")
    (application,) = serve_config(service)["applications"]
    serve = Config.model_validate(application["args"]["config"]).serve
    engine = serve.engine
    groups = cluster_spec(service)["workerGroupSpecs"]
    cpu_max = sum(
        g["maxReplicas"] * cpus(c["resources"]["limits"]["cpu"])
        for g in groups
        for c in g["template"]["spec"]["containers"]
    )
    need = engine.autoscaling.max_replicas * engine.num_cpus
    if serve.resolved_layout() == "two_deployments":  # else the engine runs in the ingress
        need += serve.ingress.autoscaling.max_replicas * serve.ingress.num_cpus
    assert cpu_max >= need, f"{cpu_max} worker CPUs at most for {need} needed by max_replicas"
    if engine.num_gpus:
        gpu_max = sum(g["maxReplicas"] * gpus(g["template"]) for g in groups)
        need = engine.autoscaling.max_replicas * engine.num_gpus
        assert gpu_max >= need, f"{gpu_max} GPUs at most for {need} needed by max_replicas"


# --- the files themselves -----------------------------------------------------------------------


def yaml_files() -> list[Path]:
    """k8s/ and cluster/ YAMLs, and the jobs/ configs they run."""
    own = [*K8S.rglob("*.yaml"), *(ROOT / "cluster").glob("*.yaml")]
    named = {m for p in own for m in re.findall(r"jobs/[\w./-]+\.yaml", p.read_text())}
    return sorted([*own, *(ROOT / n for n in named if (ROOT / n).is_file())])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_files_start_with_what_they_are_and_the_command(path):
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} must start with a comment saying what it is"
    assert re.search(r"kubectl (apply|kustomize)|ray up|soulray \w+|make \w+", "\n".join(header)), (
        f"{path.name}: the header must show the command that applies or uses it"
    )
    for config in re.findall(r"--config (jobs/[\w./-]+\.yaml)", text):
        assert (ROOT / config).is_file(), f"{path.name} names {config}, which does not exist"


def test_kustomizations_reference_files_that_exist():
    for path in K8S.rglob("kustomization.yaml"):
        k = load_yaml(path)
        assert k["kind"] == "Kustomization" and k["apiVersion"].startswith("kustomize.config")
        # kustomize v5's fields only: `bases` and `patchesJson6902` print deprecation warnings
        assert not {"bases", "patchesJson6902", "patchesStrategicMerge"} & set(k), path
        listed = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]
        for name in listed:
            assert (path.parent / name).exists(), f"{path.relative_to(ROOT)}: {name} is missing"


def test_overlays_are_rendered_when_kubectl_is_installed():
    if kubectl() is None:
        pytest.skip("kubectl >= 1.21 is not installed; only k8s/base was validated")
    for target in TARGETS:
        assert ray_docs(target)

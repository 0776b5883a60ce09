"""deploy/kubernetes: the manifests parse, the built-in kinds validate against Kubernetes' own schemas
(`kubernetes-validate`), the custom resources use only their projects' published fields, and everything they say
about the server agrees with the code: probe paths and ports, the metric the autoscalers read, the arguments."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.openai.app import ServerState, create_app
from server.openai.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
FILES = sorted(DEPLOY.glob("*/*.yaml"))
# Published field names of the custom resources (KEDA's ScaledObject v1alpha1 and its Prometheus scaler, the
# Gateway API Inference Extension's InferencePool v1).
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                      "ignoreNullValues", "unsafeSsl", "queryParameters"}
INFERENCE_POOL_SPEC = {"selector", "targetPorts", "endpointPickerRef"}
# LeaderWorkerSet v1 (kubernetes-sigs/lws): the spec and its leaderWorkerTemplate.
LWS_SPEC = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE = {"size", "leaderTemplate", "workerTemplate", "restartPolicy", "subGroupPolicy"}
ENDPOINT_PICKER_REF = {"group", "kind", "name", "port", "failureMode"}


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_there_is_a_cpu_and_a_gpu_variant_with_every_piece():
    kinds = {}
    for path, doc in documents():
        kinds.setdefault(path.parent.name, set()).add(doc["kind"])
    expected = {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "ScaledObject",
                "HorizontalPodAutoscaler", "InferencePool"}
    assert kinds == {"cpu": expected, "gpu": expected,
                     "multi-gpu": {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"},
                     "multi-host": {"LeaderWorkerSet", "Service", "PersistentVolumeClaim"}}


def server_arguments(container: dict) -> list[str]:
    """The arguments `python -m server` gets: the container's, or those after `-m server` in its torchrun line."""
    if container.get("command") == ["sh", "-c"]:
        words = shlex.split(container["args"][0])
        assert words[:2] == ["exec", "torchrun"] and words[words.index("-m") + 1] == "server", words
        return words[words.index("-m") + 2:]
    return container["args"]


def torchrun_ranks(container: dict) -> tuple[int, str]:
    words = shlex.split(container["args"][0])
    return int(words[words.index("--nproc-per-node") + 1]), words[words.index("--nnodes") + 1]


def test_leader_worker_sets_use_published_fields_and_valid_pods():
    for path, doc in documents():
        if doc["kind"] != "LeaderWorkerSet":
            continue
        assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        assert set(doc["spec"]) <= LWS_SPEC and set(doc["spec"]["leaderWorkerTemplate"]) <= LWS_TEMPLATE, path
        for role in ("leaderTemplate", "workerTemplate"):
            template = doc["spec"]["leaderWorkerTemplate"][role]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
                   "spec": template["spec"]}
            kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)


def test_tensor_parallel_manifests_give_each_rank_a_device():
    """The GPUs a pod asks for, times the pods of a group, are the ranks its config splits the model over; torchrun
    takes the group's size and each pod's index from LeaderWorkerSet's variables; the grace period exceeds the
    server's drain."""
    for path, doc in documents():
        if path.parent.name not in ("multi-gpu", "multi-host") or doc["kind"] not in ("Deployment", "LeaderWorkerSet"):
            continue
        if doc["kind"] == "Deployment":
            templates = [(doc["spec"]["template"], 1)]
        else:
            group = doc["spec"]["leaderWorkerTemplate"]
            templates = [(group["leaderTemplate"], group["size"]), (group["workerTemplate"], group["size"])]
        for template, size in templates:
            (container,) = template["spec"]["containers"]
            args = build_parser().parse_args(server_arguments(container))
            config = yaml.safe_load((ROOT / args.config).read_text())
            gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
            if doc["kind"] == "LeaderWorkerSet":
                per_pod, nodes = torchrun_ranks(container)
                assert nodes == "$LWS_GROUP_SIZE" and '--node-rank "$LWS_WORKER_INDEX"' in container["args"][0]
                assert per_pod == gpus
            assert gpus * size == config["tensor_parallel_size"], path
            assert template["spec"]["terminationGracePeriodSeconds"] > args.shutdown_grace_seconds


@pytest.mark.parametrize("path, doc", [d for d in documents() if "k8s.io" not in d[1]["apiVersion"]
                                       and d[1]["kind"] not in ("ScaledObject",)],
                         ids=lambda v: v.name if isinstance(v, Path) else v.get("kind", ""))
def test_built_in_kinds_validate_against_kubernetes_schemas(path, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def test_custom_resources_use_only_published_fields():
    for path, doc in documents():
        if doc["kind"] == "ScaledObject":
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
            assert set(doc["spec"]) <= SCALED_OBJECT_SPEC, path
            for trigger in doc["spec"]["triggers"]:
                assert trigger["type"] == "prometheus" and set(trigger["metadata"]) <= PROMETHEUS_TRIGGER, path
                assert all(isinstance(v, str) for v in trigger["metadata"].values()), path
        if doc["kind"] == "InferencePool":
            assert doc["apiVersion"] == "inference.networking.k8s.io/v1"
            spec = doc["spec"]
            assert set(spec) <= INFERENCE_POOL_SPEC and set(spec["selector"]) == {"matchLabels"}, path
            assert [set(p) for p in spec["targetPorts"]] == [{"number"}], path
            assert set(spec["endpointPickerRef"]) <= ENDPOINT_PICKER_REF, path
            assert set(spec["endpointPickerRef"]["port"]) == {"number"}, path


def test_manifests_agree_with_the_server(tiny_server):
    app = create_app(ServerState(ServerConfig(served_model_name="x")))
    routes = {route.path for route in app.routes}
    exported = set(re.findall(r"^# TYPE (\S+)", tiny_server.http().get("/metrics").text, re.M))
    exported |= {f"{name}_total" for name in exported}
    for path, doc in documents():
        variant = {d["kind"]: d for p, d in documents() if p.parent == path.parent}
        if doc["kind"] in ("Deployment", "LeaderWorkerSet"):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]
                assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            else:  # the leader serves HTTP
                pod = doc["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
            (container,) = pod["spec"]["containers"]
            args = build_parser().parse_args(server_arguments(container))  # every argument is a flag the CLI accepts
            assert (ROOT / args.config).is_file(), args.config
            port = container["ports"][0]
            assert port["containerPort"] == args.port == 8000  # and the Dockerfile's EXPOSE
            assert "EXPOSE 8000" in (ROOT / "Dockerfile").read_text()
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
            assert pod["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"][
                "readOnlyRootFilesystem"]
            assert "/data" in {m["mountPath"] for m in container["volumeMounts"]}  # the image's HF_HOME and cache
            assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes
        if doc["kind"] == "Service" and "Deployment" in variant:
            assert doc["spec"]["selector"] == variant["Deployment"]["spec"]["selector"]["matchLabels"]
        if doc["kind"] == "Service" and "LeaderWorkerSet" in variant:  # the leaders alone
            leader = variant["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
            assert doc["spec"]["selector"].items() <= leader["metadata"]["labels"].items()
            assert doc["spec"]["selector"]["role"] == "leader"
        if doc["kind"] == "ScaledObject":
            assert doc["spec"]["scaleTargetRef"]["name"] == variant["Deployment"]["metadata"]["name"]
            query = doc["spec"]["triggers"][0]["metadata"]["query"]
            names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))
            assert names and names <= exported, names
            served = re.search(r'model_name="([^"]+)"', query).group(1)
            config = yaml.safe_load((ROOT / build_parser().parse_args(
                variant["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]).config).read_text())
            assert served == config.get("served_model_name", "SmolLM2-135M-Instruct")
        if doc["kind"] == "HorizontalPodAutoscaler":
            assert doc["spec"]["metrics"][0]["pods"]["metric"]["name"] in exported
        if doc["kind"] == "InferencePool":
            assert doc["spec"]["selector"]["matchLabels"] == variant["Deployment"]["spec"]["selector"]["matchLabels"]
            assert doc["spec"]["targetPorts"][0]["number"] == 8000

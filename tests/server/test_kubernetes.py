"""deploy/kubernetes: the manifests parse, the built-in kinds validate against Kubernetes' own schemas
(`kubernetes-validate`), the custom resources use only their projects' published fields, and everything they say
about the server agrees with the code: probe paths and ports, the metric the autoscalers read, the arguments."""

from __future__ import annotations

import re
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
ENDPOINT_PICKER_REF = {"group", "kind", "name", "port", "failureMode"}


def documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_there_is_a_cpu_and_a_gpu_variant_with_every_piece():
    kinds = {}
    for path, doc in documents():
        kinds.setdefault(path.parent.name, set()).add(doc["kind"])
    expected = {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "ScaledObject",
                "HorizontalPodAutoscaler", "InferencePool"}
    assert kinds == {"cpu": expected, "gpu": expected}


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
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
            (container,) = pod["spec"]["containers"]
            args = build_parser().parse_args(container["args"])  # every argument is a flag the CLI accepts
            assert (ROOT / args.config).is_file(), args.config
            (port,) = container["ports"]
            assert port["containerPort"] == args.port == 8000  # and the Dockerfile's EXPOSE
            assert "EXPOSE 8000" in (ROOT / "Dockerfile").read_text()
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
            assert pod["spec"]["securityContext"]["runAsNonRoot"] and container["securityContext"][
                "readOnlyRootFilesystem"]
            assert "/data" in {m["mountPath"] for m in container["volumeMounts"]}  # the image's HF_HOME and cache
            assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"] == variant["Deployment"]["spec"]["selector"]["matchLabels"]
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

"""The Helm chart (deploy/helm/rtinfer), checked without a cluster (issue 21, section 5).

Real parts only: Helm itself (the helm-python-sdk wheel embeds Helm's Go SDK) lints and renders the
chart for each values file; every rendered object is validated by kubernetes-validate --strict
against the Kubernetes API schemas of KUBE_VERSION (unknown fields fail: a test shows a typo does);
the KServe objects against KServe's own CRD schemas in ../shared/kserve-crds/ with jsonschema, made
strict the way the API server prunes (unknown fields fail where the CRD does not preserve them);
the gateway configuration the chart renders is checked by the real HAProxy (haproxy -c), the Redis
configuration by a real redis-server with the stages' own client, and the two scripts the pods run
(key_sync.py, prepare_repository.py) by running them. And the chart must agree with the rest of
the project: Triton's arguments with rtinfer/launch/server.py, the models with model_repository/, the
gateway files with deploy/gateway/ byte for byte, the environment with rtinfer/stage_config.py.

What cannot be checked here (no cluster): that pods schedule, pull, start and pass their probes,
that the network plugin enforces the NetworkPolicies, that prometheus-adapter serves the metric,
that KServe's controller accepts the InferenceService. docs/kubernetes.md says so too.
"""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate.utils as kv
import pytest
import yaml

from rtinfer import access, audit, checkpoint, internal_key, keyring, stage_config
from rtinfer.launch.gateway import haproxy_binary
from rtinfer.launch.server import TritonServer, model_params, repository_with, with_targets

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "rtinfer"
REPO = ROOT / "model_repository"
GATEWAY_DIR = ROOT / "deploy" / "gateway"
# The tests run from a clone at <somewhere>/main with shared/ beside it (CI has it).
KSERVE_CRDS = ROOT.parent / "shared" / "kserve-crds"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion), and the newest schemas here.
KUBE_VERSIONS = ("1.29", "1.37")
RELEASE, NAMESPACE = "rtinfer", "serving"
TRITON = f"{RELEASE}-triton"
VALUES_FILES = ("values.yaml", "values-gpu.yaml", "values-kserve.yaml")
KSERVE_KINDS = {"InferenceService", "ServingRuntime"}


# ---------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def values_of(name: str) -> dict:
    """A values file as `helm -f` gives it (values.yaml itself: no overrides)."""
    return {} if name == "values.yaml" else yaml.safe_load((CHART / name).read_text())


def render(chart, values: dict) -> list[dict]:
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    assert any(path.endswith("/NOTES.txt") and text.strip() for path, text in manifests.items())
    for path, text in sorted(manifests.items()):
        if path.endswith("/NOTES.txt"):  # printed after install, not applied (helm template leaves it out)
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return objects


def merged(chart, values: dict) -> dict:
    return chart.merge_values(values)


def one(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


@pytest.fixture(scope="module")
def rendered(chart):
    return {name: render(chart, values_of(name)) for name in VALUES_FILES}


def pod_spec(obj) -> dict:
    return obj["spec"]["template"]["spec"]


def container(spec, name):
    found = [c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def env_of(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------- Helm lint

@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_helm_lint_is_clean(values_name):
    """helm lint --strict (warnings are errors) with the oldest supported Kubernetes."""
    report = helm_python.lint(CHART, values_of(values_name), strict=True, kube_version=f"v{KUBE_VERSIONS[0]}.0",
                              namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems


def test_helm_lint_reports_a_broken_template(tmp_path):
    """The lint above can fail: the same chart with one template broken is an error."""
    broken = tmp_path / "rtinfer"
    subprocess.run(["cp", "-rL", str(CHART), str(broken)], check=True)
    path = broken / "templates" / "pdb.yaml"
    path.write_text(path.read_text().replace("{{- end }}\n", "", 1))
    report = helm_python.lint(broken, {}, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}.0")
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"]), report


# ---------------------------------------------------------------- Kubernetes schemas

def validate_k8s(obj: dict, version: str) -> None:
    """kubernetes-validate --strict for one object; a kind without a schema is a failure, not a warning."""
    kv.validate(obj, version, strict=True)


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_every_object_validates_strictly(rendered, values_name):
    objects = rendered[values_name]
    core = [o for o in objects if o["kind"] not in KSERVE_KINDS]
    for version in KUBE_VERSIONS:
        for obj in core:
            try:
                validate_k8s(obj, version)
            except kv.ValidationError as exc:
                pytest.fail(f"{values_name}: {obj['kind']}/{obj['metadata'].get('name')} against {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{values_name}: {exc.message}")
    kinds = sorted(o["kind"] for o in objects)
    print(f"{values_name}: {len(core)} objects validated strictly against Kubernetes {', '.join(KUBE_VERSIONS)}, "
          f"{len(objects) - len(core)} KServe objects against the CRDs: {kinds}")
    if values_name == "values-kserve.yaml":
        assert {o["kind"] for o in objects} >= KSERVE_KINDS | {"ConfigMap", "NetworkPolicy", "ServiceAccount"}
        assert not {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"} & {o["kind"] for o in objects}
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "StatefulSet"] == [f"{RELEASE}-redis"]
    else:
        assert {o["kind"] for o in objects} >= {
            "StatefulSet", "Service", "Deployment", "ConfigMap", "NetworkPolicy", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ServiceAccount"}
        assert not KSERVE_KINDS & {o["kind"] for o in objects}


@pytest.mark.parametrize("where, typo", [
    (("spec", "template", "spec"), ("containers", "contaners")),
    (("spec", "template", "spec", "containers", 0), ("readinessProbe", "readinesProbe")),
    (("spec", "volumeClaimTemplates", 0, "spec"), ("accessModes", "accesModes")),
    (("spec",), ("serviceName", "servicename")),
])
def test_a_typo_fails_validation(rendered, where, typo):
    """Unknown fields are errors (the strict schemas), wherever they are."""
    sts = copy.deepcopy(one(rendered["values.yaml"], "StatefulSet", TRITON))
    validate_k8s(sts, KUBE_VERSIONS[0])  # as rendered: valid
    node = sts
    for key in where:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    with pytest.raises(kv.ValidationError) as info:
        validate_k8s(sts, KUBE_VERSIONS[0])
    assert wrong in str(info.value.message) or wrong in str(info.value), info.value


def test_an_unknown_kind_is_not_waved_through(rendered):
    obj = copy.deepcopy(one(rendered["values.yaml"], "HorizontalPodAutoscaler"))
    obj["kind"] = "HorizontalPodAutoscalr"
    with pytest.raises(kv.SchemaNotFoundError):
        validate_k8s(obj, KUBE_VERSIONS[0])


# ---------------------------------------------------------------- KServe CRDs

def strict_crd_schema(schema):
    """The CRD's structural schema, strict: the API server drops (or, with strict field validation,
    refuses) fields a schema does not declare unless it says x-kubernetes-preserve-unknown-fields;
    here they are errors."""
    if isinstance(schema, dict):
        out = {k: strict_crd_schema(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_crd_schema(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def kserve_schemas():
    if not KSERVE_CRDS.is_dir():
        pytest.fail(f"KServe CRDs not found at {KSERVE_CRDS} (the tests expect shared/ beside the checkout; "
                    "its kserve-crds/README.md says where they come from)")
    schemas = {}
    for path in sorted(KSERVE_CRDS.glob("serving.kserve.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # libyaml: 2 MB of YAML
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api = f"{crd['spec']['group']}/{version['name']}"
                schemas[(kind, api)] = strict_crd_schema(version["schema"]["openAPIV3Schema"])
    assert {k for k, _ in schemas} >= KSERVE_KINDS, schemas.keys()
    return schemas


def validate_kserve(obj, schemas):
    key = (obj["kind"], obj["apiVersion"])
    assert key in schemas, f"{key} is not a served version of KServe's CRDs ({sorted(schemas)})"
    jsonschema.Draft7Validator(schemas[key]).validate(obj)


def test_kserve_objects_validate_against_the_crds(rendered, kserve_schemas):
    objects = [o for o in rendered["values-kserve.yaml"] if o["kind"] in KSERVE_KINDS]
    assert sorted(o["kind"] for o in objects) == sorted(KSERVE_KINDS)
    for obj in objects:
        validate_kserve(obj, kserve_schemas)
        # the CRD schema leaves metadata open: check it as Kubernetes' ObjectMeta
        validate_k8s({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBE_VERSIONS[0])


@pytest.mark.parametrize("path, typo", [
    (("spec", "predictor"), ("model", "modle")),
    (("spec", "predictor", "initContainers", 0), ("volumeMounts", "volumeMount")),
    (("spec", "transformer", "containers", 0), ("readinessProbe", "readynessProbe")),
])
def test_a_kserve_typo_fails(rendered, kserve_schemas, path, typo):
    isvc = copy.deepcopy(one(rendered["values-kserve.yaml"], "InferenceService"))
    node = isvc
    for key in path:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    with pytest.raises(jsonschema.ValidationError, match=typo[1]):
        validate_kserve(isvc, kserve_schemas)


def test_kserve_runtime_matches_the_statefulset(rendered):
    """The same Triton in both variants: arguments (but the ports), environment, init containers."""
    sts_spec = pod_spec(one(rendered["values.yaml"], "StatefulSet", TRITON))
    runtime = one(rendered["values-kserve.yaml"], "ServingRuntime")["spec"]["containers"][0]
    isvc = one(rendered["values-kserve.yaml"], "InferenceService")["spec"]
    strip = lambda args: [a for a in args if not re.match(r"--(http|grpc|metrics)-port=", a)]
    assert strip(runtime["args"]) == strip(container(sts_spec, "triton")["args"])
    serving_runtime = one(rendered["values-kserve.yaml"], "ServingRuntime")
    assert isvc["predictor"]["model"]["runtime"] == serving_runtime["metadata"]["name"]
    assert [c["name"] for c in isvc["predictor"]["initContainers"]] == [c["name"] for c in sts_spec["initContainers"]]
    sts_env = env_of(container(sts_spec, "triton"))
    kserve_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in isvc["predictor"]["model"]["env"]}
    assert set(kserve_env) == set(sts_env) - {"RTINFER_FLEET_REPLICAS"}
    assert "--http-port=8080" in runtime["args"]
    assert runtime["ports"][0]["containerPort"] == 8080


# ---------------------------------------------------------------- the gateway

def gateway_parts(objects, kserve=False):
    if kserve:
        spec = one(objects, "InferenceService")["spec"]["transformer"]
        cont = spec["containers"][0]
    else:
        spec = pod_spec(one(objects, "Deployment"))
        cont = container(spec, "gateway")
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
    return cont, one(objects, "ConfigMap", cm_name)["data"]


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_gateway_files_are_deploy_gateway_byte_for_byte(rendered, values_name):
    _, data = gateway_parts(rendered[values_name], kserve="kserve" in values_name)
    shipped = sorted(p.name for p in GATEWAY_DIR.iterdir() if p.suffix in (".cfg", ".lua"))
    assert sorted(set(data) - {"kubernetes.cfg"}) == shipped
    for name in shipped:
        assert data[name].encode() == (GATEWAY_DIR / name).read_bytes(), name
        # the chart's files are symlinks into deploy/gateway: a copy that could drift is not allowed
        link = CHART / "files" / "gateway" / name
        assert link.is_symlink() and link.resolve() == (GATEWAY_DIR / name).resolve(), link
    assert data["kubernetes.cfg"].endswith("\n")


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_haproxy_accepts_the_rendered_gateway(rendered, values_name, tmp_path):
    """The real HAProxy (the one make test installs) checks haproxy.cfg + kubernetes.cfg with the
    pod's environment: every backend the frontends use exists, every keyword is known."""
    cont, data = gateway_parts(rendered[values_name], kserve="kserve" in values_name)
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in env_of(cont).items() if isinstance(v, str)}
    referenced = set(re.findall(r"\$\{(GW_[A-Z_]+)\}", data["haproxy.cfg"]))
    assert set(env) <= referenced, set(env) - referenced  # no variable haproxy.cfg does not read
    assert {"GW_DIR", "GW_MODEL", "GW_HTTP_BIND", "GW_GRPC_BIND", "GW_METRICS_BIND"} <= set(env)
    env.update(GW_DIR=str(tmp_path), GW_STATS_SOCKET=str(tmp_path / "admin.sock"))
    shell = cont["command"]
    assert shell[:2] == ["/bin/sh", "-c"]
    argv = shell[2].replace("exec ", "", 1).replace("/etc/rtinfer/gateway", str(tmp_path)).split()
    assert argv[0] == "haproxy" and "-db" in argv
    result = subprocess.run([haproxy_binary(), "-c", *argv[1:]], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALERT" not in result.stdout + result.stderr
    # and a broken second file is refused (the check above can fail)
    (tmp_path / "kubernetes.cfg").write_text(data["kubernetes.cfg"].replace("backend triton_grpc",
                                                                            "backend triton_grcp"))
    broken = subprocess.run([haproxy_binary(), "-c", *argv[1:]], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0


@pytest.mark.parametrize("values_name", ["values.yaml", "values-gpu.yaml"])
def test_gateway_routes_to_every_triton_pod(chart, rendered, values_name):
    objects = rendered[values_name]
    values = merged(chart, values_of(values_name))
    cont, data = gateway_parts(objects)
    cfg = data["kubernetes.cfg"]
    headless = one(objects, "Service", f"{RELEASE}-triton")
    assert headless["spec"]["clusterIP"] == "None"
    sts = one(objects, "StatefulSet", TRITON)
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    host = f"{headless['metadata']['name']}.{NAMESPACE}.svc.{values['clusterDomain']}"
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    slots = max(values["autoscaling"]["maxReplicas"], values["triton"]["replicas"])
    assert f"server-template triton {slots} {host}:{ports['http']} check" in cfg
    assert re.search(rf"server-template triton {slots} {re.escape(host)}:{ports['grpc']} proto h2 check "
                     rf"port {ports['http']} check-proto h1", cfg)
    assert cfg.count("from replicas") == 2  # haproxy.cfg's policy: leastconn, retry-on conn-failure, health checks
    for name in ("triton_http", "triton_grpc", "triton_metrics"):
        assert f"default_backend {name}" in data["haproxy.cfg"] and f"backend {name}" in cfg
    # the exposed models: loaded, in the repository, and what GW_MODEL says
    exposed = env_of(cont)["GW_MODEL"].split(",")
    assert exposed == values["gateway"]["models"]
    assert set(exposed) <= set(values["triton"]["loadModels"])
    for model in exposed:
        assert (REPO / model / "config.pbtxt").exists(), model


# ---------------------------------------------------------------- Triton

@pytest.mark.parametrize("values_name", ["values.yaml", "values-gpu.yaml"])
def test_triton_arguments_agree_with_server_py(chart, rendered, values_name, tmp_path):
    """The arguments rtinfer/launch/server.py gives tritonserver for the same models and config name, but
    its host-specific paths and addresses (and the NGC image's own backends)."""
    values = merged(chart, values_of(values_name))
    spec = pod_spec(one(rendered[values_name], "StatefulSet", TRITON))
    triton = container(spec, "triton")
    config_name = values["triton"]["modelConfigName"] or None
    assert config_name == ("cpu" if values_name == "values.yaml" else None)
    server = TritonServer(REPO, models=values["gateway"]["models"], config_name=config_name, workdir=tmp_path)
    host_specific = re.compile(
        r"--(model-repository|backend-directory|cache-directory|(http|grpc|metrics)-(address|port))=")
    expected = [a for a in server.command()[1:] if not host_specific.match(a)]
    chart_args = [a for a in triton["args"] if not host_specific.match(a)]
    assert chart_args == expected
    assert triton["command"] == ["tritonserver"]
    assert "--model-control-mode=explicit" in chart_args
    # every model loaded (exposed pipelines + BLS targets) exists, with the config this host reads
    assert values["triton"]["loadModels"] == with_targets(values["gateway"]["models"], REPO, config_name)
    for model in values["triton"]["loadModels"]:
        assert (REPO / model / "config.pbtxt").exists()
    # the model repository Triton serves is the one the init container prepares
    assert "--model-repository=/run/rtinfer/model_repository" in triton["args"]
    prepare = container(spec, "prepare-repository")
    assert prepare["command"][3] == "/run/rtinfer/model_repository"
    assert prepare["command"][2] == values["triton"]["modelRepository"]["imagePath"]
    # GPU only where asked
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if values_name == "values-gpu.yaml" else None)


def test_restricted_api_arguments_are_access_py(chart):
    values = {"secrets": {"apiKey": {"secretName": "k"}, "apiKeyDigests": {"secretName": "d"},
                          "adminKey": {"secretName": "a"}}}
    sts = one(render(chart, values), "StatefulSet", TRITON)
    triton = container(pod_spec(sts), "triton")
    restricted = [a for a in triton["args"] if "restricted" in a]
    expected = access.server_args("APIKEY", "ADMINKEY")
    assert [a.replace("$(RTINFER_API_KEY)", "APIKEY").replace("$(RTINFER_ADMIN_KEY)", "ADMINKEY")
            for a in restricted] == expected
    env = env_of(triton)
    assert env["RTINFER_API_KEY"] == {"secretKeyRef": {"name": "k", "key": "api-key"}}
    assert env["RTINFER_ADMIN_KEY"] == {"secretKeyRef": {"name": "a", "key": "admin-key"}}
    gw = env_of(container(pod_spec(one(render(chart, values), "Deployment")), "gateway"))
    assert gw["GW_API_KEYS"].startswith("/run/rtinfer/gateway-api-keys/")


@pytest.mark.parametrize("values_name", ["values.yaml", "values-gpu.yaml"])
def test_ports_probes_and_network_policy_agree(chart, rendered, values_name):
    objects = rendered[values_name]
    values = merged(chart, values_of(values_name))
    spec = pod_spec(one(objects, "StatefulSet", TRITON))
    triton = container(spec, "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == values["triton"]["ports"]
    for flag in ("http", "grpc", "metrics"):
        assert f"--{flag}-port={ports[flag]}" in triton["args"]
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": ports["http"]}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": ports["http"]}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": ports["http"]}
    # the metrics port is in no Service: scraped from the pods
    for svc in (o for o in objects if o["kind"] == "Service"):
        assert all(p.get("targetPort") != "metrics" and p["port"] != ports["metrics"]
                   for p in svc["spec"]["ports"]), svc
    gateway_svc = one(objects, "Service", f"{RELEASE}-gateway")
    assert {p["targetPort"] for p in gateway_svc["spec"]["ports"]} == {"http", "grpc"}
    # NetworkPolicy: Triton's HTTP/gRPC from the gateway pods only, metrics from Prometheus only
    np = one(objects, "NetworkPolicy", f"{RELEASE}-triton")["spec"]
    assert np["podSelector"]["matchLabels"] == one(objects, "StatefulSet", TRITON)["spec"]["selector"]["matchLabels"]
    gateway_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    rules = {tuple(sorted(p["port"] for p in r["ports"])): r["from"] for r in np["ingress"]}
    assert set(rules) == {tuple(sorted((ports["http"], ports["grpc"]))), (ports["metrics"],)}
    (peer,) = rules[tuple(sorted((ports["http"], ports["grpc"])))]
    assert set(peer) == {"podSelector"}
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    (prom,) = rules[(ports["metrics"],)]
    assert prom == {"namespaceSelector": values["metrics"]["prometheus"]["namespaceSelector"],
                    "podSelector": values["metrics"]["prometheus"]["podSelector"]}
    redis_np = one(objects, "NetworkPolicy", f"{RELEASE}-redis")["spec"]
    assert redis_np["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == np["podSelector"]["matchLabels"]


@pytest.mark.parametrize("values_name", ["values.yaml", "values-gpu.yaml"])
def test_audit_on_per_pod_volumes_and_keys_from_secrets(chart, rendered, values_name):
    objects = rendered[values_name]
    values = merged(chart, values_of(values_name))
    sts = one(objects, "StatefulSet", TRITON)
    spec = pod_spec(sts)
    assert not [o for o in objects if o["kind"] == "Secret"]  # no key material in the chart
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "audit"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert not [v for v in spec["volumes"] if v["name"] == "audit"]  # from the claim template, not an emptyDir
    triton = container(spec, "triton")
    env = env_of(triton)
    mounts = {m["name"]: m for m in triton["volumeMounts"]}
    assert env["RTINFER_AUDIT_DIR"] == f"{mounts['audit']['mountPath']}/$(POD_NAME)"
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env[stage_config.ENV_REPLICA] == "$(POD_NAME)"
    # the names the stages read (one place: rtinfer/)
    assert env[keyring.ENV_VAR] == "/run/rtinfer/keys/keyring.json"
    assert env[internal_key.ENV_VAR] == "/run/rtinfer/keys/server-internal.key"
    assert env[checkpoint.ENV_VAR] == "/run/rtinfer/keys/audit-signing.pem"
    assert audit.ENV_DIR == "RTINFER_AUDIT_DIR"
    assert env[stage_config.ENV_REDIS_PASSWORD] == "/run/rtinfer/keys/redis-password"
    assert env[stage_config.ENV_REPLAY_STORE] == f"redis://rtinfer@{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    assert mounts["keys"]["readOnly"] is True
    # the Secrets: mounted read-only with defaultMode 0400, copied by key-sync into the key volume
    secret_volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    assert {s["secretName"] for s in secret_volumes.values()} == {
        "rtinfer-keyring", "rtinfer-internal-key", "rtinfer-audit-signing-key", "rtinfer-redis"}
    assert all(s["defaultMode"] == 0o400 for s in secret_volumes.values())
    sync = container(spec, "key-sync")
    assert sync["restartPolicy"] == "Always"  # a native sidecar: keeps copying rotated Secrets
    targets = {arg.rsplit("=", 1)[1] for arg in sync["command"] if "=" in arg and not arg.startswith("--")}
    assert {Path(p).name for p in env.values() if isinstance(p, str) and p.startswith("/run/rtinfer/keys/")} == targets
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    # per-pod SQLite would end replay protection at one pod: the stages get the shared store
    for model in values["triton"]["loadModels"] + ["preprocess", "postprocess"]:
        params = model_params(REPO, model, values["triton"]["modelConfigName"] or None)
        assert params.get("replay_store", "") == "", \
            f"{model} sets replay_store: the pod's RTINFER_REPLAY_STORE would be ignored"


def test_fleet_replica_ids_only_for_a_fixed_count(chart):
    fixed = one(render(chart, {"autoscaling": {"enabled": False}, "triton": {"replicas": 3}}), "StatefulSet", TRITON)
    assert fixed["spec"]["replicas"] == 3
    env = env_of(container(pod_spec(fixed), "triton"))
    assert env[stage_config.ENV_FLEET] == f"{RELEASE}-triton-0,{RELEASE}-triton-1,{RELEASE}-triton-2"
    scaled = one(render(chart, {}), "StatefulSet", TRITON)
    assert "replicas" not in scaled["spec"]  # the HPA owns it
    assert stage_config.ENV_FLEET not in env_of(container(pod_spec(scaled), "triton"))


@pytest.mark.parametrize("values, message", [
    ({"redis": {"enabled": False}}, "shared replay store"),
    ({"redis": {"enabled": False}, "autoscaling": {"enabled": False}, "triton": {"replicas": 2}},
     "shared replay store"),
    ({"gateway": {"models": ["pipeline", "cascade"]}}, "triton.loadModels does not load"),
    ({"triton": {"modelRepository": {"source": "volume"}}}, "claimName"),
    ({"secrets": {"apiKey": {"secretName": "k"}}}, "apiKeyDigests"),
    ({"replayStore": {"url": "redis://u@r:6379/0"}}, "choose the in-chart Redis or an external one"),
    ({"kserve": {"enabled": True}}, "auditClaimName"),
])
def test_unsafe_values_are_refused(chart, values, message):
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(chart, values)


def test_one_pod_may_keep_sqlite(chart):
    objects = render(chart, {"redis": {"enabled": False}, "autoscaling": {"enabled": False}, "triton": {"replicas": 1}})
    env = env_of(container(pod_spec(one(objects, "StatefulSet", TRITON)), "triton"))
    assert stage_config.ENV_REPLAY_STORE not in env
    assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")]


def test_external_redis(chart):
    url = "rediss://rtinfer@redis.example.internal:6380/0"
    objects = render(chart, {"redis": {"enabled": False}, "replayStore": {
        "url": url, "passwordSecret": {"name": "ext-redis"}, "caSecret": {"name": "ext-ca"}}})
    env = env_of(container(pod_spec(one(objects, "StatefulSet", TRITON)), "triton"))
    assert env[stage_config.ENV_REPLAY_STORE] == url
    assert env[stage_config.ENV_REDIS_CA] == "/run/rtinfer/redis-ca/ca.crt"
    for obj in objects:
        validate_k8s(obj, KUBE_VERSIONS[0])


# ---------------------------------------------------------------- autoscaling

def pipeline_steps(config_name):
    path = REPO / "pipeline" / "configs" / f"{config_name}.pbtxt" if config_name else REPO / "pipeline" / "config.pbtxt"
    return re.findall(r'model_name: "([^"]+)"', path.read_text())


@pytest.mark.parametrize("values_name", ["values.yaml", "values-gpu.yaml"])
def test_hpa_scales_on_queue_time_per_request(chart, rendered, values_name):
    objects = rendered[values_name]
    values = merged(chart, values_of(values_name))
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    sts = one(objects, "StatefulSet", TRITON)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": sts["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(one(objects, "ConfigMap", f"{RELEASE}-prometheus-adapter-rules")["data"]["config.yaml"])
    (rule,) = rules["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>" in query
    assert "nv_inference_request_success{<<.LabelMatchers>>" in query
    # the queue times summed are those of the steps of the pipeline this host loads
    steps = pipeline_steps(values["triton"]["modelConfigName"] or None)
    assert values["autoscaling"]["queueModels"] == steps
    assert f'model=~"{"|".join(steps)}"' in query
    assert f'model="{values["autoscaling"]["requestModel"]}"' in query
    pdb = one(objects, "PodDisruptionBudget", sts["metadata"]["name"])
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]


# ---------------------------------------------------------------- Redis

def test_redis_acl_is_redis_server_py(chart, rendered):
    from rtinfer.launch import redis_server
    values = merged(chart, {})
    assert values["redis"]["aclRules"] == redis_server.ACL_RULES
    cm = one(rendered["values.yaml"], "ConfigMap", f"{RELEASE}-redis")["data"]
    assert cm["redis.conf"].encode() == (ROOT / "deploy" / "redis" / "redis.conf").read_bytes()
    assert "user default off resetchannels -@all" in cm["start.sh"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_as_rendered_with_the_stages_client(rendered, tmp_path):
    """The pod's start script, redis.conf and kubernetes.conf run by the real redis-server (paths and
    the listener moved to this machine's loopback); the stages' client logs in with the password file
    and may admit nonces, and nothing more."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from rtinfer import replay_redis
    from rtinfer.launch import redis_server
    cm = one(rendered["values.yaml"], "ConfigMap", f"{RELEASE}-redis")["data"]
    port = free_port()
    dirs = {name: tmp_path / name for name in ("etc", "secret", "run", "data")}
    for d in dirs.values():
        d.mkdir()
    moved = lambda text: (text.replace("/etc/redis/rtinfer/", f"{dirs['etc']}/")
                          .replace("/run/secrets/redis/", f"{dirs['secret']}/")
                          .replace("/run/redis/", f"{dirs['run']}/").replace("dir /data", f"dir {dirs['data']}")
                          .replace("bind 0.0.0.0", "bind 127.0.0.1").replace("port 6379", f"port {port}")
                          .replace("-p 6379", f"-p {port}"))
    for name, text in cm.items():
        (dirs["etc"] / name).write_text(moved(text))
    password = "s3cret-pass"
    (dirs["secret"] / "password").write_text(password + "\n")  # a trailing newline, as kubectl --from-file keeps it
    env = {**os.environ, "PATH": f"{Path(redis_server.redis_binary()).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["sh", str(dirs["etc"] / "start.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["sh", str(dirs["etc"] / "ping.sh")], env=env).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "redis did not answer the probe"
            time.sleep(0.1)
        pw_file = tmp_path / "redis-password"
        pw_file.write_text(password)
        pw_file.chmod(0o600)
        url = f"redis://rtinfer@127.0.0.1:{port}/0"
        _, kwargs = replay_redis.client_options(url, password_file=pw_file)
        client = redis.Redis(**kwargs)
        assert client.set("rtinfer:test:nonce", 1, nx=True, px=60000) is True
        assert client.set("rtinfer:test:nonce", 1, nx=True, px=60000) is None  # a replay
        for forbidden in (lambda: client.set("other", 1), lambda: client.config_get("appendfsync"),
                          lambda: client.flushall(), lambda: client.keys("*"),
                          lambda: client.get("rtinfer:test:nonce")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        once = dict(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(password=password, **once).ping()  # the default user is off
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(username="rtinfer", password="wrong", **once).ping()
        assert list((dirs["data"] / "appendonlydir").glob("appendonly.aof.*"))  # AOF on, in the volume
        assert (dirs["run"] / "users.acl").stat().st_mode & 0o077 == 0
        assert password not in (dirs["run"] / "users.acl").read_text()
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- the pods' scripts

SCRIPTS = CHART / "files" / "scripts"


def test_key_sync_makes_0600_copies_and_follows_rotation(tmp_path):
    src, dst = tmp_path / "secret", tmp_path / "keys"
    src.mkdir()
    path = src / "keyring.json"
    subprocess.run([sys.executable, "-m", "rtinfer.keyring", "init", str(tmp_path / "ring.json")], check=True,
                   cwd=ROOT, capture_output=True)
    path.write_bytes((tmp_path / "ring.json").read_bytes())
    path.chmod(0o440)  # what a Secret volume with an fsGroup looks like
    with pytest.raises(Exception, match="readable by group"):
        keyring.read_private(path, "keyring file")
    cmd = [sys.executable, str(SCRIPTS / "key_sync.py"), f"--dst={dst}", "--once", f"{path}=keyring.json"]
    subprocess.run(cmd, check=True, capture_output=True)
    copy_ = dst / "keyring.json"
    assert stat.S_IMODE(copy_.stat().st_mode) == 0o600 and (dst / ".ready").exists()
    assert keyring.read_private(copy_, "keyring file") == path.read_bytes()
    keyring.Keyring.load(copy_)  # the stages' loader takes it
    inode = copy_.stat().st_ino
    subprocess.run(cmd, check=True, capture_output=True)
    assert copy_.stat().st_ino == inode  # unchanged: not rewritten
    path.chmod(0o640)
    subprocess.run([sys.executable, "-m", "rtinfer.keyring", "rotate", str(tmp_path / "ring.json")], check=True,
                   cwd=ROOT, capture_output=True)
    path.write_bytes((tmp_path / "ring.json").read_bytes())
    subprocess.run(cmd, check=True, capture_output=True)
    assert copy_.read_bytes() == path.read_bytes() and copy_.stat().st_ino != inode  # renamed into place
    # a missing Secret file: no .ready in a fresh directory, exit status 1
    result = subprocess.run([sys.executable, str(SCRIPTS / "key_sync.py"), f"--dst={tmp_path / 'other'}", "--once",
                             f"{src / 'absent'}=x"], capture_output=True, text=True)
    assert result.returncode == 1 and not (tmp_path / "other" / ".ready").exists()


def test_prepare_repository_is_repository_with(tmp_path):
    params = {"postprocess": {"audit_fsync": "batch"}, "preprocess": {"metrics_max_clients": "5"}}
    dst = tmp_path / "served"
    result = subprocess.run([sys.executable, str(SCRIPTS / "prepare_repository.py"), str(REPO), str(dst),
                             json.dumps(params)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reference = repository_with(tmp_path / "reference", params)
    for model in sorted(p.name for p in REPO.iterdir() if p.is_dir()):
        served = dst / model
        if model in params:
            assert not served.is_symlink()
            configs = ["config.pbtxt"] + [f"configs/{p.name}" for p in (REPO / model / "configs").glob("*.pbtxt")]
            for cfg in configs:
                assert (served / cfg).read_text() == (reference / model / cfg).read_text(), cfg
                assert (served / cfg).read_text() != (REPO / model / cfg).read_text(), cfg
            assert (served / "1").resolve() == (REPO / model / "1").resolve()
        else:
            assert served.is_symlink() and served.resolve() == (REPO / model).resolve()
    # rerun on the same directory (a restarted pod): the same result
    assert subprocess.run([sys.executable, str(SCRIPTS / "prepare_repository.py"), str(REPO), str(dst),
                           json.dumps(params)], capture_output=True).returncode == 0
    # refused: a parameter the config does not have, a model the repository does not have, a quote
    for bad in ({"postprocess": {"no_such_parameter": "1"}}, {"no_such_model": {"a": "b"}},
                {"postprocess": {"audit_fsync": 'x" } }'}}):
        result = subprocess.run([sys.executable, str(SCRIPTS / "prepare_repository.py"), str(REPO),
                                 str(tmp_path / "bad"), json.dumps(bad)], capture_output=True, text=True)
        assert result.returncode == 1 and "prepare_repository:" in result.stderr, bad


def test_chart_versions():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert meta["appVersion"] == project
    assert meta["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"
    assert helm_python.helm_sdk_version().startswith("v")


def test_every_option_renders_valid_objects(chart):
    """The options the values files leave off: TLS and mutual TLS at the gateway, the inference and
    admin keys, a rate limit, a model repository volume, model parameters, no autoscaling."""
    values = {"gateway": {"tls": {"secretName": "gw-tls", "clientCaSecretName": "gw-ca"}, "rateLimit": 50,
                          "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]}},
              "secrets": {"apiKey": {"secretName": "k"}, "apiKeyDigests": {"secretName": "d"},
                          "adminKey": {"secretName": "a"}, "auditSigningKey": {"secretName": ""}},
              "triton": {"modelRepository": {"source": "volume", "claimName": "models"},
                         "modelParameters": {"postprocess": {"audit_fsync": "batch"}}},
              "autoscaling": {"enabled": False},
              "networkPolicy": {"gatewayFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}
    objects = render(chart, values)
    for obj in objects:
        validate_k8s(obj, KUBE_VERSIONS[0])
    gw = container(pod_spec(one(objects, "Deployment")), "gateway")
    env = env_of(gw)
    assert env["GW_TLS_PEM"] == "/run/rtinfer/gateway-tls/server.pem" and env["GW_RATE_LIMIT"] == "50"
    assert "tcpSocket" in gw["readinessProbe"]  # the kubelet has no client certificate
    spec = pod_spec(one(objects, "StatefulSet", TRITON))
    assert "RTINFER_AUDIT_SIGNING_KEY" not in env_of(container(spec, "triton"))
    prepare = container(spec, "prepare-repository")
    assert json.loads(prepare["command"][4]) == {"postprocess": {"audit_fsync": "batch"}}
    source = {"name": "model-source", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert source in spec["volumes"]
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]


class _StubDNS:
    """A DNS server on loopback that answers every A query with 127.0.0.1 (the 'pods'), and every
    other query with no answer: what the headless Service's DNS gives the gateway, on this machine."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.names: list[str] = []
        self.running = True
        import threading
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                query, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            labels, i = [], 12
            while query[i]:
                labels.append(query[i + 1:i + 1 + query[i]].decode())
                i += 1 + query[i]
            qtype = int.from_bytes(query[i + 1:i + 3], "big")
            question = query[12:i + 5]
            self.names.append(".".join(labels))
            answer = (b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big") + (5).to_bytes(4, "big")
                      + (4).to_bytes(2, "big") + socket.inet_aton("127.0.0.1")) if qtype == 1 else b""
            header = (query[:2] + b"\x81\x80" + b"\x00\x01" + (b"\x00\x01" if answer else b"\x00\x00")
                      + b"\x00\x00\x00\x00")
            self.sock.sendto(header + question + answer, peer)

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def test_the_rendered_gateway_finds_pods_by_dns_and_routes_only_the_pipeline(chart, tmp_path):
    """The rendered gateway (haproxy.cfg + kubernetes.cfg) under the real HAProxy: it resolves the
    headless Service's name (here from a stub DNS server instead of the cluster's, the one line
    changed), health-checks the 'pod' on /v2/health/ready, forwards the pipeline's inference and
    refuses a composing model before any pod sees it."""
    import http.server
    import threading
    import urllib.error
    import urllib.request
    seen = []

    class Pod(http.server.BaseHTTPRequestHandler):
        def _answer(self, code, body):
            self.send_response(code)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            seen.append(("GET", self.path))
            self._answer(200 if self.path == "/v2/health/ready" else 404, b"")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            seen.append(("POST", self.path))
            self._answer(200, b'{"from":"pod"}')

        def log_message(self, *args):
            pass

    pod = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pod)
    threading.Thread(target=pod.serve_forever, daemon=True).start()
    pod_port = pod.server_address[1]
    objects = render(chart, {"triton": {"ports": {"http": pod_port, "grpc": free_port()}}})
    cont, data = gateway_parts(objects)
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    dns = _StubDNS()
    cfg = data["kubernetes.cfg"]
    assert cfg.count("parse-resolv-conf") == 1
    (tmp_path / "kubernetes.cfg").write_text(cfg.replace("parse-resolv-conf", f"nameserver stub 127.0.0.1:{dns.port}"))
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {**os.environ, **{k: v for k, v in env_of(cont).items() if isinstance(v, str)}}
    env.update(GW_DIR=str(tmp_path), GW_STATS_SOCKET=str(tmp_path / "admin.sock"),
               GW_HTTP_BIND=f"127.0.0.1:{http_port}", GW_GRPC_BIND=f"127.0.0.1:{grpc_port}",
               GW_METRICS_BIND=f"127.0.0.1:{metrics_port}")
    argv = cont["command"][2].replace("exec ", "", 1).replace("/etc/rtinfer/gateway", str(tmp_path)).split()
    log = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([haproxy_binary(), *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)

    def call(method, path, port=http_port, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                     headers={"content-type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError:
            return None, b""

    try:
        deadline = time.monotonic() + 20
        while call("GET", "/v2/health/ready")[0] != 200:  # resolved, checked up (rise 2), routed
            assert proc.poll() is None, (tmp_path / "haproxy.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.2)
        assert f"{RELEASE}-triton.{NAMESPACE}.svc.cluster.local" in dns.names
        before = len([s for s in seen if s[0] == "POST"])
        assert call("POST", "/v2/models/pipeline/infer", body=b"{}") == (200, b'{"from":"pod"}')
        status, body = call("POST", "/v2/models/preprocess/infer", body=b"{}")
        assert status == 403 and b"gateway" in body
        assert [s for s in seen if s[0] == "POST"][before:] == [("POST", "/v2/models/pipeline/infer")]
        assert call("GET", "/metrics", port=metrics_port)[0] == 404  # scraped from the pods, not here
        assert call("GET", "/gateway/metrics", port=metrics_port)[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        dns.close()
        pod.shutdown()

"""deploy/: manifests render and validate, linters pass, and nothing drifts from the server's real CLI.

Needs the tools `make deploy-tools` installs (kubectl for `kubectl kustomize`,
and kubernetes-validate, hadolint and checkov in .venv-deploy); `make test`
installs them and sets OPTIC_DEPLOY_TOOLS, which turns a missing tool into a
failure instead of a skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from grpc_health.v1 import health_pb2

from optic.server.cli import build_parser
from optic.server.probes import LIVENESS_SERVICE, READINESS_SERVICE
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "cpu-models-pvc")
K8S_VERSION = "1.35.0"
TOOLS_ROOT = Path(os.environ.get("OPTIC_DEPLOY_TOOLS", ROOT))
KUBECTL = TOOLS_ROOT / ".tools" / "kubectl"
LINT_BIN = TOOLS_ROOT / ".venv-deploy" / "bin"


def tool(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("OPTIC_DEPLOY_TOOLS"):
            pytest.fail(f"{path} is missing: run `make deploy-tools`")
        pytest.skip(f"{path} not installed (`make deploy-tools`; `make test` does it)")
    return path


def run(*cmd: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    out = tmp_path_factory.mktemp("rendered")
    kubectl = tool(KUBECTL)
    result = {}
    for overlay in OVERLAYS:
        r = run(kubectl, "kustomize", DEPLOY / "k8s" / "overlays" / overlay)
        assert r.returncode == 0, r.stderr
        path = out / f"{overlay}.yaml"
        path.write_text(r.stdout)
        result[overlay] = (path, [d for d in yaml.safe_load_all(r.stdout) if d])
    return result


def kind(docs: list[dict], name: str) -> list[dict]:
    return [d for d in docs if d["kind"] == name]


# ---------------------------------------------------------------- validation and linters


def test_manifests_pass_strict_schema_validation(rendered):
    validate = tool(LINT_BIN / "kubernetes-validate")
    files = [p for p, _ in rendered.values()]
    r = run(validate, "--strict", "-k", K8S_VERSION, *files)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = r.stdout.count("passed for resource")
    built_in = sum(
        len([d for d in docs if "monitoring.coreos.com" not in d["apiVersion"]]) for _, docs in rendered.values()
    )
    assert passed == built_in, r.stdout  # every built-in resource was checked, none skipped


def test_custom_resources_have_the_fields_their_operators_need(rendered):
    """No schema ships for CRDs here, so check the fields ServiceMonitor and InferenceService require."""
    for _, docs in rendered.values():
        (monitor,) = kind(docs, "ServiceMonitor")
        (service,) = [s for s in kind(docs, "Service") if s["metadata"]["name"] == "optic"]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    assert [p["name"] for p in container["ports"]] == ["h2c"]  # KServe's name for a gRPC predictor port


def test_dockerfiles_pass_hadolint():
    hadolint = tool(LINT_BIN / "hadolint")
    r = run(hadolint, DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda")
    assert r.returncode == 0, r.stdout + r.stderr


def test_checkov_passes_with_justified_skips(rendered):
    checkov = tool(LINT_BIN / "checkov")
    files = [p for p, _ in rendered.values()] + [DEPLOY / "kserve" / "inferenceservice.yaml"]
    docker = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]
    for framework, targets in (("kubernetes", files), ("dockerfile", docker)):
        args = [a for f in targets for a in ("-f", f)]
        r = run(checkov, "--skip-download", "--compact", "--quiet", "--framework", framework, *args)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "Failed checks: 0" in r.stdout or not r.stdout.strip(), r.stdout[-4000:]
    for _, docs in rendered.values():
        for doc in docs:
            for key, value in doc["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, why = value.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(why) > 20, value
    for path in docker:
        for line in path.read_text().splitlines():
            if "checkov:skip=" in line:
                assert len(line.split(":", 2)[-1].strip()) > 20, line  # a reason, not just the id


# ---------------------------------------------------------------- drift against the server


def serve_args(args: list[str]):
    try:
        return build_parser().parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"manifest passes flags `optic serve` does not take: {args}")


# The server with the default repository at its largest, without what clients hold (the formula's part): ~900 MB idle
# (its shared onnxruntime arena grown by warm-up at batch 32), and under load the arena grows to hold the batches
# running at once, two per model by default: peaks measured 1,701-1,882 MB (the segmenter alone, or all four models,
# at 64 callers each: benchmarks/results/lanes.json's "memory"), 1,601-1,698 MB at d6dabc9 (one batch at a time,
# an arena per session). The rest of the limit is the formula's.
MODELS_ALLOWANCE_MB = 2000


def quantity_mb(value: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    return float(value[:-2]) * units[value[-2:]]


def cpu_cores(quantity: str) -> int:
    """A CPU limit as the cores ``default_threads()`` sees under its quota: "2" -> 2, "1500m" -> 2."""
    return max(1, math.ceil(int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)))


def test_the_memory_check_counts_every_worker_a_container_starts():
    """The manifests all run one worker; the check must still multiply when a container would start more."""
    container = {"args": ["--device=cpu", "--max-inflight=32", "--max-inflight-mb=64", "--max-message-mb=8",
                          "--max-streams=16", "--stream-window-mb=4", "--max-image-pixels=16000000",
                          "--max-rle-runs=1000000"],
                 "resources": {"limits": {"cpu": "8", "memory": "8Gi"}}}  # fmt: skip
    with pytest.raises(AssertionError, match=r"^4 worker\(s\) x"):  # 8 cores: the default starts 4
        assert_bounds_fit_memory_limit(container)
    assert_bounds_fit_memory_limit(container | {"args": [*container["args"], "--workers=1"]})
    auto = {"args": ["--device=auto", *container["args"][1:]], "resources": container["resources"]}
    with pytest.raises(AssertionError, match=r"^4 worker"):  # auto may fall back to CPU: counted as CPU
        assert_bounds_fit_memory_limit(auto)
    assert [cpu_cores(q) for q in ("2", "500m", "1500m", "4")] == [2, 1, 2, 4]


def assert_bounds_fit_memory_limit(c: dict) -> None:
    """The worst case the container's flags allow (docs/operations.md's formula) fits its memory limit, for every
    worker process the container starts: each applies the bounds on its own and holds its own models."""
    from optic.server.limits import worst_case_memory
    from optic.server.workers import default_workers

    args = serve_args(c["args"])
    mb = 2**20
    cores = cpu_cores(c["resources"]["limits"]["cpu"])  # default_threads() under the CPU quota
    # --device auto counts as CPU: it falls back there without CUDA, where the default starts the most workers.
    processes = args.workers or default_workers(cores, gpu=args.device == "cuda")
    budget = worst_case_memory(
        max_inflight=args.max_inflight, max_inflight_bytes=int(args.max_inflight_mb * mb),
        max_message_bytes=int(args.max_message_mb * mb), max_streams=args.max_streams,
        stream_window_bytes=int(args.stream_window_mb * mb),
        workers=max(1, cores // processes),  # each worker's decode pool: its share of the cores
        max_image_pixels=args.max_image_pixels, max_rle_runs=args.max_rle_runs,
    )  # fmt: skip
    limit = quantity_mb(c["resources"]["limits"]["memory"])
    need = processes * (budget["total"] / mb + MODELS_ALLOWANCE_MB)
    assert need <= limit, (
        f"{processes} worker(s) x ({budget['total'] / mb:.0f} MB the flags allow + {MODELS_ALLOWANCE_MB} for the "
        f"process and its models) = {need:.0f} MB; the limit is {limit:.0f} MB"
    )


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_matches_the_server(rendered, overlay):
    _, docs = rendered[overlay]
    (deployment,) = kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    c = _container(deployment)
    args = serve_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.grpc_port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == args.grpc_port, probe
    assert c["startupProbe"]["grpc"]["service"] == READINESS_SERVICE
    assert c["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE
    assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + args.grace_seconds
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert_bounds_fit_memory_limit(c)
    assert pod["spec"]["topologySpreadConstraints"]
    for service in kind(docs, "Service"):
        for p in service["spec"]["ports"]:
            assert p["port"] == ports[p["targetPort"]], (service["metadata"]["name"], p)
    (headless,) = [s for s in kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    (policy,) = kind(docs, "NetworkPolicy")
    assert {p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]} == set(ports.values())
    assert kind(docs, "PodDisruptionBudget") and kind(docs, "HorizontalPodAutoscaler")
    if overlay == "gpu":
        assert args.device == "cuda" and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["image"].endswith("-cuda")
        (hpa,) = kind(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "optic_queue_seconds_per_request"
    else:
        assert args.device == "cpu"
    if overlay == "cpu-models-pvc":
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert str(args.model_repo) in mounts and args.model_control_mode == "poll"
        assert kind(docs, "PersistentVolumeClaim")


def test_queue_time_metric_exists_in_the_adapter_rule():
    rules = yaml.safe_load(
        (DEPLOY / "k8s" / "components" / "hpa-queue-time" / "prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "optic_queue_seconds_per_request"
    assert set(re.findall(r"optic_[a-z_]+", rule["metricsQuery"])) <= exported_series()


def test_kserve_predictor_matches_the_server():
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    (c,) = isvc["spec"]["predictor"]["containers"]
    args = serve_args(c["args"])
    assert c["ports"][0]["containerPort"] == args.grpc_port
    assert c["readinessProbe"]["grpc"] == {"port": args.grpc_port, "service": READINESS_SERVICE}
    assert c["livenessProbe"]["grpc"] == {"port": args.grpc_port, "service": LIVENESS_SERVICE}
    assert isvc["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    assert_bounds_fit_memory_limit(c)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_match_the_server(name):
    text = (DEPLOY / "docker" / name).read_text()
    defaults = build_parser().parse_args(["serve"])
    (expose,) = re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)
    assert sorted(map(int, expose.split())) == sorted([defaults.grpc_port, defaults.metrics_port])
    assert re.search(r'^ENTRYPOINT \["optic", "serve"\]$', text, re.MULTILINE)
    (cmd,) = re.findall(r"^CMD (\[.+\])$", text, re.MULTILINE)
    args = serve_args(json.loads(cmd))
    assert str(args.model_repo) == "/models" and "COPY --chown=10001:10001 model_repo /models" in text
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", text)  # the README's install, not -e, no extras
    assert re.search(r"^USER 10001", text, re.MULTILINE) and "torch" not in text.split("FROM")[-1]
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert all(":" in f and not f.endswith(":latest") for f in froms if f != "base"), froms


# ---------------------------------------------------------------- Grafana and metrics


def exported_series() -> set[str]:
    """Every sample name the server's metrics can produce (counters' _total, histograms' _bucket/_sum/_count)."""
    from prometheus_client import REGISTRY

    import optic.server.metrics  # noqa: F401 - registers the metrics

    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("optic_"):
            continue
        if family.type == "counter":
            names |= {family.name + "_total"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_grafana_dashboard_uses_only_metrics_the_server_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "optic-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"optic_[a-z_]+", e)}
    assert used and used <= exported_series(), used - exported_series()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch", "error"):
        assert topic in titles, topic
    assert any(v["name"] == "model" for v in dashboard["templating"]["list"])


def test_health_services_the_probes_use(server):
    assert server.health(READINESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert server.health(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_readme_documents_every_deploy_file():
    readme = (DEPLOY / "README.md").read_text()
    files = [
        p.relative_to(DEPLOY).as_posix()
        for p in DEPLOY.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != "README.md"
    ]
    missing = [f for f in files if f not in readme and Path(f).name not in readme]
    assert not missing, missing
    assert shlex.split("kubectl apply -k deploy/k8s/overlays/cpu")[0] in readme

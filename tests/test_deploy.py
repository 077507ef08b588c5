"""deploy/: the Kubernetes manifests rendered, validated against the Kubernetes schemas and statically checked
for security; the Prometheus configuration and alert rules checked and unit-tested with promtool; and a
real Prometheus scraping a real `bentoml serve`.

The tools come from scripts/test (prometheus via apt-get as root, kubernetes-validate and checkov in
.venv-deploy from deploy/requirements-check.txt; kubectl is on the project's machines). Where one is
missing the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.harness.servers import free_port, start_server
from serving.settings import ENV_PREFIX, ServiceSettings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
DEPLOY_TOOLS = ROOT / ".venv-deploy" / "bin"
# The client version of the project machines' kubectl, and the newest the schema package bundles.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
# (overlay, components added on top): the shipped overlays, and every optional component on each.
RENDERINGS = {
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "lab-example": ("overlays/lab-example", []),
    "cpu+baked-bundle": ("overlays/cpu", ["baked-bundle"]),
    "gpu+all-components": ("overlays/gpu", ["ingress", "servicemonitor", "baked-bundle"]),
}


def tool(name: str) -> str:
    """The path of a command-line tool; skip without it, or fail under CI=true (where scripts/test installs it)."""
    found = DEPLOY_TOOLS / name if (DEPLOY_TOOLS / name).exists() else shutil.which(name)
    if found:
        return str(found)
    message = (
        f"{name} not found: scripts/test installs it (prometheus/promtool with apt-get as root; "
        "kubernetes-validate and checkov into .venv-deploy; kubectl is on the project's machines)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(*command: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """Each rendering as one YAML file, made with `kubectl kustomize` (components through a small overlay)."""
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("k8s")
    files = {}
    for name, (overlay, components) in RENDERINGS.items():
        folder = K8S / overlay
        if components:  # a lab's overlay adding the components, as overlays/lab-example does
            folder = out / f"{name}-overlay"
            folder.mkdir()
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "tsimcne",
                "resources": [os.path.relpath(K8S / overlay, folder)],
                "components": [os.path.relpath(K8S / "components" / c, folder) for c in components],
            }
            (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        result = run(kubectl, "kustomize", str(folder))
        assert result.returncode == 0, f"{name}: {result.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(result.stdout)
    return files


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    [found] = [doc for doc in docs if doc["kind"] == kind]
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendering_passes_the_kubernetes_schemas(rendered, version) -> None:
    validate = tool("kubernetes-validate")
    for name, path in rendered.items():
        result = run(validate, "--kubernetes-version", version, "--strict", str(path))
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}: {output}"
        kinds = [doc["kind"] for doc in _documents(path)]
        passed = re.findall(r"passed for resource (\w+)/", output)
        # The ServiceMonitor is a CRD of the Prometheus Operator: no schema ships with Kubernetes (its
        # fields are checked against the Service in test_manifests_agree_with_the_image_and_the_service).
        assert len(passed) == len([k for k in kinds if k != "ServiceMonitor"]), f"{name}: {output}"
        assert "failed" not in output.lower(), f"{name}: {output}"


def test_optional_components_render_only_when_asked(rendered) -> None:
    kinds = {name: sorted(doc["kind"] for doc in _documents(path)) for name, path in rendered.items()}
    common = ["Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    assert kinds["cpu"] == kinds["gpu"] == sorted([*common, "PersistentVolumeClaim"])
    assert kinds["lab-example"] == sorted([*common, "PersistentVolumeClaim", "Ingress", "ServiceMonitor"])
    assert kinds["cpu+baked-bundle"] == sorted(common)  # no claim, no volume: the bundle is in the image
    baked = _one(_documents(rendered["cpu+baked-bundle"]), "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in baked["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in baked["containers"][0]["volumeMounts"]] == ["/tmp"]
    for name, path in rendered.items():
        assert {doc["metadata"].get("namespace") for doc in _documents(path) if doc["kind"] != "Namespace"} == {
            "tsimcne"
        }, name


def test_manifests_agree_with_the_image_and_the_service(rendered) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    port = int(re.search(r"BENTOML_PORT=(\d+)", dockerfile).group(1))
    assert re.search(r"^USER 10001$", dockerfile, flags=re.MULTILINE) and "BENTOML_HOME=/tmp/" in dockerfile
    settings = {ENV_PREFIX + name.upper() for name in ServiceSettings.model_fields}
    for name in ("cpu", "gpu", "lab-example"):
        docs = _documents(rendered[name])
        deployment = _one(docs, "Deployment")
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
        assert context["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsUser"] == 10001
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] and "/tmp" in mounts  # the only writable place (BENTOML_HOME)
        assert {e["name"] for e in container["env"]} <= settings  # every variable is a setting the service knows
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
        hpa = _one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # the autoscaler owns them
        service = _one(docs, "Service")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    gpu = _one(_documents(rendered["gpu"]), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"].endswith(":gpu")
    assert {"name": "TSIMCNE_PROVIDER", "value": "cuda"} in gpu["env"]

    docs = _documents(rendered["lab-example"])
    ingress, service, monitor = _one(docs, "Ingress"), _one(docs, "Service"), _one(docs, "ServiceMonitor")
    notes = ingress["metadata"]["annotations"]
    from serving.service import MapService

    timeout = MapService.config["traffic"]["timeout"]  # what the service is configured with, not its source text
    upload_mib = ServiceSettings.model_fields["max_upload_mb"].default
    body_mib = int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m"))
    assert upload_mib <= body_mib <= upload_mib + 2  # the service answers oversized uploads itself (README)
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) == timeout
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert f"client_max_body_size {body_mib}m;" in nginx and f"proxy_read_timeout {timeout}s;" in nginx
    paths = {p["path"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert {"/", "/embed", "/map", "/info", "/readyz"} <= paths and "/metrics" not in paths
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_checkov_finds_no_failed_security_check(rendered, tmp_path) -> None:
    checkov = tool("checkov")
    files = [str(path) for path in rendered.values()]
    command = [checkov, "--framework", "kubernetes", "dockerfile", "--compact", "--quiet", "--skip-download"]
    command += [arg for path in [*files, str(ROOT / "Dockerfile")] for arg in ("-f", path)]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}  # offline: no policy mapping from the Bridgecrew platform
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"kubernetes scan results:\s+Passed checks: \d+, Failed checks: 0", result.stdout), result.stdout
    assert re.search(r"dockerfile scan results:\s+Passed checks: \d+, Failed checks: 0", result.stdout), result.stdout


def test_promtool_checks_the_config_and_unit_tests_the_alerts() -> None:
    promtool = tool("promtool")
    deploy = ROOT / "deploy"
    for command in [
        ("check", "config", "prometheus.yml"),  # also loads the rule files it names
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
    ]:
        result = run(promtool, *command, cwd=deploy)
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "SUCCESS" in output, (command, output)


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_service_and_queries_what_was_sent(service_bundle, tmp_path) -> None:
    """deploy/prometheus.yml and alerts.yml in a real Prometheus, pointed at a real `bentoml serve`: after
    a few requests, PromQL over the data metrics gives back the images sent, their regions, the errors."""
    prometheus = tool("prometheus")
    bundle, data = service_bundle
    service = start_server(tmp_path, {"bundle": str(bundle)}, home=tmp_path / "bentoml")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "deploy" / "alerts.yml")]
    [job] = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [service.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        ready_by = time.monotonic() + 60  # Prometheus listens a moment after it starts (CI once asked too early)
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < ready_by and process.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.25)
        paths = sorted(data.rglob("*.png"))[:7]
        with service.client() as client:
            first = client.post("/embed", files=[("images", (p.name, p.read_bytes())) for p in paths])
            again = client.post("/embed", files=[("images", ("again.png", paths[0].read_bytes()))])
            bad = client.post("/embed", files=[("images", ("notes.txt", b"this is not an image\n"))])
        assert (first.status_code, again.status_code, bad.status_code) == (200, 200, 422)
        placed = first.json()["images"] + again.json()["images"]
        regions_sent = Counter(image["majority_label"] or "none" for image in placed)

        def query(promql: str) -> list[dict]:
            reply = httpx.get(f"{api}/query", params={"query": promql}, timeout=10).json()
            assert reply["status"] == "success", reply
            return reply["data"]["result"]

        expected = {
            'sum(tsimcne_images_embedded_total{job="tsimcne"})': 8.0,
            'sum(tsimcne_decode_errors_total{job="tsimcne", reason="undecodable"})': 1.0,
            'sum(tsimcne_rejected_requests_total{job="tsimcne", reason="bad_image"})': 1.0,
            'up{job="tsimcne"}': 1.0,
        }
        deadline = time.monotonic() + 60
        while True:
            got = {promql: (float(r[0]["value"][1]) if (r := query(promql)) else None) for promql in expected}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == expected, (got, (tmp_path / "prometheus.log").read_text()[-2000:])
        by_region = {
            r["metric"]["label"]: float(r["value"][1])
            for r in query('sum by (label) (tsimcne_images_by_region_total{job="tsimcne"})')
            if float(r["value"][1]) > 0
        }
        assert by_region == {label: float(count) for label, count in regions_sent.items()}
        rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert sorted(r["name"] for r in rules) == sorted(
            re.findall(r"alert: (\w+)", (ROOT / "deploy" / "alerts.yml").read_text())
        ) and all(r["health"] in ("ok", "unknown") for r in rules)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        service.stop()

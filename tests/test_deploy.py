"""deploy/: the Kubernetes manifests rendered, validated against the Kubernetes schemas and statically checked
for security; the Prometheus configuration and alert rules checked and unit-tested with promtool; and a
real Prometheus scraping a real `bentoml serve`.

The tools come from scripts/test (prometheus via apt-get as root, kubernetes-validate and checkov in
.venv-deploy from deploy/requirements-check.txt; kubectl is on the project's machines). Where one is
missing the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from benchmarks.harness.servers import free_port, start_server
from serving.settings import ENV_PREFIX, ServiceSettings, load_settings
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
    "single": ("overlays/single", []),
    "cpu+baked-bundle": ("overlays/cpu", ["baked-bundle"]),
    "single+baked-bundle": ("overlays/single", ["baked-bundle", "ingress"]),
    "gpu+all-components": ("overlays/gpu", ["ingress", "servicemonitor", "baked-bundle"]),
    "cpu+journal-postgres-spool": ("overlays/cpu", ["journal-postgres-spool"]),
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


def _workload(docs: list[dict]) -> dict:
    """The service's pods' owner: the Deployment, or the StatefulSet of components/journal-postgres-spool."""
    [found] = [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]
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
    spooled = [k if k != "Deployment" else "StatefulSet" for k in common]  # a claim a replica: its template
    assert kinds["cpu+journal-postgres-spool"] == sorted([*spooled, "PersistentVolumeClaim"])
    baked = _one(_documents(rendered["cpu+baked-bundle"]), "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in baked["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in baked["containers"][0]["volumeMounts"]] == ["/tmp"]
    # One replica with its SQLite journal: no autoscaler, the journal's claim beside the bundle's.
    single = sorted([*common, "PersistentVolumeClaim", "PersistentVolumeClaim"])
    assert kinds["single"] == [k for k in single if k != "HorizontalPodAutoscaler"]
    assert kinds["single+baked-bundle"] == sorted(
        [*(k for k in common if k != "HorizontalPodAutoscaler"), "PersistentVolumeClaim", "Ingress"]
    )
    baked = _one(_documents(rendered["single+baked-bundle"]), "Deployment")["spec"]["template"]["spec"]
    assert [v["name"] for v in baked["volumes"]] == ["tmp", "journal"]  # the bundle's went, the journal's stayed
    assert [m["mountPath"] for m in baked["containers"][0]["volumeMounts"]] == ["/tmp", "/journal"]
    for name, path in rendered.items():
        assert {doc["metadata"].get("namespace") for doc in _documents(path) if doc["kind"] != "Namespace"} == {
            "tsimcne"
        }, name


def test_manifests_agree_with_the_image_and_the_service(rendered) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    port = int(re.search(r"BENTOML_PORT=(\d+)", dockerfile).group(1))
    assert re.search(r"^USER 10001$", dockerfile, flags=re.MULTILINE) and "BENTOML_HOME=/tmp/" in dockerfile
    settings = {ENV_PREFIX + name.upper() for name in ServiceSettings.model_fields}
    for name in ("cpu", "gpu", "lab-example", "single", "cpu+journal-postgres-spool"):
        docs = _documents(rendered[name])
        deployment = _workload(docs)
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
        if name == "single":  # one replica (the SQLite journal: test_the_journal_suits_the_replicas)
            assert deployment["spec"]["replicas"] == 1
            assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]
        else:
            hpa = _one(docs, "HorizontalPodAutoscaler")
            assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            assert hpa["spec"]["scaleTargetRef"]["kind"] == deployment["kind"]
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


def _most_replicas(docs: list[dict]) -> int:
    """The most pods a rendering may run at once: the autoscaler's ceiling, else the Deployment's replicas."""
    ceilings = [doc["spec"]["maxReplicas"] for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"]
    return max(ceilings) if ceilings else _workload(docs)["spec"].get("replicas", 1)


def test_the_journal_suits_the_replicas(rendered) -> None:
    """Every rendering keeps a journal. SQLite only where one pod can ever open the file: one replica, no
    autoscaler, Recreate rollouts, the file on a ReadWriteOnce claim of its own. Wherever more replicas may
    run, PostgreSQL, its URL from a Secret the lab creates (none is shipped), with the egress it needs."""
    kinds_of_journal = {}
    for name, path in rendered.items():
        docs = _documents(path)
        deployment = _workload(docs)
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        [journal] = [e for e in container["env"] if e["name"] == "TSIMCNE_JOURNAL"]
        assert not any(doc["kind"] == "Secret" for doc in docs), name  # no password in the manifests
        if "value" in journal:
            url = journal["value"]
            assert load_settings(environ={"TSIMCNE_JOURNAL": url}).journal == url and url.startswith("sqlite:///")
            kinds_of_journal[name] = "sqlite"
            assert _most_replicas(docs) == 1, f"{name}: SQLite is for one replica"
            assert not [doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"], name
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name  # never two pods on the file
            file = PurePosixPath(url.removeprefix("sqlite:///"))
            assert file.is_absolute(), f"{name}: {url} (an absolute path needs four slashes)"
            [mount] = [m for m in container["volumeMounts"] if file.parent == PurePosixPath(m["mountPath"])]
            assert not mount.get("readOnly") and not file.is_relative_to("/tmp"), name
            [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            claim = volume["persistentVolumeClaim"]
            assert not claim.get("readOnly") and claim["claimName"] != "tsimcne-bundle", name
            [pvc] = [
                d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim["claimName"]
            ]
            assert pvc["spec"]["accessModes"] in (["ReadWriteOnce"], ["ReadWriteOncePod"]), name
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # uid 10001 may write it
        else:
            kinds_of_journal[name] = "postgresql"
            ref = journal["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "tsimcne-journal", "key": "url"}, name  # required: no silent journal-off
            policy = _one(docs, "NetworkPolicy")
            allowed = {(p["port"], p["protocol"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
            assert allowed == {(53, "UDP"), (53, "TCP"), (5432, "TCP")}, name  # DNS and the database only
            spool = [e["value"] for e in container["env"] if e["name"] == "TSIMCNE_JOURNAL_SPOOL"]
            if spool:  # on a claim of each replica's own (a StatefulSet's template), never on the pod's disk
                assert deployment["kind"] == "StatefulSet" and deployment["spec"]["serviceName"], name
                environ = {"TSIMCNE_JOURNAL": "postgresql://u:p@db/j", "TSIMCNE_JOURNAL_SPOOL": spool[0]}
                assert load_settings(environ=environ).journal_spool == spool[0]
                [mount] = [
                    m for m in container["volumeMounts"] if PurePosixPath(spool[0]) == PurePosixPath(m["mountPath"])
                ]
                [claim] = [
                    c for c in deployment["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]
                ]
                assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and not mount.get("readOnly"), name
                assert mount["name"] not in {v["name"] for v in pod["volumes"]}, name  # not an emptyDir
            else:
                assert deployment["kind"] == "Deployment", name
    assert {name for name, kind in kinds_of_journal.items() if kind == "sqlite"} == {"single", "single+baked-bundle"}
    for name in ("cpu", "gpu", "lab-example", "cpu+journal-postgres-spool"):  # the autoscaled renderings
        assert _most_replicas(_documents(rendered[name])) > 1 and kinds_of_journal[name] == "postgresql"


def _volumes(service: dict) -> dict[str, str]:
    """A compose service's short-syntax volumes: container path -> source (the source may hold ${...:?...})."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = re.fullmatch(r"(.+):(/[^:]*)(?::ro|:rw)?", volume).groups()
        found[target] = source
    return found


def test_compose_keeps_the_journal_in_a_volume_and_offers_postgresql() -> None:
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    service = compose["services"]["tsimcne"]
    default = re.fullmatch(r"\$\{TSIMCNE_JOURNAL:-(.+)\}", service["environment"]["TSIMCNE_JOURNAL"]).group(1)
    sync = re.fullmatch(r"\$\{TSIMCNE_JOURNAL_SYNC:-(\w+)\}", service["environment"]["TSIMCNE_JOURNAL_SYNC"]).group(1)
    assert load_settings(environ={"TSIMCNE_JOURNAL": default, "TSIMCNE_JOURNAL_SYNC": sync}).journal == default
    file = PurePosixPath(default.removeprefix("sqlite:///"))
    assert default.startswith("sqlite:///") and file.is_absolute()
    volume = _volumes(service)[str(file.parent)]
    assert volume in compose["volumes"], "the journal is in a named volume (kept across restarts)"
    assert f"{file.parent}:ro" not in service["volumes"] and service["read_only"] is True
    # A new named volume takes the owner of the image's folder: the service's user must own it.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"install -d -o 10001 -g 10001 (?:-m 07[57]0 )?{file.parent}\n", dockerfile)

    postgres = compose["services"]["postgres"]
    assert postgres["profiles"] == ["postgres"]  # only when asked for
    assert "ports" not in postgres  # reached by the service only, on the compose network
    password = re.fullmatch(r"\$\{(\w+):-\}", postgres["environment"]["POSTGRES_PASSWORD"])
    assert password, "the password comes from the environment (or deploy/.env), never from the file"
    assert str(volume) != _volumes(postgres)["/var/lib/postgresql/data"] in compose["volumes"]
    override = yaml.safe_load((deploy / "compose.postgres.yaml").read_text())["services"]["tsimcne"]
    url = override["environment"]["TSIMCNE_JOURNAL"]
    user, db = postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"]
    assert re.fullmatch(rf"postgresql://{user}:\$\{{{password.group(1)}:\?[^}}]+\}}@postgres:5432/{db}", url), url
    spool = override["environment"]["TSIMCNE_JOURNAL_SPOOL"]  # on the journal's volume: kept across restarts
    assert PurePosixPath(spool).is_relative_to(file.parent) and _volumes(service)[str(file.parent)] == volume
    environ = {"TSIMCNE_JOURNAL": f"postgresql://{user}:x@postgres:5432/{db}", "TSIMCNE_JOURNAL_SPOOL": spool}
    assert load_settings(environ=environ).journal_spool == spool
    assert override["depends_on"] == {"postgres": {"condition": "service_healthy"}} and "healthcheck" in postgres


def test_docker_compose_accepts_both_journal_setups(tmp_path) -> None:
    """`docker-compose config` (offline) on the SQLite default and on the PostgreSQL profile; the latter
    refuses to run without a password."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not found (apt-get install docker-compose)")
    deploy = ROOT / "deploy"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BUNDLE": str(tmp_path)}
    sqlite = [compose, "-f", str(deploy / "compose.yaml"), "config"]
    result = subprocess.run(sqlite, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["tsimcne"]["environment"]["TSIMCNE_JOURNAL"] == "sqlite:////journal/journal.db"
    assert services["postgres"]["profiles"] == ["postgres"]  # `config` lists it; `up` starts it only with the profile
    postgres = [compose, "-f", str(deploy / "compose.yaml"), "-f", str(deploy / "compose.postgres.yaml")]
    postgres += ["--profile", "postgres", "config"]
    result = subprocess.run(postgres, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "JOURNAL_DB_PASSWORD" in result.stderr
    result = subprocess.run(postgres, capture_output=True, text=True, env={**env, "JOURNAL_DB_PASSWORD": "s3cret"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    assert services["tsimcne"]["environment"]["TSIMCNE_JOURNAL"] == "postgresql://tsimcne:s3cret@postgres:5432/tsimcne"


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


def test_promtool_parses_every_dashboard_query(tmp_path) -> None:
    """Each query of the generated dashboard is valid PromQL (as a recording rule for promtool)."""
    promtool = tool("promtool")
    panels = json.loads((ROOT / "deploy" / "grafana" / "tsimcne-dashboard.json").read_text())["panels"]
    rules = [
        {"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": t["expr"]} for p in panels for t in p["targets"]
    ]
    titles = " ".join(p["title"] for p in panels)
    assert "Journal" in titles and "Drift" in titles
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(tmp_path / "dashboard-rules.yml"))
    assert result.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in result.stdout, (
        result.stdout + result.stderr
    )


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

"""Deployment files: the dashboard queries only metrics the server exposes,
Kubernetes manifests validate offline (base and overlay resolved), the
compose file parses, and the Dockerfile's entrypoint works as written."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"


def exposed_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry, runtime=types.SimpleNamespace(snapshot=list))  # type: ignore[arg-type]
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    names = set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    # Histograms expose _bucket/_sum/_count, counters _total (+ _created).
    return names | {n + s for n in names for s in ("_bucket", "_sum", "_count", "_total")}


def test_dashboard_queries_only_exposed_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/sequence-layers-serving.json").read_text())
    exposed = exposed_metric_names()
    pinned = {
        "sl_streams_active", "sl_stream_slots", "sl_streams_total", "sl_tick_seconds",
        "sl_tick_batch_size", "sl_queue_wait_seconds", "sl_chunk_latency_seconds",
        "sl_first_output_seconds", "sl_input_frames_total", "sl_output_frames_total",
        "sl_errors_total", "sl_compile_seconds",
    }  # fmt: skip
    assert pinned <= exposed
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bsl_\w+", target["expr"]))
    assert used and used <= exposed, used - exposed
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("slots", "outcome", "tick time", "batch", "queue", "chunk latency",
                  "first-output", "frames", "real-time", "errors", "refused"):  # fmt: skip
        assert topic in titles


# A small kustomize: enough of the format to resolve our base and overlay.


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge for our patches: dicts merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            match = next((i for i, x in enumerate(out) if x["name"] == item["name"]), None)
            if match is None:
                out.append(item)
            else:
                out[match] = _merge(out[match], item)
        return out
    return patch


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parts = [p for p in op["path"].split("/") if p]
        target: Any = doc
        for p in parts[:-1]:
            target = target[int(p)] if isinstance(target, list) else target[p]
        last: Any = int(parts[-1]) if isinstance(target, list) else parts[-1]
        assert op["op"] in ("replace", "add"), op
        if op["op"] == "replace":
            assert last in target if isinstance(target, dict) else last < len(target), op["path"]
        target[last] = op["value"]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        docs += kustomize(path) if path.is_dir() else _load_docs(path)
    for label in k.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
            if label.get("includeSelectors") and d["kind"] in ("Deployment",):
                d["spec"]["selector"]["matchLabels"].update(label["pairs"])
                d["spec"]["template"]["metadata"]["labels"].update(label["pairs"])
            if label.get("includeSelectors") and d["kind"] == "Service":
                d["spec"]["selector"].update(label["pairs"])
    for image in k.get("images", []):
        for d in docs:
            if d["kind"] == "Deployment":
                for c in d["spec"]["template"]["spec"]["containers"]:
                    if c["image"].split(":")[0] == image["name"]:
                        c["image"] = f"{image['name']}:{image['newTag']}"
    for component in k.get("components", []):
        # A kustomize Component: its resources join, then its patches apply
        # to everything so far.
        path = directory / component
        c = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert c["kind"] == "Component", path
        for res in c.get("resources", []):
            docs += _load_docs(path / res)
        _apply_patches(docs, path, c.get("patches", []))
    _apply_patches(docs, directory, k.get("patches", []))
    return docs


def _apply_patches(docs: list[dict[str, Any]], directory: Path, patches: list[Any]) -> None:
    for patch in patches:
        if "path" in patch:
            p = yaml.safe_load((directory / patch["path"]).read_text())
            matches = [
                d
                for d in docs
                if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]
            ]
            assert len(matches) == 1, f"patch {patch['path']} matches {len(matches)} resources"
            docs[docs.index(matches[0])] = _merge(matches[0], p)
        else:
            t = patch["target"]
            matches = [
                d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]
            ]
            assert len(matches) == 1, t
            _json_patch(matches[0], yaml.safe_load(patch["patch"]))


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_kubernetes_manifests_validate(variant: str) -> None:
    docs = kustomize(DEPLOY / "k8s" / variant)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
         "PodDisruptionBudget", "ServiceMonitor"]
    )  # fmt: skip
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            # A CRD: no upstream schema; check what the operator needs.
            assert doc["spec"]["endpoints"][0]["port"] == "http"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["server.toml"]
    drain = float(re.search(r"drain_seconds\s*=\s*([\d.]+)", config).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] >= drain + 5 + 5  # preStop + drain + margin
    service = next(d for d in docs if d["kind"] == "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {50051, 8080}
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    if variant == "overlays/gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].endswith(":cuda")
        assert 'device = "gpu:0"' in config


def test_migration_overlay_moves_streams_on_rollout() -> None:
    """Stream migration (issue 18): the resume key is a Secret passed as
    --resume-key-file, an Envoy gateway spreads streams per request with
    stream-friendly timeouts, and the rollout leaves time to move streams."""
    docs = kustomize(DEPLOY / "k8s" / "overlays" / "migration")
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    server = by_name[("Deployment", "sl-serve")]
    pod = server["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    key_file = Path(args[args.index("--resume-key-file") + 1])
    drain = float(args[args.index("--drain-seconds") + 1])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "resume-keys")
    assert Path(mount["mountPath"]) == key_file.parent and mount["readOnly"]
    secret = next(v for v in pod["volumes"] if v["name"] == "resume-keys")["secret"]
    assert secret["secretName"] == "sl-serve-resume-keys"
    assert secret["items"] == [{"key": "keys", "path": key_file.name}]
    # Readable by the server's group (fsGroup), by no one else.
    assert secret["defaultMode"] & 0o040 and not secret["defaultMode"] & 0o007
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # Flags the server accepts (generated from ServerSettings).
    from server.settings import ServerSettings

    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    assert {"resume_key_file", "drain_seconds"} <= fields
    # The base config stays, with the flags on top; the rest of the pod is kept.
    assert args[:2] == ["--config", "/etc/sl/server.toml"]
    assert {v["name"] for v in pod["volumes"]} == {"config", "tmp", "compile-cache", "resume-keys"}
    # Rollout: a new pod is up before an old one drains; the old one gets
    # preStop + drain + time to hand its streams off before SIGKILL.
    rolling = server["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxUnavailable": 0, "maxSurge": 1}
    assert "preStop" in container["lifecycle"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + drain + 10
    assert by_name[("PodDisruptionBudget", "sl-serve")]["spec"]["maxUnavailable"] == 1

    # The gateway: its Service in front of Envoy; Envoy resolves every ready
    # pod through a headless Service and balances per stream.
    headless = by_name[("Service", "sl-serve-pods")]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod_labels(server).items()
    gateway = by_name[("Deployment", "sl-gateway")]
    assert (
        not pod_labels(gateway).items()
        <= by_name[("Service", "sl-serve")]["spec"]["selector"].items()
    )  # the server's Service never selects the gateway
    assert by_name[("Service", "sl-gateway")]["spec"]["selector"] == pod_labels(gateway)
    ports = {p["port"] for p in by_name[("Service", "sl-gateway")]["spec"]["ports"]}
    assert ports == {50051, 8080}
    envoy = yaml.safe_load(by_name[("ConfigMap", "sl-gateway-config")]["data"]["envoy.yaml"])
    listeners = {
        lst["address"]["socket_address"]["port_value"]: lst["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
        for lst in envoy["static_resources"]["listeners"]
    }
    assert set(listeners) == {50051, 8080}
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    for port, hcm in listeners.items():
        assert hcm["request_timeout"] == "0s"  # no limit on a stream's length
        assert _seconds(hcm["stream_idle_timeout"]) >= 600  # quiet streams stay
        for host in hcm["route_config"]["virtual_hosts"]:
            for route in host["routes"]:
                assert route["route"]["timeout"] == "0s"  # no route timeout
                assert _seconds(route["route"]["idle_timeout"]) >= 600
                cluster = clusters[route["route"]["cluster"]]
                endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
                address = endpoint["endpoint"]["address"]["socket_address"]
                assert address == {"address": "sl-serve-pods", "port_value": port}
                assert cluster["type"] == "STRICT_DNS"  # every pod, not one ClusterIP
                assert cluster["lb_policy"] == "LEAST_REQUEST"
                check = cluster["health_checks"][0]["http_health_check"]
                assert check["path"] == "/readyz"  # draining pods get no new streams
                protocol = cluster["typed_extension_protocol_options"][
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
                ]["explicit_http_config"]
                assert ("http2_protocol_options" in protocol) == (port == 50051)
    assert listeners[8080]["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    assert listeners[50051]["codec_type"] == "HTTP2"
    grpc_endpoint = clusters["sl-serve-grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc_endpoint["endpoint"]["health_check_config"] == {"port_value": 8080}


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_server_toml_in_configmaps_loads(tmp_path: Path) -> None:
    from server.app.config_file import load_config_file

    for variant in ("base", "overlays/gpu"):
        docs = kustomize(DEPLOY / "k8s" / variant)
        text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["server.toml"]
        (tmp_path / "server.toml").write_text(text)
        config = load_config_file(tmp_path / "server.toml")
        assert {m.builtin for m in config.models} <= {"demo-asr", "logmel", "demo-vocoder"}


def test_compose_file_parses_and_references_existing_files() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"sl-serve", "prometheus", "grafana"}
    assert "50051:50051" in compose["services"]["sl-serve"]["ports"]
    named = set(compose.get("volumes") or {})
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named or (DEPLOY / source).exists(), source
    assert "compile-cache:/var/cache/sl-serve" in compose["services"]["sl-serve"]["volumes"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["sl-serve:8080"]


def _dockerfile_json(instruction: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    match = re.findall(rf"^{instruction}\s+(\[.*\])\s*$", text, re.M)
    assert match, f"no JSON-form {instruction} in Dockerfile"
    return json.loads(match[-1])


def test_dockerfile_entrypoint_and_healthcheck_work_as_written() -> None:
    entrypoint, cmd = _dockerfile_json("ENTRYPOINT"), _dockerfile_json("CMD")
    text = (ROOT / "Dockerfile").read_text()
    health = json.loads(re.search(r"HEALTHCHECK[^\n]*\\\n\s+CMD\s+(\[.*\])", text).group(1))  # type: ignore[union-attr]
    assert entrypoint == ["sl-serve"] and "USER sl" in text and "EXPOSE 50051 8080" in text
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / entrypoint[0]), *cmd, "--model", "logmel", "--max-streams", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            check = subprocess.run(
                [str(bin_dir / "python"), *health[1:]], capture_output=True, timeout=10
            )
            if check.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _pins(lock: Path) -> dict[str, str]:
    """`name -> version` of a uv lock file (every pin carries hashes)."""
    text = lock.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", text, re.M))
    assert pins and text.count("--hash=sha256:") >= len(pins), f"{lock}: pins without hashes"
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def test_lock_files_pin_every_dependency_and_agree() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = _pins(DEPLOY / "requirements" / "serve.lock")
    test = _pins(DEPLOY / "requirements" / "test.lock")

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    runtime = names(project["dependencies"])
    assert runtime <= set(serve), sorted(runtime - set(serve))
    assert runtime | names(project["optional-dependencies"]["test"]) <= set(test)
    # The Docker image (serve.lock) runs the versions the tests ran (test.lock).
    assert {n: v for n, v in serve.items() if test.get(n) != v} == {}
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert "LOCK := deploy/requirements/test.lock" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r serve.lock" in dockerfile
    assert "!deploy/requirements/serve.lock" in (ROOT / ".dockerignore").read_text()


def _requirement_block(lock: Path, name: str) -> str:
    """One pin of a lock file with its hash lines, comments dropped."""
    match = re.search(rf"^{re.escape(name)}==.*?(?=^\S|\Z)", lock.read_text(), re.M | re.S)
    assert match, f"{lock} does not pin {name}"
    return "\n".join(line for line in match.group(0).splitlines() if "#" not in line).strip()


def test_image_imports_silero_vad_from_hash_checked_inputs() -> None:
    from server import silero_vad

    requirements = DEPLOY / "requirements"
    vad = _pins(requirements / "vad.lock")
    assert vad == {"onnx": _pins(requirements / "test.lock")["onnx"], "silero-vad": "6.2.3"}
    assert silero_vad.VERSION == vad["silero-vad"]
    # The same onnx wheels the tests ran with: version and every hash.
    assert _requirement_block(requirements / "vad.lock", "onnx") == _requirement_block(
        requirements / "test.lock", "onnx"
    )
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps --only-binary :all: -r vad.lock" in dockerfile
    assert "sl-models import silero-vad /opt/models/silero-vad" in dockerfile
    assert "COPY --from=build /opt/models /opt/models" in dockerfile
    assert "SL_SILERO_VAD_DIR=/opt/models/silero-vad" in dockerfile
    assert "!deploy/requirements/vad.lock" in (ROOT / ".dockerignore").read_text()
    # The runtime stage finds the imported directory through the variable.
    found = subprocess.run(
        [sys.executable, "-c", "from server import silero_vad; print(silero_vad.MODEL_DIR)"],
        env={"SL_SILERO_VAD_DIR": "/opt/models/silero-vad", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert found.stdout.strip() == "/opt/models/silero-vad"

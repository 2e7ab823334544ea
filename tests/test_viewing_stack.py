"""Static checks of the viewing stack (docker-compose.yml, deploy/, dashboards/).

No docker daemon runs in CI, so these tests check what can be checked without one: the
compose file through `docker stack config`, and that every config names components,
hosts, ports, datasource uids, metric and attribute names that really exist elsewhere in
the stack (a renamed service, a dropped pipeline component or a misspelt attribute fails
here instead of at `docker compose up`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the stack's YAML configs")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DASHBOARDS = ROOT / "dashboards"
DOC = ROOT / "docs" / "viewing-stack.md"

SERVICES = {
    "otel-collector",
    "jaeger",
    "tempo",
    "prometheus",
    "grafana",
    "s3",
    "s3-init",
    "blob-links",
}
ONE_SHOT = {"s3-init"}
BUCKET = "flashinfer-blobs"

# Attribute names of DESIGN.md that the stack reads (checked against DESIGN.md below).
STACK_ATTRIBUTES = {
    "flashinfer.api",
    "flashinfer.gpu.time_ns",
    "flashinfer.nonfinite",
    "flashinfer.blob.manifest",
    "flashinfer.blob.skipped",
    "flashinfer.cuda_graph.id",
    "flashinfer.cuda_graph.replay",
    "flashinfer.level",
}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def collector() -> dict:
    return _load(DEPLOY / "otel-collector" / "config.yaml")


@pytest.fixture(scope="module")
def jaeger() -> dict:
    return _load(DEPLOY / "jaeger" / "config.yaml")


@pytest.fixture(scope="module")
def tempo() -> dict:
    return _load(DEPLOY / "tempo" / "tempo.yaml")


@pytest.fixture(scope="module")
def datasources() -> list[dict]:
    return _load(DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml")[
        "datasources"
    ]


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "dashboards/ holds no dashboard"
    return {p.name: json.loads(p.read_text()) for p in files}


# --------------------------------------------------------------------------- helpers
def _host_port(endpoint: str) -> tuple[str, int]:
    """'http://jaeger:4317/x' or 'jaeger:4317' -> ('jaeger', 4317)."""
    m = re.match(r"^(?:[a-z]+://)?([^:/]+):(\d+)", endpoint)
    assert m, f"endpoint {endpoint!r} has no host:port"
    return m.group(1), int(m.group(2))


def _listen_port(endpoint: str) -> int:
    return _host_port(endpoint)[1]


def _pipeline_components(cfg: dict) -> None:
    """Every id a pipeline names is defined, and connectors are used on both sides."""
    pipelines = cfg["service"]["pipelines"]
    connectors = set(cfg.get("connectors") or {})
    used_as_exporter, used_as_receiver = set(), set()
    for name, pipe in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for cid in pipe.get(kind) or []:
                defined = set(cfg.get(kind) or {})
                if kind != "processors":
                    defined |= connectors
                assert cid in defined, f"pipeline {name} names undefined {kind[:-1]} {cid}"
                if cid in connectors:
                    (used_as_exporter if kind == "exporters" else used_as_receiver).add(cid)
    assert used_as_exporter == used_as_receiver == connectors, (
        f"connectors must feed one pipeline and be read by another: {connectors}"
    )
    for ext in cfg["service"].get("extensions") or []:
        assert ext in (cfg.get("extensions") or {}), f"service names undefined extension {ext}"


def _published(compose: dict, service: str) -> dict[int, int]:
    """host port -> container port for one service."""
    out = {}
    for spec in compose["services"][service].get("ports") or []:
        parts = str(spec).split(":")
        out[int(parts[-2])] = int(parts[-1].split("/")[0])
    return out


def _design_text() -> str | None:
    for cand in (
        ROOT / "DESIGN.md",
        ROOT / "docs" / "DESIGN.md",
        ROOT.parent / "shared" / "DESIGN.md",
        Path("/work/shared/DESIGN.md"),
    ):
        if cand.is_file():
            return cand.read_text()
    return None


def _prom_name(name: str, unit: str, kind: str) -> str:
    """OTel metric name -> Prometheus name (UnderscoreEscapingWithSuffixes, the subset used)."""
    units = {"ns": "nanoseconds", "ms": "milliseconds", "s": "seconds", "": ""}
    base = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if units[unit]:
        base += "_" + units[unit]
    return base + ("_total" if kind == "counter" else "")


def _produced_metrics(collector: dict) -> set[str]:
    """Prometheus series names the collector config makes (histograms with their suffixes)."""
    names: set[str] = set()
    sm = collector["connectors"]["spanmetrics"]
    ns = sm.get("namespace", "traces.span.metrics")
    unit = sm.get("histogram", {}).get("unit", "ms")
    names.add(_prom_name(f"{ns}.calls", "", "counter"))
    dur = _prom_name(f"{ns}.duration", unit, "histogram")
    names |= {dur + s for s in ("_bucket", "_sum", "_count")}
    for m in collector["connectors"]["signaltometrics"]["spans"]:
        if "histogram" in m:
            base = _prom_name(m["name"], m.get("unit", ""), "histogram")
            names |= {base + s for s in ("_bucket", "_sum", "_count")}
        else:  # sums: with or without _total, see the config's header comment
            base = _prom_name(m["name"], m.get("unit", ""), "gauge")
            names |= {base, base + "_total"}
    names.add("up")
    return names


def _targets(dash: dict):
    for panel in dash["panels"]:
        for t in panel.get("targets") or []:
            yield panel, t


# --------------------------------------------------------------------------- compose
def test_compose_passes_docker_stack_config():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed: `docker stack config` cannot run here")
    proc = subprocess.run(
        [docker, "stack", "config", "-c", str(COMPOSE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    assert set(rendered["services"]) == SERVICES
    assert rendered["services"]["otel-collector"]["ports"][0]["published"] == 4317


def test_compose_services_images_pinned(compose):
    assert set(compose["services"]) == SERVICES
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert "@" not in image or ":" in image.split("@")[0], image
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned to a tag"
        assert re.search(r"\d+\.\d+", tag), f"{name}: tag {tag!r} is not a version"


def test_compose_healthchecks(compose):
    for name, svc in compose["services"].items():
        reason = (svc.get("labels") or {}).get("org.otel-flashinfer.healthcheck", "")
        if "healthcheck" in svc:
            test = svc["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
            # The probe hits the port the service itself serves on.
            port = int(re.search(r"127\.0\.0\.1:(\d+)", test[1]).group(1))
            assert port in _published(compose, name).values() or name == "jaeger", name
        else:
            assert reason.startswith("none: "), f"{name} has no healthcheck and no reason"
            assert name in ONE_SHOT | {"otel-collector"}, f"{name} needs a healthcheck"
    assert compose["services"]["s3-init"]["restart"] == "no"


def test_compose_bind_mounts_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name} mounts missing {src}"
            else:
                assert src in compose["volumes"], f"{name} uses undeclared volume {src}"


def test_otlp_ports_on_all_interfaces(compose):
    ports = compose["services"]["otel-collector"]["ports"]
    assert "4317:4317" in ports and "4318:4318" in ports


def test_every_published_port_is_documented(compose):
    doc = DOC.read_text()
    header = COMPOSE.read_text().split("services:")[0]
    for name in compose["services"]:
        for host in _published(compose, name):
            assert re.search(rf"^\|\s*`?{host}`?\s*\|", doc, re.M), f"port {host} not in doc table"
            assert re.search(rf"#\s+{host}\s", header), f"port {host} not in compose header"


# --------------------------------------------------------------------------- collector
def test_collector_receives_otlp_on_all_interfaces(collector):
    protos = collector["receivers"]["otlp"]["protocols"]
    assert protos["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protos["http"]["endpoint"] == "0.0.0.0:4318"
    _pipeline_components(collector)
    traces = collector["service"]["pipelines"]["traces"]
    assert "batch" in traces["processors"]
    assert {"otlp/jaeger", "otlp/tempo", "spanmetrics", "signaltometrics"} <= set(
        traces["exporters"]
    )


def test_collector_exporters_reach_compose_services(collector, jaeger, tempo, compose):
    listens = {
        "jaeger": {
            _listen_port(p["endpoint"]) for p in jaeger["receivers"]["otlp"]["protocols"].values()
        },
        "tempo": {
            _listen_port(p["endpoint"])
            for p in tempo["distributor"]["receivers"]["otlp"]["protocols"].values()
        },
    }
    for eid in ("otlp/jaeger", "otlp/tempo"):
        host, port = _host_port(collector["exporters"][eid]["endpoint"])
        assert host in compose["services"], f"{eid} points at unknown service {host}"
        assert port in listens[host], f"{eid}: {host} does not listen on {port}"
        # the otlp exporter speaks gRPC: the port must be the gRPC one
        grpc = jaeger["receivers"] if host == "jaeger" else tempo["distributor"]["receivers"]
        assert _listen_port(grpc["otlp"]["protocols"]["grpc"]["endpoint"]) == port


def test_collector_gpu_time_histogram_per_api(collector):
    assert {"name": "flashinfer.api"} in collector["connectors"]["spanmetrics"]["dimensions"]
    metrics = {m["name"]: m for m in collector["connectors"]["signaltometrics"]["spans"]}
    gpu = metrics["flashinfer.gpu.time"]
    assert gpu["unit"] == "ns"
    assert [a["key"] for a in gpu["attributes"]] == ["flashinfer.api"]
    assert 'attributes["flashinfer.gpu.time_ns"]' in gpu["histogram"]["value"]
    buckets = gpu["histogram"]["buckets"]
    assert buckets == sorted(buckets) and buckets[0] <= 1_000 and buckets[-1] >= 1e9
    replay = metrics["flashinfer.cuda_graph.replay.gpu.time"]
    assert 'name == "cuda_graph.replay"' in replay["conditions"][0]
    # replays REPLAY_EVERY left untraced, as each traced replay's span counts them
    skipped = metrics["flashinfer.cuda_graph.replays_skipped"]
    assert 'name == "cuda_graph.replay"' in skipped["conditions"][0]
    assert skipped["sum"]["value"] == 'Int(attributes["flashinfer.cuda_graph.replays_skipped"])'
    # delta output of signaltometrics is made cumulative before Prometheus sees it
    pipes = collector["service"]["pipelines"]
    stm = [p for p in pipes.values() if "signaltometrics" in (p.get("receivers") or [])]
    assert stm and all("deltatocumulative" in p["processors"] for p in stm)


def test_prometheus_scrapes_the_collector(collector, compose):
    prom = _load(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    exporter_port = _listen_port(collector["exporters"]["prometheus"]["endpoint"])
    self_port = collector["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"][
        "prometheus"
    ]["port"]
    assert f"otel-collector:{exporter_port}" in targets
    assert f"otel-collector:{self_port}" in targets
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert "otel-collector-self" in jobs  # the dashboard's "Collector up" panel reads it


# --------------------------------------------------------------------------- tempo/jaeger
def test_tempo_config(tempo, compose):
    assert tempo["storage"]["trace"]["backend"] == "local"
    assert tempo["server"]["http_listen_port"] == 3200
    assert _published(compose, "tempo") == {3200: 3200}
    rw = tempo["metrics_generator"]["storage"]["remote_write"][0]["url"]
    assert _host_port(rw) == ("prometheus", 9090)
    assert "--web.enable-remote-write-receiver" in compose["services"]["prometheus"]["command"]
    assert "local-blocks" in tempo["overrides"]["defaults"]["metrics_generator"]["processors"]
    mounted = [v.split(":")[1] for v in compose["services"]["tempo"]["volumes"]]
    assert any(
        c.endswith("-config.file=" + m)
        for c in compose["services"]["tempo"]["command"]
        for m in mounted
    )


def test_jaeger_config(jaeger, compose):
    _pipeline_components(jaeger)
    backends = jaeger["extensions"]["jaeger_storage"]["backends"]
    assert jaeger["extensions"]["jaeger_query"]["storage"]["traces"] in backends
    assert jaeger["exporters"]["jaeger_storage_exporter"]["trace_storage"] in backends
    assert _listen_port(jaeger["extensions"]["jaeger_query"]["http"]["endpoint"]) == 16686
    assert _published(compose, "jaeger") == {16686: 16686}
    ui_path = jaeger["extensions"]["jaeger_query"]["ui"]["config_file"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["jaeger"]["volumes"]}
    assert mounts[ui_path] == "./deploy/jaeger/ui-config.json"
    health = jaeger["extensions"]["healthcheckv2"]["http"]["endpoint"]
    assert str(_listen_port(health)) in compose["services"]["jaeger"]["healthcheck"]["test"][1]


def test_jaeger_links_lead_to_manifest_and_pull_command(compose):
    ui = json.loads((DEPLOY / "jaeger" / "ui-config.json").read_text())
    links = ui["linkPatterns"]
    blob_port = next(h for h, c in _published(compose, "blob-links").items())
    tag_links = [p for p in links if p["type"] == "tags" and p["key"] == "flashinfer.blob.manifest"]
    assert any(
        p["url"] == f"http://localhost:{blob_port}/blob/#{{flashinfer.blob.manifest}}"
        for p in tag_links
    )
    trace_links = [p for p in links if p["type"] == "traces"]
    assert trace_links and all("#{traceID}" in p["url"] for p in trace_links)
    assert any(
        re.search(r"otel-flashinfer pull #\{traceID\} --blob-url s3://" + BUCKET, p["text"])
        for p in trace_links
    )


# --------------------------------------------------------------------------- blob-links
def _nginx_locations() -> dict[str, re.Pattern]:
    conf = (DEPLOY / "blob-links" / "nginx.conf").read_text()
    return {
        m.group(1).split("/")[1]: re.compile(m.group(1))
        for m in re.finditer(r'location ~ "(\^[^"]+)"', conf)
    }


def _example_manifest_url() -> tuple[str, str, str]:
    trace, span, start = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1732530000000000000
    try:
        from otel_flashinfer.blobs import layout

        key = layout.manifest_key(trace, start, span)
    except ImportError:  # blob store not in this checkout: the layout it documents
        key = f"traces/{trace}/{start:020d}-{span}.json"
    return f"s3://{BUCKET}/{key}", key, trace


def test_blob_links_route_a_manifest_url_to_its_key():
    locs = _nginx_locations()
    url, key, trace = _example_manifest_url()
    # What Jaeger sends (encodeURIComponent) and what nginx matches (decoded, slashes merged).
    sent = "/blob/" + quote(url, safe="")
    seen = re.sub(r"/+", "/", unquote(sent))
    m = locs["blob"].match(seen)
    assert m and m.group(1) == key
    assert locs["blob"].match(unquote(sent)).group(1) == key  # merge_slashes off, too
    assert not locs["blob"].match("/blob/s3:/other-bucket/" + key)
    assert not locs["blob"].match("/blob/s3:/flashinfer-blobs/objects/ab/x.safetensors")
    assert locs["trace"].match(f"/trace/{trace}").group(1) == trace
    assert locs["list"].match(f"/list/{trace}")
    conf = (DEPLOY / "blob-links" / "nginx.conf").read_text()
    assert "prefix=traces/$1/" in conf and "s3:8333" in conf
    assert f"otel-flashinfer pull $1 --blob-url s3://{BUCKET}" in conf


def test_s3_credentials_agree(compose):
    ids = {i["name"]: i for i in json.loads((DEPLOY / "s3" / "s3.json").read_text())["identities"]}
    cred = ids["flashinfer"]["credentials"][0]
    env = compose["services"]["s3-init"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        cred["accessKey"],
        cred["secretKey"],
    )
    assert env["S3_BUCKET"] == BUCKET and _host_port(env["S3_ENDPOINT"]) == ("s3", 8333)
    assert "Write" in ids["flashinfer"]["actions"]
    anon = ids["anonymous"]["actions"]
    assert anon and all(
        a.split(":")[0] in ("Read", "List") and a.endswith(":" + BUCKET) for a in anon
    )
    doc = DOC.read_text()
    assert cred["accessKey"] in doc and cred["secretKey"] in doc


# --------------------------------------------------------------------------- grafana
def test_grafana_datasources(datasources, compose):
    by_type = {d["type"]: d for d in datasources}
    assert set(by_type) == {"prometheus", "tempo", "jaeger"}
    assert len({d["uid"] for d in datasources}) == 3
    for ds in datasources:
        host, port = _host_port(ds["url"])
        assert host in compose["services"]
        assert port in _published(compose, host).values(), f"{ds['name']}: {host}:{port}"
        t2m = ds.get("jsonData", {}).get("tracesToMetrics")
        if t2m:
            assert t2m["datasourceUid"] == by_type["prometheus"]["uid"]
            assert {"key": "flashinfer.api", "value": "flashinfer_api"} in t2m["tags"]
            for q in t2m["queries"]:
                assert "$$__tags" in q["query"]  # $$ keeps Grafana from env-expanding it
    assert by_type["tempo"]["jsonData"]["tracesToMetrics"]
    assert by_type["jaeger"]["jsonData"]["tracesToMetrics"]


def test_grafana_dashboard_provider_matches_mount(compose):
    prov = _load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")
    path = prov["providers"][0]["options"]["path"]
    assert f"./dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    env = compose["services"]["grafana"]["environment"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (DASHBOARDS / home[len(path) + 1 :]).is_file()


def test_dashboards_use_provisioned_datasources(dashboards, datasources):
    uids = {d["uid"]: d["type"] for d in datasources}
    for fname, dash in dashboards.items():
        assert dash["uid"] and dash["title"]
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
        for panel in dash["panels"]:
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
            for ds in [panel.get("datasource")] + [
                t.get("datasource") for t in panel.get("targets") or []
            ]:
                if ds is not None:
                    assert uids.get(ds["uid"]) == ds["type"], f"{fname}/{panel['title']}: {ds}"
        for var in dash["templating"]["list"]:
            assert uids.get(var["datasource"]["uid"]) == var["datasource"]["type"]


def test_dashboard_queries_name_real_metrics_and_attributes(dashboards, collector):
    produced = _produced_metrics(collector)
    label_attrs = {a.replace(".", "_"): a for a in STACK_ATTRIBUTES}
    for dash in dashboards.values():
        exprs = [t["expr"] for _, t in _targets(dash) if "expr" in t]
        exprs += [v["definition"] for v in dash["templating"]["list"]]
        for expr in exprs:
            for name in re.findall(r"\b([a-z_]+)\{", expr):
                assert name in produced or name in ("rate", "increase"), f"{name} in {expr}"
            for rx in re.findall(r'__name__=~"([^"]+)"', expr):
                assert any(re.fullmatch(rx, n) for n in produced), rx
            for label in re.findall(r"\b(flashinfer_[a-z_]+)\s*(?:[=!~]|[,)])", expr):
                assert label in label_attrs, f"label {label} is no stack attribute"
        for _, t in _targets(dash):
            if t.get("queryType") == "traceql":
                for attr in re.findall(r"span\.(flashinfer\.[a-z_.]+[a-z_])", t["query"]):
                    assert attr in STACK_ATTRIBUTES, f"{attr} in {t['query']}"


def test_dashboard_covers_the_issue(dashboards):
    text = json.dumps(list(dashboards.values()))
    exprs = [t.get("expr") or t.get("query") for d in dashboards.values() for _, t in _targets(d)]
    joined = "\n".join(e for e in exprs if e)
    assert "rate(traces_span_metrics_calls_total" in joined  # request rate
    assert 'status_code="STATUS_CODE_ERROR"' in joined  # error rate
    for q in ("0.5", "0.95", "0.99"):  # percentiles
        assert f"histogram_quantile({q}, sum by (le, flashinfer_api) (rate(traces_span" in joined
    assert "{ span.flashinfer.nonfinite = true" in joined  # TraceQL
    assert 'span_name="cuda_graph.replay"' in joined  # replays
    # ... and replays run, traced or not: the traced ones' rate plus what they skipped
    assert re.search(r'span_name="cuda_graph\.replay"\}\[\$__rate_interval\]\)\) \+ '
                     r'\(sum\(rate\(\{__name__=~"flashinfer_cuda_graph_replays_skipped', joined)
    assert '{ name = "cuda_graph.replay" }' in joined
    assert "span.flashinfer.blob.manifest != nil" in joined  # blobs
    assert "span.flashinfer.blob.skipped != nil" in joined
    assert "flashinfer_blob_written" in joined and "flashinfer_blob_skipped" in joined
    assert "flashinfer_gpu_time_nanoseconds_bucket" in joined  # GPU time
    assert "http://localhost:8334/blob/${__value.raw:percentencode}" in text


def test_stack_attributes_exist_in_design():
    design = _design_text()
    if design is None:
        pytest.skip("DESIGN.md not found next to the repository")
    named = set(re.findall(r"`(flashinfer\.[a-z_.]+[a-z_])", design))
    named |= set(re.findall(r"(flashinfer\.[a-z_.]+[a-z_])\s*=", design))
    missing = STACK_ATTRIBUTES - named
    assert not missing, f"not in DESIGN.md: {missing}"
    assert "cuda_graph.replay" in design and "{ span.flashinfer.nonfinite = true }" in design


def test_configs_use_only_stack_attributes(collector):
    text = (DEPLOY / "otel-collector" / "config.yaml").read_text()
    text += (DEPLOY / "jaeger" / "ui-config.json").read_text()
    found = set(re.findall(r'["{ ](flashinfer\.[a-z_.]+[a-z_])["}\]]', text))
    found -= {m["name"] for m in collector["connectors"]["signaltometrics"]["spans"]}
    assert found and found <= STACK_ATTRIBUTES, found - STACK_ATTRIBUTES


# --------------------------------------------------------------------------- docs recipe
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3():
    """A real S3 API (moto_server) on 127.0.0.1, standing in for the stack's SeaweedFS."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto_server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("endpoint_var", ["AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"])
def test_documented_blob_env_reaches_the_s3_server(moto_s3, endpoint_var):
    """The env recipe of docs/viewing-stack.md makes fsspec/s3fs talk to the stack's S3."""
    doc = DOC.read_text()
    assert f"{endpoint_var}=http://localhost:8333" in doc
    assert f"OTEL_FLASHINFER_BLOB_URL=s3://{BUCKET}" in doc
    tid = "a" * 32
    script = textwrap.dedent(f"""
        import boto3, fsspec
        try:
            boto3.client("s3", endpoint_url="{moto_s3}").create_bucket(Bucket="{BUCKET}")
        except Exception as exc:  # created by the other parametrization
            assert "BucketAlready" in type(exc).__name__ + str(exc), exc
        url = "s3://{BUCKET}/traces/{tid}/probe.json"
        with fsspec.open(url, "wb") as f:
            f.write(b'{{"ok": true}}')
        fs = fsspec.filesystem("s3")
        print(sorted(fs.ls("{BUCKET}/traces/{tid}")))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "flashinfer",
            "AWS_SECRET_ACCESS_KEY": "flashinfer-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            endpoint_var: moto_s3,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{BUCKET}/traces/{tid}/probe.json" in proc.stdout

"""Settings: every DESIGN.md variable parses, and a bad value names itself."""

from __future__ import annotations

import pytest

from otel_flashinfer import config
from otel_flashinfer.config import REPLAY_AUTO, ConfigError, Settings, load_settings


def test_defaults_match_design() -> None:
    s = load_settings({})
    assert s == Settings()
    assert (s.level, s.blob_url, s.blob_max_gb, s.blob_max_count) == (
        0, "./flashinfer_blobs", 20.0, 1000)
    assert (s.blob_format, s.replay_every, s.stats_max_mb) == ("safetensors", 1, 64.0)
    assert (s.journal_dir, s.crash_safe) == ("./flashinfer_journal", False)


def test_every_variable_parses() -> None:
    env = {
        "OTEL_FLASHINFER_LEVEL": "10",
        "OTEL_FLASHINFER_INCLUDE": "Batch*, single_*",
        "OTEL_FLASHINFER_EXCLUDE": "*.plan",
        "OTEL_FLASHINFER_BLOB_URL": "s3://bucket/prefix",
        "OTEL_FLASHINFER_BLOB_MAX_GB": "0.5",
        "OTEL_FLASHINFER_BLOB_MAX_COUNT": "7",
        "OTEL_FLASHINFER_BLOB_FORMAT": "torch",
        "OTEL_FLASHINFER_REPLAY_EVERY": "4",
        "OTEL_FLASHINFER_STATS_MAX_MB": "16",
        "OTEL_FLASHINFER_JOURNAL_DIR": "",
        "OTEL_FLASHINFER_CRASH_SAFE": "1",
    }
    s = load_settings(env)
    assert s.level == 10
    assert s.include == ("Batch*", "single_*")
    assert s.exclude == ("*.plan",)
    assert s.blob_url == "s3://bucket/prefix"
    assert s.blob_max_gb == 0.5 and s.blob_max_count == 7
    assert s.blob_format == "torch" and s.replay_every == 4 and s.stats_max_mb == 16.0
    auto = load_settings({"OTEL_FLASHINFER_REPLAY_EVERY": " Auto ",
                          "OTEL_FLASHINFER_REPLAY_BUDGET": "0.02"})
    assert (auto.replay_every, auto.replay_budget) == (REPLAY_AUTO, 0.02)
    assert s.journal_dir == "" and s.crash_safe is True


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("OTEL_FLASHINFER_LEVEL", "2", "one of 0, 1, 3, 5, 10"),
        ("OTEL_FLASHINFER_LEVEL", "high", "not a number"),
        ("OTEL_FLASHINFER_BLOB_MAX_GB", "-1", "positive"),
        ("OTEL_FLASHINFER_BLOB_MAX_GB", "nan", "positive"),
        ("OTEL_FLASHINFER_BLOB_MAX_COUNT", "0", ">= 1"),
        # past a signed 64-bit budget counter: every payload would be lost, silently
        ("OTEL_FLASHINFER_BLOB_MAX_GB", "1e12", "at most 1,000,000,000 GB"),
        ("OTEL_FLASHINFER_BLOB_MAX_GB", "1e300", "at most"),
        ("OTEL_FLASHINFER_BLOB_MAX_COUNT", str(2**63), "at most"),
        ("OTEL_FLASHINFER_STATS_MAX_MB", "1e30", "at most"),
        ("OTEL_FLASHINFER_BLOB_FORMAT", "pickle", "safetensors, torch"),
        ("OTEL_FLASHINFER_REPLAY_EVERY", "1.5", "not a number or auto"),
        ("OTEL_FLASHINFER_REPLAY_EVERY", "0", ">= 1, or auto"),
        ("OTEL_FLASHINFER_REPLAY_BUDGET", "0", "(0, 1]"),
        ("OTEL_FLASHINFER_REPLAY_BUDGET", "1.5", "(0, 1]"),
        ("OTEL_FLASHINFER_REPLAY_BUDGET", "nan", "(0, 1]"),
        ("OTEL_FLASHINFER_CRASH_SAFE", "maybe", "0 or 1"),
        ("OTEL_FLASHINFER_BLOB_URL", "s3 x://bucket", "scheme"),
        ("OTEL_FLASHINFER_BLOB_URL", "gopher://host/x", "'gopher' that fsspec does not know"),
        ("OTEL_FLASHINFER_BLOB_URL", "nocache::s3://b/x", "'nocache' that fsspec does not know"),
        ("OTEL_FLASHINFER_BLOB_URL", "::s3://b/x", "invalid URL scheme"),
        ("OTEL_FLASHINFER_BLOB_URL", "S3://b/x", "'S3' that fsspec does not know"),
        ("OTEL_FLASHINFER_BLOB_URL", "my::blobs", "'my' that fsspec does not know"),
    ],
)
def test_bad_values_name_variable_and_value(var: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({var: value})
    message = str(err.value)
    assert var in message and repr(value) in message and fragment in message


@pytest.mark.parametrize(
    "url", ["./blobs", "/abs/blobs", "file:///tmp/b", "s3://bucket/p", "memory://b",
            "simplecache::s3://bucket/p"])
def test_known_blob_urls_parse(url: str) -> None:
    assert load_settings({"OTEL_FLASHINFER_BLOB_URL": url}).blob_url == url


def test_a_protocol_registered_at_run_time_is_known() -> None:
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.memory import MemoryFileSystem

    class Registered(MemoryFileSystem):
        protocol = "otelfitest"

    fsspec.register_implementation("otelfitest", Registered, clobber=True)
    url = "otelfitest://bucket/x"
    assert load_settings({"OTEL_FLASHINFER_BLOB_URL": url}).blob_url == url


def test_an_empty_value_is_unset() -> None:
    """OpenTelemetry's rule: an empty variable is unset (a template's ``VAR=``).  GPU
    timing and the native encoder read it as off before (on by default), and an empty
    traces file dropped every span; the journal's empty value is its documented off."""
    empty = {var: "" for var in config.ENV_VARS}
    empty["OTEL_FLASHINFER_GPU_TIMING"] = " "
    assert load_settings(empty) == Settings(journal_dir="")
    assert load_settings({}).gpu_timing and load_settings({}).native_export
    # as arguments, empty is still a bad value, named
    with pytest.raises(ConfigError, match="traces_file"):
        load_settings({}, traces_file="")
    with pytest.raises(ConfigError, match="gpu_timing"):
        load_settings({}, gpu_timing="")


def test_empty_level_is_off_as_the_start_up_hook_reads_it() -> None:
    assert load_settings({"OTEL_FLASHINFER_LEVEL": " "}).level == 0
    assert load_settings({"OTEL_FLASHINFER_LEVEL": ""}, level=10).level == 10


def test_overrides_win_and_are_checked() -> None:
    s = load_settings({"OTEL_FLASHINFER_LEVEL": "1"}, level=5, include=["a*", "b"])
    assert s.level == 5 and s.include == ("a*", "b")
    with pytest.raises(ConfigError, match=r"level \(argument\)='4'"):
        load_settings({}, level=4)
    with pytest.raises(ConfigError, match="unknown setting 'levle'"):
        load_settings({}, levle=3)


def test_env_var_names_are_ours_only() -> None:
    assert all(v.startswith("OTEL_FLASHINFER_") for v in config.ENV_VARS)
    assert "OTEL_FLASHINFER_LEVEL" in config.ENV_VARS


def test_jit_cache_root_follows_the_variable() -> None:
    assert config.jit_cache_root({"OTEL_FLASHINFER_CACHE_DIR": "/x/y"}) == "/x/y"
    assert config.jit_cache_root({}).endswith("/.cache/otel_flashinfer")


@pytest.mark.parametrize(("env", "fragment"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": "abc"},
     "OTEL_EXPORTER_OTLP_TIMEOUT='abc'"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
      "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "needs http:// or https://"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter 'zipkin'"),
    # the value the exporter reads: the traces-specific one
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
      "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT='0'"),
    # values the gRPC exporter takes and then refuses (or fails every export with)
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": ""},
     "OTEL_EXPORTER_OTLP_TIMEOUT=''"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": "inf"},
     "seconds > 0"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318", "OTEL_EXPORTER_OTLP_PROTOCOL":
      "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "seconds > 0"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
      "OTEL_EXPORTER_OTLP_COMPRESSION": "none"}, "OTLP/gRPC takes gzip"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
      "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "deflate"}, "OTLP/gRPC takes gzip"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
      "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": ""}, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=''"),
    # our provider's BatchSpanProcessor: refused, or replaced by a default unseen
    ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE='0'"),
    ({"OTEL_BSP_SCHEDULE_DELAY": "5s"}, "OTEL_BSP_SCHEDULE_DELAY='5s'"),
    ({"OTEL_BSP_MAX_QUEUE_SIZE": "100"}, "more than OTEL_BSP_MAX_QUEUE_SIZE=100"),
    # a sampler the SDK would replace by always-on, a ratio by 1.0
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratoi"}, "unknown sampler"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0,01"},
     "OTEL_TRACES_SAMPLER_ARG='0,01'"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "ratio from 0 to 1"),
])
def test_otlp_settings_the_exporter_would_refuse_name_their_variable(env, fragment) -> None:
    from otel_flashinfer.provider import check_env

    with pytest.raises(ConfigError, match=fragment.replace("*", r"\*")):
        check_env(env)


def test_valid_otlp_settings_pass() -> None:
    from otel_flashinfer.provider import check_env

    check_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4317",  # gRPC takes host:port
               "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    check_env({})
    # OTLP/HTTP reads an empty timeout or compression as unset; deflate is its own
    check_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TIMEOUT": "",
               "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate",
               "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": " "})
    # a generic value the exporter does not read (the traces-specific one hides it)
    check_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
               "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "5", "OTEL_EXPORTER_OTLP_TIMEOUT": "",
               "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
               "OTEL_EXPORTER_OTLP_COMPRESSION": "none", "OTEL_BSP_EXPORT_TIMEOUT": "0"})
    check_env({"OTEL_BSP_MAX_QUEUE_SIZE": "8192", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2000",
               "OTEL_BSP_SCHEDULE_DELAY": "30000",
               "OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio",
               "OTEL_TRACES_SAMPLER_ARG": "0.01"})


def test_an_exporter_a_package_registers_is_made_by_its_name(tmp_path, monkeypatch) -> None:
    """OTEL_TRACES_EXPORTER names what packages register (zipkin, vendors'), as the
    SDK reads it: made with no arguments, its failures counted like our OTLP's."""
    from otel_flashinfer import health
    from otel_flashinfer.provider import check_env, make_exporter

    dist = tmp_path / "fake_exporter-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-exporter\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[opentelemetry_traces_exporter]\nfake_json = fake_exporter_mod:Exporter\n")
    (tmp_path / "fake_exporter_mod.py").write_text(
        "from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult\n"
        "class Exporter(SpanExporter):\n"
        "    def export(self, spans):\n"
        "        return SpanExportResult.FAILURE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {"OTEL_TRACES_EXPORTER": "fake_json,otlp_file"}
    check_env(env)
    exporter = make_exporter("fake_json", env, str(tmp_path / "t.jsonl"))
    assert type(exporter.inner).__name__ == "Exporter"
    before = health.counters().get("spans_dropped", 0)
    exporter.export([object(), object()])
    assert health.counters().get("spans_dropped", 0) == before + 2


_HALF_ON = """
import time, otel_flashinfer as of
from otel_flashinfer import runtime
try:
    of.instrument(level=3, journal_dir="") if {explicit} else None
except Exception as exc:
    print("refused:", exc)
f = of.traced(lambda a: a, name="f")
f(0)
t = time.perf_counter()
for i in range(2000):
    f(i)
print("off" if runtime.current() is None else "on", (time.perf_counter() - t) / 2000 * 1e6)
print(of.counters())
"""


@pytest.mark.parametrize("explicit", [True, False])
def test_a_bad_otlp_setting_leaves_nothing_half_on(tmp_path, explicit) -> None:
    """instrument() raises naming the variable, or (tracing from OTEL_FLASHINFER_LEVEL
    alone) tracing stays off, said once.  A runtime left active rebuilt its provider on
    every traced call: 630 us a call.  In a process of its own: no provider set yet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
               OTEL_EXPORTER_OTLP_TIMEOUT="abc", OTEL_FLASHINFER_AUTOSTART="0")
    if not explicit:
        env["OTEL_FLASHINFER_LEVEL"] = "3"
    out = subprocess.run([sys.executable, "-c", _HALF_ON.format(explicit=explicit)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if explicit:
        assert lines[0].startswith("refused: OTEL_EXPORTER_OTLP_TIMEOUT='abc'")
        lines = lines[1:]
    else:
        assert "tracing is off: OTEL_EXPORTER_OTLP_TIMEOUT='abc'" in out.stderr
        assert "'config_errors': 1" in lines[1]
    state, per_call_us = lines[0].split()
    assert state == "off" and float(per_call_us) < 50, lines

"""Every refusal of pull/replay, tried with a crafted store or bundle."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import io
import json
import os
import sys
import textwrap
import uuid

import pytest
import torch

from otel_flashinfer.blobs import layout
from otel_flashinfer.blobs.capture import BlobRecorder
from otel_flashinfer.blobs.manifest import ManifestError
from otel_flashinfer.config import Settings
from otel_flashinfer.replay.bundle import load_bundle
from otel_flashinfer.replay.pull import BundleError, pull
from otel_flashinfer.replay.runner import replay

TRACE = 0x42


def mul(x, y):
    return x * y


@pytest.fixture
def store(tmp_path):
    """A store with one recorded call of ``mul``; returns (path, manifest path)."""
    root = tmp_path / "store"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    cap = rec.before("mul", __name__, "mul", None, TRACE, 1, None, 10,
                     inspect.signature(mul).bind(x, 3.0))
    cap.after(mul(x, 3.0), None)
    assert rec.flush(10)
    return root, root / cap.manifest_key


def edit(path, fn):
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_hash_mismatch_refused(store, tmp_path):
    root, mpath = store
    key = json.loads(mpath.read_text())["args"][0]["value"]["key"]
    obj = root / key
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="hash mismatch") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)


@pytest.mark.parametrize("key", ["../../../../evil.safetensors", "/etc/passwd",
                                 "objects/aa/../../x.safetensors"])
def test_path_traversal_in_key_refused(store, tmp_path, key):
    root, mpath = store
    edit(mpath, lambda m: m["args"][0]["value"].update(key=key))
    with pytest.raises(ManifestError, match="object key") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)
    assert not (tmp_path / "evil.safetensors").exists()


def test_path_traversal_in_bundle_index_refused(store, tmp_path):
    root, _ = store
    b = tmp_path / "b"
    pull(TRACE, str(root), str(b))
    index = json.loads((b / "index.json").read_text())
    index["calls"][0]["manifest"] = "manifests/../../outside.json"
    (b / "index.json").write_text(json.dumps(index))
    with pytest.raises(BundleError, match=r"index\.json"):
        load_bundle(str(b))


def test_bad_argument_name_refused(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m["args"][0].update(name="../x"))
    with pytest.raises(ManifestError, match="not an identifier"):
        pull(TRACE, str(root), str(tmp_path / "b"))


def test_module_outside_allow_list_not_imported(tmp_path, capsys):
    name = f"fi_evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f'''
        open({str(marker)!r}, "w").write("imported")
        def mul(x, y):
            return x * y
    '''))
    root = tmp_path / "s"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    cap = rec.before("mul", name, "mul", None, TRACE, 1, None, 1,
                     inspect.signature(mul).bind(torch.ones(2), 2.0))
    cap.after(mul(torch.ones(2), 2.0), None)
    assert rec.flush(10)
    marker.unlink(missing_ok=True)
    pull(TRACE, str(root), str(tmp_path / "b"))
    sys.path.insert(0, str(tmp_path))
    try:
        report = replay(str(tmp_path / "b"), allow_modules=["flashinfer_*"])
    finally:
        sys.path.remove(str(tmp_path))
    assert report.failed == 1 and "outside flashinfer.*" in report.results[0].detail
    assert not marker.exists() and name not in sys.modules
    assert "0 passed, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize("allow", [["flashinfer_*"], ["__main__"]])
def test_a_call_of_the_recorded_scripts_main_is_refused_with_the_way_out(
        tmp_path, capsys, allow):
    """A function defined in the script the program ran records as ``__main__``.
    Replay's own ``__main__`` is not that script, even with ``--allow-module
    __main__`` (which used to fail with "has no attribute"): one line says why and
    what to do instead."""
    root = tmp_path / "s"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    cap = rec.before("mul", "__main__", "mul", None, TRACE, 1, None, 1,
                     inspect.signature(mul).bind(torch.ones(2), 2.0))
    cap.after(mul(torch.ones(2), 2.0), None)
    assert rec.flush(10)
    pull(TRACE, str(root), str(tmp_path / "b"))
    report = replay(str(tmp_path / "b"), allow_modules=allow)
    assert report.failed == 1
    detail = report.results[0].detail
    assert "(__main__), which replay cannot import" in detail, detail
    assert "--allow-module" in detail and "a module the program imports" in detail
    assert "0 passed, 1 failed" in capsys.readouterr().out


def system(command):  # the signature a crafted manifest binds its argument with
    pass


@pytest.mark.parametrize(("module", "qualname", "refusal"), [
    ("flashinfer", "_os.system", "private"),  # what flashinfer itself imported
    ("{helper}", "os.system", "leads to module 'os'"),  # an allowed module's import
    ("{helper}", "system", "an object of 'posix'"),  # `from os import system` there
])
def test_a_qualname_cannot_walk_out_of_the_allowed_modules(tmp_path, capsys, module,
                                                           qualname, refusal):
    """An allowed module's imports are not allowed code: a manifest naming
    ``flashinfer`` + ``_os.system`` must not run a shell command."""
    pytest.importorskip("flashinfer")
    helper = f"fi_ok_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{helper}.py").write_text("import os\nfrom os import system\n")
    marker = tmp_path / "pwned"
    root = tmp_path / "s"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    cap = rec.before("system", module.format(helper=helper), qualname, None, TRACE, 1,
                     None, 1, inspect.signature(system).bind(f"touch {marker}"))
    cap.after(0, None)
    assert rec.flush(10)
    pull(TRACE, str(root), str(tmp_path / "b"))
    sys.path.insert(0, str(tmp_path))
    try:
        report = replay(str(tmp_path / "b"), allow_modules=[helper])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(helper, None)
    assert not marker.exists()
    assert report.failed == 1 and refusal in report.results[0].detail, report.results
    assert "0 passed, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["object", "manifest"])
@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "oversized"])
def test_store_files_are_read_within_their_size(store, tmp_path, what, kind):
    """A local store is untrusted too: a link to /dev/zero must not fill memory, a FIFO
    must not hang the pull, and a file past its manifest's size is not read whole."""
    root, mpath = store
    key = json.loads(mpath.read_text())["args"][0]["value"]["key"]
    target = root / key if what == "object" else mpath
    target.unlink()
    if kind == "dev_zero":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.write_bytes(b"x" * (70 * 2**20 if what == "manifest" else 10**6))
    expected = "not a regular file" if kind != "oversized" else "larger than"
    with pytest.raises(BundleError, match=expected):
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_a_refused_pull_writes_nothing(store, tmp_path):
    """The argument's object is fine and the result's is not: nothing of the bundle is
    left behind, not even the verified object, nor the folder it was made in."""
    root, mpath = store
    m = json.loads(mpath.read_text())
    obj = root / m["result"]["key"]
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    obj.write_bytes(bytes(data))
    before = set(os.listdir(tmp_path))
    with pytest.raises(BundleError, match="hash mismatch"):
        pull(TRACE, str(root), str(tmp_path / "b"), workers=1)
    assert set(os.listdir(tmp_path)) == before


def test_sizes_past_any_tensor_are_refused_by_name(store, tmp_path):
    root, mpath = store

    def huge(m):
        m["args"][0]["value"]["shape"] = [2**64, 2]
    edit(mpath, huge)
    with pytest.raises(ManifestError, match=r"argument x.*past 2\^62"):
        pull(TRACE, str(root), str(tmp_path / "b"))


def test_a_stride_0_argument_is_rebuilt_with_its_strides(store, tmp_path):
    """An expanded tensor (stride 0) is rebuilt as one, not made dense: 2^40 elements
    addressed by one stored element must not allocate 4 TB."""
    root, mpath = store

    def expanded(m):
        m["args"][0]["value"].update(shape=[2**40], stride=[0], storage_offset=5)
    edit(mpath, expanded)
    pull(TRACE, str(root), str(tmp_path / "b"))
    (call,) = load_bundle(str(tmp_path / "b"))
    x = call.args[0].value
    assert x.shape == (2**40,) and x.stride() == (0,) and x[123].item() == 5.0


def test_a_value_torch_refuses_is_a_clear_refusal(store, tmp_path):
    root, mpath = store

    def bogus(m):
        m["args"][1]["value"] = {"t": "device", "v": "bogus"}
    edit(mpath, bogus)
    pull(TRACE, str(root), str(tmp_path / "b"))
    with pytest.raises(BundleError, match=r"argument y\): cannot be rebuilt"):
        load_bundle(str(tmp_path / "b"), device=None)  # devices as recorded


def first(*xs):
    return xs[0]


def test_var_positional_that_is_not_a_sequence_is_refused(tmp_path, capsys):
    root = tmp_path / "s"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    cap = rec.before("first", __name__, "first", None, TRACE, 1, None, 1,
                     inspect.signature(first).bind(torch.ones(2)))
    cap.after(torch.ones(2), None)
    assert rec.flush(10)

    def scalar(m):
        m["args"][0]["value"] = 1.5
    edit(root / cap.manifest_key, scalar)
    pull(TRACE, str(root), str(tmp_path / "b"))
    report = replay(str(tmp_path / "b"), allow_modules=[__name__])
    assert report.failed == 1 and "*xs is a float" in report.results[0].detail


def test_shape_disagreeing_with_bytes_refused(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m["args"][0]["value"].update(shape=[4, 3]))
    with pytest.raises(BundleError, match="needs 12 elements, object holds 6") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)


def test_dtype_disagreeing_with_bytes_refused(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m["args"][0]["value"].update(dtype="int64"))
    with pytest.raises(BundleError, match="manifest says int64"):
        pull(TRACE, str(root), str(tmp_path / "b"))


def test_rank_mismatch_refused(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m["args"][0]["value"].update(stride=[1]))
    with pytest.raises(ManifestError, match="differ in rank"):
        pull(TRACE, str(root), str(tmp_path / "b"))


def test_malformed_json_refused(store, tmp_path):
    root, mpath = store
    mpath.write_bytes(b'{"schema": 1, "api": ')
    with pytest.raises(ManifestError, match="malformed JSON") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)


def test_manifest_ids_must_match_name(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m.update(span_id="00000000000000ff"))
    with pytest.raises(BundleError, match="do not match its name"):
        pull(TRACE, str(root), str(tmp_path / "b"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/otel_fi_pwned_marker",))


def test_pickle_in_torch_format_refused(tmp_path):
    if os.path.exists("/tmp/otel_fi_pwned_marker"):
        os.unlink("/tmp/otel_fi_pwned_marker")
    root = tmp_path / "s"
    settings = dataclasses.replace(Settings(blob_url=str(root)), blob_format="torch")
    rec = BlobRecorder(settings, install_handlers=False)
    cap = rec.before("mul", __name__, "mul", None, TRACE, 1, None, 1,
                     inspect.signature(mul).bind(torch.ones(2), 2.0))
    cap.after(mul(torch.ones(2), 2.0), None)
    assert rec.flush(10)
    buf = io.BytesIO()
    torch.save({"t": _Evil()}, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = layout.object_key(digest, "torch")
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(data)
    mpath = root / cap.manifest_key
    edit(mpath, lambda m: m["args"][0]["value"].update(hash=digest, key=key, nbytes=len(data)))
    with pytest.raises(BundleError, match="refused by default; pass --allow-pickle"):
        pull(TRACE, str(root), str(tmp_path / "b"))
    # asked for, torch's weights_only loader still refuses what is not a tensor
    with pytest.raises(BundleError, match="weights_only load"):
        pull(TRACE, str(root), str(tmp_path / "b"), allow_pickle=True)
    assert not os.path.exists("/tmp/otel_fi_pwned_marker")


def test_missing_trace_is_clear(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(BundleError, match="no manifests for trace"):
        pull(0x99, str(tmp_path / "s"), str(tmp_path / "b"))


def test_cli_bad_arguments(tmp_path, capsys):
    from otel_flashinfer.replay.cli import main

    assert main(["pull", "nothex", "--blob-url", str(tmp_path), "-o", str(tmp_path / "b")]) == 1
    assert "not 32 hex digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(tmp_path), "--rtol", "-1"])
    assert main(["replay", str(tmp_path / "none")]) == 1
    assert "cannot read bundle index" in capsys.readouterr().err
    # a device this machine does not have is the option's error, said once
    bad_devices = ["garbage", *([] if torch.cuda.is_available() else ["cuda:0"])]
    for device in bad_devices:
        with pytest.raises(SystemExit):
            main(["replay", str(tmp_path), "--device", device])
        err = capsys.readouterr().err
        assert f"argument --device: {device!r}" in err and "Traceback" not in err


def test_ls_shows_a_stores_names_without_control_characters(tmp_path, capsys,
                                                            monkeypatch):
    """What a store names (a process' service) is untrusted text for the terminal."""
    from otel_flashinfer.replay.cli import main

    monkeypatch.setenv("OTEL_SERVICE_NAME", "svc\x1b]0;pwned\x07")
    root = tmp_path / "store"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    x = torch.ones(2)
    cap = rec.before("mul", __name__, "mul", None, TRACE, 1, None, 10,
                     inspect.signature(mul).bind(x, 3.0))
    cap.after(mul(x, 3.0), None)
    assert rec.flush(10)
    assert main(["ls", "--blob-url", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07" in out


@pytest.mark.parametrize("bad", ["", "0", "00" * 16, "zz", "1" * 33])
def test_ids_that_name_no_trace_are_refused(bad):
    from otel_flashinfer.blobs import layout

    with pytest.raises(ValueError, match="trace id"):
        layout.trace_hex(bad)
    with pytest.raises(ValueError, match="span id"):
        layout.span_hex(bad[:17] if bad != "1" * 33 else "1" * 17)


def test_store_names_with_a_trailing_newline_are_refused():
    """Store names are matched whole: a regex's `$` would let a trailing newline in."""
    from otel_flashinfer.blobs import layout

    with pytest.raises(ValueError, match="not a manifest name"):
        layout.parse_manifest_name("00000000000000000010-0000000000000001.json\n")
    with pytest.raises(ValueError):
        layout.check_object_key("objects/ab/" + "ab" * 32 + ".safetensors\n", "ab" * 32,
                                "safetensors")


def replay_from_dump(dump_dir, compare_outputs=False, device="cuda", run=False):
    pass  # the signature a crafted manifest binds its arguments with


def test_only_flashinfer_api_entry_points_are_called(tmp_path, capsys):
    """``flashinfer.*`` is allowed for its ``@flashinfer_api`` entry points, not for the
    rest of the package: FlashInfer's own ``api_logging.replay_from_dump`` imports and
    calls whatever its dump names, so a manifest naming it ran a shell command."""
    pytest.importorskip("flashinfer")
    marker = tmp_path / "pwned"
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "metadata.jsonl").write_text(json.dumps(
        {"function_name": "system", "module": "os",
         "input_metadata": {"arg_0": f"touch {marker}"}}) + "\n")
    (dump / "inputs.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    root = tmp_path / "s"
    rec = BlobRecorder(Settings(blob_url=str(root)), install_handlers=False)
    cap = rec.before("replay_from_dump", "flashinfer.api_logging", "replay_from_dump", None,
                     TRACE, 1, None, 1, inspect.signature(replay_from_dump).bind(
                         str(dump), device="cpu", run=True))
    cap.after(None, None)
    assert rec.flush(10)
    pull(TRACE, str(root), str(tmp_path / "b"))
    report = replay(str(tmp_path / "b"))
    assert not marker.exists()
    assert report.failed == 1, report.results
    detail = report.results[0].detail
    assert "flashinfer.api_logging.replay_from_dump is not a FlashInfer API entry point" \
        in detail, detail
    assert "0 passed, 1 failed" in capsys.readouterr().out


def test_an_enum_argument_resolves_to_an_enum_member_only(tmp_path):
    """A recorded enum names its class and member; one naming a function instead (to
    hand it to the call) is refused."""
    from otel_flashinfer.replay.bundle import EnumRef
    from otel_flashinfer.replay.runner import ReplayRefused, _materialize

    allow = (__name__,)
    assert _materialize(EnumRef(f"{__name__}:Mode", "B"), allow, "m") is Mode.B
    for bad in (EnumRef(f"{__name__}:system", "x"), EnumRef(__name__, "B"),
                EnumRef(f"{__name__}:Mode", "C"), EnumRef(f"{__name__}:Mode.B", "name")):
        with pytest.raises(ReplayRefused):
            _materialize(bad, allow, "m")


class Mode(enum.Enum):
    A = 1
    B = 2


@pytest.mark.parametrize("what", ["object", "manifest", "index"])
@pytest.mark.parametrize("kind", ["fifo", "sparse"])
def test_bundle_files_are_read_within_their_size(store, tmp_path, what, kind):
    """A bundle (unpacked from anywhere) is untrusted like a store: a FIFO in it must
    not hang the replay, nor a sparse file of a gigabyte be read whole."""
    root, mpath = store
    bundle = tmp_path / "b"
    pull(TRACE, str(root), str(bundle))
    m = json.loads(mpath.read_text())
    path = {"object": bundle / m["args"][0]["value"]["key"],
            "manifest": next((bundle / "manifests").iterdir()),
            "index": bundle / "index.json"}[what]
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as fh:
            fh.truncate(1 << 30)
    with pytest.raises(BundleError) as err:
        load_bundle(str(bundle))
    assert str(path) in str(err.value)
    assert ("not a regular file" if kind == "fifo" else "expected") in str(err.value)


@pytest.mark.parametrize(("change", "refusal"), [
    (lambda m: m.update(status="crashed", error="boom"), "error must be null or"),
    (lambda m: m.update(status="error", error=[1]), "error must be null or"),
    (lambda m: m.update(skipped={"why": 1}), "skipped must be a string"),
    (lambda m: m["args"][0]["value"].update(nbytes=10**30), "nbytes must be at most"),
    (lambda m: m.update(extra=float("nan")), "NaN is not JSON"),
    # a dtype that is a list or an object: once a raw TypeError (unhashable)
    (lambda m: m["args"][0]["value"].update(dtype=["float32"]), "unknown dtype"),
    (lambda m: m["args"][1].update(value={"t": "dtype", "v": {}}), "unknown dtype"),
])
def test_manifest_fields_replay_reads_are_checked_at_pull(store, tmp_path, change, refusal):
    """What the runner reads of a manifest (its error, skipped, sizes) is checked when
    it is pulled: a string ``error`` used to end the replay in a traceback."""
    root, mpath = store
    edit(mpath, change)
    with pytest.raises(ManifestError, match=refusal) as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)
    assert not (tmp_path / "b").exists()


def test_a_manifest_nested_past_the_parser_is_refused_by_name(store, tmp_path):
    root, mpath = store
    mpath.write_text("[" * 100_000)
    with pytest.raises(ManifestError, match="nested too deep") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)


def test_a_missing_object_names_the_manifest_that_named_it(store, tmp_path):
    root, mpath = store
    key = json.loads(mpath.read_text())["args"][0]["value"]["key"]
    (root / key).unlink()
    with pytest.raises(BundleError, match="object objects/") as err:
        pull(TRACE, str(root), str(tmp_path / "b"))
    assert mpath.name in str(err.value)
    assert not (tmp_path / "b").exists()


def test_replay_says_what_it_could_not_compare_and_goes_on(store, tmp_path):
    """A recorded result that is not a tensor where the call returns one: the call
    fails with why, the next calls still run, and the summary line is written."""
    from otel_flashinfer.replay.runner import compare

    assert compare(torch.ones(3), 5, None, None) == "result: got a tensor, recorded int 5"
    root, mpath = store
    edit(mpath, lambda m: m.update(result=5))
    pull(TRACE, str(root), str(tmp_path / "b"))
    out = io.StringIO()
    report = replay(str(tmp_path / "b"), allow_modules=(__name__,), out=out)
    assert (report.passed, report.failed) == (0, 1)
    assert "got a tensor, recorded int 5" in out.getvalue()
    assert out.getvalue().endswith("0 passed, 1 failed\n")


def test_replay_lines_show_a_bundles_names_without_control_characters(store, tmp_path):
    root, mpath = store
    edit(mpath, lambda m: m.update(api="mul\x1b]0;pwned\x07"))
    pull(TRACE, str(root), str(tmp_path / "b"))
    out = io.StringIO()
    replay(str(tmp_path / "b"), allow_modules=(__name__,), out=out)
    assert "\x1b" not in out.getvalue() and "mul\\x1b]0;pwned\\x07" in out.getvalue()


def test_cli_errors_and_devices_are_checked(store, tmp_path, capsys):
    from otel_flashinfer.replay.cli import main

    with pytest.raises(SystemExit):
        main(["replay", str(tmp_path), "--device", "meta"])
    assert "holds no data" in capsys.readouterr().err
    root, _ = store
    assert main(["pull", "--blob-url", str(root), "--process", "\u00b2",
                 "-o", str(tmp_path / "b")]) == 1
    assert "--process '\u00b2'" in capsys.readouterr().err


def test_a_process_info_nested_too_deep_falls_back_to_its_folder_name(store):
    from otel_flashinfer.blobs import index
    from otel_flashinfer.blobs.store import BlobStore

    root, _ = store
    st = BlobStore(str(root), check_writable=False)
    (process,) = index.list_processes(st)
    (root / layout.process_info_key(process)).write_text("[" * 50_000)
    info = index.read_info(st, process)
    assert info["service"] == "" and info["process"] == process

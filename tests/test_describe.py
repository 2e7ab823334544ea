"""Arguments -> attributes: the DESIGN.md keys, bounded, for every kind of value."""

from __future__ import annotations

import dataclasses
import enum

import pytest
import torch

from otel_flashinfer import describe


def attrs(value: object, name: str = "x") -> dict:
    return describe.attributes(f"flashinfer.arg.{name}", describe.snapshot(value))


def test_tensor_facts() -> None:
    t = torch.zeros(4, 6, dtype=torch.float16)[:, ::2]
    a = attrs(t, "q")
    assert a == {
        "flashinfer.arg.q.shape": (4, 3),
        "flashinfer.arg.q.dtype": "float16",
        "flashinfer.arg.q.stride": (6, 2),
        "flashinfer.arg.q.device": "cpu",
        "flashinfer.arg.q.contiguous": False,
    }


def test_scalars_none_strings_enums() -> None:
    class Layout(enum.Enum):
        NHD = 0

    assert attrs(0.125) == {"flashinfer.arg.x": 0.125}
    assert attrs(True) == {"flashinfer.arg.x": True}
    assert attrs(None) == {"flashinfer.arg.x": "None"}
    assert attrs("NHD") == {"flashinfer.arg.x": "NHD"}
    assert attrs(Layout.NHD) == {"flashinfer.arg.x.type": "Layout.NHD"}
    assert attrs(2**70) == {"flashinfer.arg.x": str(2**70)}
    long = attrs("y" * 5000)["flashinfer.arg.x"]
    assert len(long) == describe.MAX_STR and long.endswith("...")


def test_nested_containers_are_bounded() -> None:
    value = (torch.ones(2), [1, 2.5, "a"], {"k": torch.ones(3, dtype=torch.int32)})
    a = attrs(value, "kv")
    assert a["flashinfer.arg.kv.len"] == 3
    assert a["flashinfer.arg.kv.0.shape"] == (2,)
    assert a["flashinfer.arg.kv.1.2"] == "a"
    assert a["flashinfer.arg.kv.2.k.dtype"] == "int32"
    many = attrs(list(range(100)))
    assert many["flashinfer.arg.x.len"] == 100
    assert "flashinfer.arg.x.7" in many and "flashinfer.arg.x.8" not in many
    deep = attrs([[[[[1]]]]])
    assert deep["flashinfer.arg.x.0.0.0.type"] == "list"


def test_dataclass_and_opaque() -> None:
    @dataclasses.dataclass
    class Cfg:
        page_size: int
        scale: float = 1.0

    a = attrs(Cfg(16))
    assert a["flashinfer.arg.x.type"].endswith("Cfg")
    assert a["flashinfer.arg.x.page_size"] == 16 and a["flashinfer.arg.x.scale"] == 1.0
    assert attrs(object()) == {"flashinfer.arg.x.type": "object"}


def test_results_tuple_and_single() -> None:
    out = describe.result_attributes(describe.snapshot((torch.ones(2, 2), 3)))
    assert out["flashinfer.result.0.shape"] == (2, 2) and out["flashinfer.result.1"] == 3
    single = describe.result_attributes(describe.snapshot(torch.ones(5)))
    assert single["flashinfer.result.0.shape"] == (5,)


def test_snapshot_is_not_affected_by_later_mutation() -> None:
    items = [torch.ones(2)]
    snap = describe.snapshot(items)
    items.append(torch.ones(3))
    assert describe.attributes("p", snap)["p.len"] == 1



def test_contiguity_from_shape_and_stride_matches_torch() -> None:
    base = torch.zeros(4, 1, 6, 8)
    views = [base, base[:, :, ::2], base.transpose(0, 2), base[:, :, 1:3], base[..., :1],
             torch.zeros(0, 3)[:, ::2], base.expand(4, 5, 6, 8), torch.zeros(5)[::5],
             base.permute(0, 2, 1, 3)]
    for view in views:
        facts = describe.snapshot(view)
        got = describe.attributes("t", facts)["t.contiguous"]
        assert got == view.is_contiguous(), (tuple(view.shape), view.stride())


def test_the_c_hot_path_snapshots_like_describe() -> None:
    """``_hotpath.snapshot`` (tensors and scalars read in C) equals ``describe.snapshot``
    value for value and type for type; anything else it hands to describe."""
    import enum

    from opentelemetry import context

    from otel_flashinfer import native

    if native.entry_type(context._RUNTIME_CONTEXT._current_context) is None:  # noqa: SLF001
        pytest.skip("built without the C hot path")
    from otel_flashinfer import _hotpath

    class Mode(enum.Enum):
        A = 1

    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    values = [None, True, 0, -(1 << 70), 1.5, "NHD", "x" * 600, Mode.A, base, base[:, 1:],
              base.transpose(0, 2), torch.zeros(()), torch.empty(0, 5, dtype=torch.int8),
              torch.nn.Parameter(torch.ones(2)), torch.ones(2, 3).to_sparse(), (base, 3),
              [1, 2.0], {"k": base}]
    for value in values:
        ours, theirs = _hotpath.snapshot(value), describe.snapshot(value)
        assert ours == theirs, value
        assert type(ours) is type(theirs)
        if isinstance(ours, tuple):
            assert [type(x) for x in ours] == [type(x) for x in theirs]

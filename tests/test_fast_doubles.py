"""The span encoder's JSON doubles (csrc/fast_double.h, Grisu2) read back as the very
same doubles: level-5 statistics (min, max, mean) and float attributes go out as
OTLP/JSON numbers, and a value that came back different would be a wrong statistic."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
from test_native_export import _sdk_tracer

from otel_flashinfer import export
from otel_flashinfer.otlp_json import json_to_request
from otel_flashinfer.pipeline import _EMPTY, CallRecord

pytest.importorskip("otel_flashinfer._otlp", reason="native encoder not built")

SPECIAL = [0.0, -0.0, 0.1, 0.5, 1.0, -1.0, 100.0, 1e16, 1e17, 1e21, 1e22, 1e-5, 1e-4,
           123.456, 0.30000000000000004, 5e-324, 2.2250738585072014e-308,
           1.7976931348623157e308, -1.7976931348623157e308, 65504.0, 6.103515625e-05,
           float(2**53), float(2**53 + 2), 3.4028234663852886e38, 1.401298464324817e-45]


def _values(n: int) -> list[float]:
    rng = random.Random(7)
    out = list(SPECIAL)
    while len(out) < n:
        kind = len(out) % 5
        if kind == 0:  # any bit pattern
            v = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        elif kind == 1:  # a float32 value, as fp16/bf16/fp32 tensors' min and max are
            v = struct.unpack("<f", rng.getrandbits(32).to_bytes(4, "little"))[0]
        elif kind == 2:  # a mean
            v = rng.gauss(0, 1) * 10 ** rng.randint(-12, 12)
        elif kind == 3:  # integers
            v = float(rng.randint(-10**9, 10**9))
        else:  # subnormals
            v = struct.unpack("<d", (rng.getrandbits(52)).to_bytes(8, "little"))[0]
        if math.isfinite(v):
            out.append(v)
    return out


def test_doubles_in_json_read_back_exactly() -> None:
    values = _values(20_000)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "json", CallRecord, _EMPTY)
    per_span = 100
    for s in range(0, len(values), per_span):
        attrs = {f"v{i}": v for i, v in enumerate(values[s:s + per_span])}
        encoder.add(CallRecord.for_call("doubles", 1, 1 + s, None, attrs))
    payload = encoder.take().decode()
    json.loads(payload)  # valid JSON, numbers and all
    got = []
    for span in json_to_request(payload).resource_spans[0].scope_spans[0].spans:
        got.extend(kv.value.double_value for kv in span.attributes)
    assert len(got) == len(values)
    bad = [(v, g) for v, g in zip(values, got, strict=True)
           if struct.pack("<d", v) != struct.pack("<d", g)]
    assert bad == []

// What the CUDA event pool (event_pool.cpp, built by torch's JIT where CUDA exists)
// lends the C hot path (hotpath.c, built without torch) through a capsule named
// "otel_flashinfer.hotpath_api": pooled timing events and tensor facts read from the
// C++ tensor instead of through Python attributes.  The span encoder (otlp_encoder.c)
// borrows the same capsule to resolve GPU times without Python.
#pragma once
#include <Python.h>
#include <stdint.h>

#define OTEL_FLASHINFER_HOTPATH_API_VERSION 2

typedef struct {
  int version;
  // Records a pooled event on the current stream: its slot, or <0 (-1 pool full,
  // -3 the record failed).
  int64_t (*record)(void);
  void (*release)(int64_t slot);
  // 1: a CUDA tensor, 0: another tensor, -1: not a tensor.
  int (*is_cuda)(PyObject* obj);
  // describe.snapshot of a plain tensor, (dtype, device, ndim, *shape, *stride); NULL
  // without an exception set when it is not one this fast path handles.
  PyObject* (*snapshot)(PyObject* obj);
  // Version 2: the GPU ns between two slots in one driver call, -(1 << 40) while the
  // end is pending, else the negated CUDA error (the span encoder resolves with it).
  int64_t (*resolve)(int64_t start, int64_t end);
} otel_flashinfer_hotpath_api;

// What the statistics extension (tensor_stats.cpp, built by torch's JIT where CUDA
// exists) lends the span encoder (otlp_encoder.c, built without torch) through a capsule
// named "otel_flashinfer.stats_api": a query of a ring slot's completion event, so the
// worker can resolve a level-5 call's statistics without running Python per record.
#pragma once
#include <stdint.h>

#define OTEL_FLASHINFER_STATS_API_VERSION 1

typedef struct {
  int version;
  // 0: the event has completed, 1: not yet, otherwise the CUDA error code (cleared).
  int64_t (*event_query)(int64_t event);
} otel_flashinfer_stats_api;

// Host side of a statistics launch, shared by the torch binding (tensor_stats.cpp) and
// the level-5 span hooks (stats_hooks.cpp): how one tensor is described to the kernel,
// and how a list of them becomes launches.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <optional>
#include <vector>

#include "tensor_stats.h"

namespace pybind11 {
class module_;
}

namespace otel_fi {

// One tensor of a launch and the work it brings (elements; an upper bound for paged).
struct Item {
  TensorDesc d;
  int64_t work;
};

// Where a launch publishes (LaunchDesc::counter ...); counter null: accumulate only.
struct Publish {
  unsigned int* counter = nullptr;
  int64_t* publish = nullptr;
  int64_t row_lo = 0, row_hi = 0;
  bool rezero = false;
  int64_t* stamp_start = nullptr;  // LaunchDescT: set on the first launch of the list
  int64_t* stamp_end = nullptr;    // LaunchDescT: set on the last launch of the list
  int64_t* stamp_also = nullptr;   // LaunchDescT: with stamp_start, the same stamp
  const int32_t* gate = nullptr;   // LaunchDescT: every launch of the list reads it
  bool branch = false;  // on our branch stream beside the call (gate_nodes.cpp notes it)
};

// The kernel's DType code of a torch dtype, or `otherwise` for one it does not read.
int32_t dtype_code_or(at::ScalarType t, int32_t otherwise);

// Multiprocessors of `device` (cached).
int sm_count_of(int device);

// The kernel's view of `t` read into output row `row`: every `step`-th element, or for
// a paged cache the pages that indices[indptr[0]:indptr[batch]] reference.  Raises
// (c10::Error) on a tensor the kernel cannot read.
Item describe(const at::Tensor& t, int64_t row, int64_t step,
              const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& indptr,
              int64_t batch);

// Paged item `it` of cache `t`: leave out the slots past each request's last_page_len
// (int32 [batch], on the cache's device).  `slot_dim` counts the slot axis from the end
// of a page's dims: 3 for FlashInfer's NHD layout, 2 for HND; 0, or a page with fewer
// dims, leaves the item unmasked.  Raises (c10::Error) on an unreadable last_page_len.
void mask_last_page(Item& it, const at::Tensor& t, const at::Tensor& last_page_len,
                    int64_t slot_dim);

// Launches the statistics of `items` into `out` on `stream` (several launches past
// kMaxTensorsPerLaunch), publishing as `pub` says.  Raises on a launch error.
void launch_items(std::vector<Item>& items, int64_t* out, cudaStream_t stream, int sm_count,
                  const Publish& pub);

// Level 10 (page_fingerprint.cu): the pages of contiguous `cache` that
// indices[:n] reference, clamped to its pages, gathered into a new tensor, and per
// page (id, fingerprint lane 0, lane 1) as int64 [n, 3], in one launch on the current
// stream.  `weights`: int64 [2, page bytes / 4] (blobs/fingerprint.py).
std::vector<at::Tensor> gather_fingerprints(const at::Tensor& cache, const at::Tensor& indices,
                                            int64_t n, const at::Tensor& weights);

// Adds level 10's staging functions (and gather_fingerprints) to the extension
// module (blob_staging.cpp).
void register_blob_staging(pybind11::module_& m);

// Adds make_span_hooks to the extension module (stats_hooks.cpp).
void register_span_hooks(pybind11::module_& m);

// `stream`'s capture dependency set into `deps`: 1 while it captures, 0 where it does
// not, -1 where CUDA would not say (the error cleared) (gate_nodes.cpp).
int capture_set(cudaStream_t stream, std::vector<cudaGraphNode_t>* deps);

// A gated launch just made on `stream`: under capture, its graph node is noted by its
// gate word, so that untraced replays can switch it off (gate_nodes.cpp), with whether
// it ran on our branch stream beside its call (a copy without it joins nothing around
// it: lean_rules.h).
void note_gated_node(cudaStream_t stream, const int32_t* gate, bool branch);

// The nodes noted for `gate` into `out` (and whether each is on a branch into
// `branch`); false where there are none or one of its launches could not be told
// (gate_nodes.cpp).
bool gate_nodes_of(const int32_t* gate, std::vector<cudaGraphNode_t>* out,
                   std::vector<bool>* branch = nullptr);

// Adds gate_nodes, gate_nodes_set and gate_nodes_forget (gate_nodes.cpp).
void register_gate_nodes(pybind11::module_& m);

// Adds lean_graph_make, lean_graph_destroy, lean_graph_launch and the lean_launch
// capsule (lean_graph.cpp).
void register_lean_graph(pybind11::module_& m);

}  // namespace otel_fi

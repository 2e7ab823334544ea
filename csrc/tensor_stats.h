// Shared between the CUDA kernel (tensor_stats_kernel.cu) and the torch binding
// (tensor_stats.cpp). Plain C++ so both compilers see the same layout.
#pragma once
#include <cstdint>

namespace otel_fi {

constexpr int kMaxDims = 8;
constexpr int kMaxTensorsPerLaunch = 16;  // keeps kernel params < 4 KB
constexpr int kRowWords = 8;              // int64 words per output row
// Block shape of the kernel: its __launch_bounds__ guarantee kStatsMinBlocksPerSm
// resident blocks of kStatsThreads threads per SM, so a grid of
// sm_count * kStatsMinBlocksPerSm blocks is one full wave (launch_items sizes to it).
constexpr int kStatsThreads = 256;
constexpr int kStatsMinBlocksPerSm = 3;

// Output row layout (int64 words, zero before the launch):
//  0 min   : atomicMax of ~ord(x)   (0 = no non-NaN value seen)
//  1 max   : atomicMax of  ord(x)
//  2 sum   : double bits, atomicAdd over finite values
//  3 finite: count of finite values
//  4 nan   : count of NaN values
//  5 inf   : count of +-Inf values
//  6 seen  : elements covered (sample size / referenced-page elements)
//  7 spare : a GPU-time stamp where a call's launches leave one (stats_hooks.cpp)
enum RowField { kMin = 0, kMax, kSum, kFinite, kNan, kInf, kSeen };

enum DType : int32_t {
  kF32 = 0, kF16, kBF16, kF8E4M3, kF8E5M2, kI8, kU8, kI32, kI64, kBool, kF64
};

enum Mode : int32_t { kFull = 0, kSampled = 1, kPaged = 2 };

// One tensor (or one half of a (k, v) cache pair) of a launch.
// For kPaged, sizes/strides describe ONE page (dims 1..), page_stride is dim 0's
// stride, and the referenced pages are indices[indptr[0] .. indptr[batch]).
struct TensorDesc {
  const void* ptr;          // data pointer incl. storage offset
  int64_t n;                // elements to cover (full/sampled); per page for paged
  int64_t step;             // sampled: logical index stride (1 = full)
  int64_t page_stride;      // paged: elements between pages
  const int32_t* indices;   // paged: page indices
  const int32_t* indptr;    // paged: [batch + 1]
  // paged, optional: tokens in each request's last page ([batch]); slots of a last page
  // at or past it are not read (a stale NaN there is no call's data).  A logical index
  // r within a page lies in slot (r / slot_stride) % page_size.
  const int32_t* last_page_len;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];
  int32_t batch;
  int32_t ndim;
  int32_t dtype;
  int32_t mode;
  int32_t row;              // output row this tensor accumulates into
  int32_t contiguous;       // 1: offset == logical index (within a page for paged)
  int32_t block_begin;      // first block of the grid assigned to this tensor
  int32_t nblocks;          // blocks assigned
  int32_t slot_stride;      // paged with last_page_len: elements per slot step
  int32_t page_size;        // paged with last_page_len: slots per page
  // paged: pages in the cache and entries of indices.  A page id or an indptr bound
  // outside them is left out, never dereferenced: an engine's bad indices must fault in
  // its own kernel, not in ours before it (that would also poison the context before a
  // crash-safe level-10 capture of the call is written).
  int32_t num_pages;
  int32_t num_indices;
};

// A launch accumulates into `out` (see launch_tensor_stats).  With `counter` set, the
// launch also publishes: the last block to finish (counted on *counter, a device word
// that is zero at rest) copies rows [row_lo, row_hi) of `out` to the same rows of
// `publish` (device memory, or pinned host memory through its device pointer), then,
// if `rezero`, writes zeros back to those rows of `out`, and resets *counter to 0.  So
// accumulation rows that start zero stay zero at rest and no memset or copy is needed
// around the launch.  Rows of the range that no tensor touches publish as zeros.
// Launches sharing a counter must be stream-ordered (each leaves it 0 when done).
//
// GPU-time stamps (level 5 times a call with its two statistics launches instead of two
// CUDA events): `stamp_start`, when set, gets %globaltimer from block 0 as the launch
// starts; `stamp_end`, when set, gets it from the publishing block after the rows landed.
// `stamp_also` gets block 0's stamp too: a launch forked beside its call (a captured
// graph's branch) stamps both the call's start and the graph's anchor with one read.
//
// `gate`, when set, is a device word read as the launch starts: zero, and every block
// returns at once (no rows, no stamps, no count).  A captured graph's launches share
// one gate, which the host sets in stream order before each replay, so replays that
// are not traced cost the GPU an empty launch instead of a pass over the tensors.
template <int MaxT>
struct LaunchDescT {
  TensorDesc t[MaxT];
  unsigned int* counter;  // null: accumulate only (caller zeroes and copies)
  int64_t* publish;
  int64_t* stamp_start;
  int64_t* stamp_end;
  int64_t* stamp_also;
  const int32_t* gate;    // null: always run
  int32_t row_lo;
  int32_t row_hi;
  int32_t rezero;
  int32_t count;          // tensors; 0 with counter set: publish only (one block)
};
using LaunchDesc = LaunchDescT<kMaxTensorsPerLaunch>;
// Launches of at most kSmallLaunch tensors (most calls: a decode's inputs are q and
// its cache) pass this quarter-size copy: the driver copies every parameter byte into
// its command buffer on the caller's thread, so 4 KB of mostly unused descriptors
// would cost host time on every launch.
constexpr int kSmallLaunch = 4;
using SmallLaunchDesc = LaunchDescT<kSmallLaunch>;
static_assert(sizeof(LaunchDesc) < 4000, "kernel parameters must stay below 4 KB");

// Whether launches of few tensors pass SmallLaunchDesc (a benchmark compares both).
extern bool small_launches;

// Launches the statistics kernel for desc.count tensors on `stream`.
// `out` is an int64 device buffer of rows*kRowWords words: zeroed by the caller, or
// zero at rest (desc.counter set, rezero).  Returns a cudaError_t as int.

int launch_tensor_stats(const LaunchDesc& desc, int total_blocks, int threads,
                        int64_t* out, void* stream);

// Copies `words` int64 from device memory `src` to `dst` (device memory, or pinned host
// memory through its device address) on `stream`; with `head`, dst[head_at] gets *head
// and dst[head_at + 1] the GPU clock as the copy starts.  Returns a cudaError_t as int.
int launch_copy_rows(const int64_t* src, int64_t* dst, int64_t words, void* stream,
                     const int64_t* head = nullptr, int64_t head_at = -1);

// The kernel that writes the GPU clock (%globaltimer, ns) into its one argument, a
// device word (long long*): a captured graph's head node (lean_graph.cpp, head_stamp_node).
const void* head_stamp_kernel_fn();

}  // namespace otel_fi

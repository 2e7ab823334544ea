// Torch binding of the statistics kernel: builds the launch descriptor on the
// host, launches on the current stream and, for eager calls (stats_slot), has the
// kernel publish its rows straight into a pinned host slot (no memset, no copy) and
// records an event, all in one Python->C++ call so the per-call host cost stays a
// few microseconds.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "stats_launch.h"
#include "tensor_stats.h"
#include "stats_api.h"

namespace otel_fi {

constexpr int kThreads = 256;

int32_t dtype_code_or(at::ScalarType t, int32_t otherwise) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat8_e4m3fn: return kF8E4M3;
    case at::kFloat8_e5m2: return kF8E5M2;
    case at::kChar: return kI8;
    case at::kByte: return kU8;
    case at::kInt: return kI32;
    case at::kLong: return kI64;
    case at::kBool: return kBool;
    case at::kDouble: return kF64;
    default: return otherwise;
  }
}

namespace {

int32_t dtype_code(at::ScalarType t) {
  const int32_t code = dtype_code_or(t, -1);
  TORCH_CHECK(code >= 0, "otel_flashinfer stats: unsupported dtype ", t);
  return code;
}

// Drops size-1 dims and merges dims that are contiguous with each other.
int coalesce(at::IntArrayRef sizes, at::IntArrayRef strides, size_t first, int64_t* out_sizes,
             int64_t* out_strides) {
  std::vector<int64_t> sz, st;
  for (size_t k = first; k < sizes.size(); ++k) {
    if (sizes[k] == 1) continue;
    if (!sz.empty() && st.back() == sizes[k] * strides[k]) {
      sz.back() *= sizes[k];
      st.back() = strides[k];
    } else {
      sz.push_back(sizes[k]);
      st.push_back(strides[k]);
    }
  }
  TORCH_CHECK(sz.size() <= static_cast<size_t>(kMaxDims),
              "otel_flashinfer stats: more than 8 non-mergeable dims");
  for (size_t k = 0; k < sz.size(); ++k) {
    out_sizes[k] = sz[k];
    out_strides[k] = st[k];
  }
  return static_cast<int>(sz.size());
}

}  // namespace

int sm_count_of(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0)
      n = 132;
    cache[device] = n;
  }
  return cache[device];
}

Item describe(const at::Tensor& t, int64_t row, int64_t step,
              const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& indptr,
              int64_t batch) {
  Item it{};
  TensorDesc& d = it.d;
  const int64_t item = t.element_size();
  d.ptr = t.data_ptr();
  d.dtype = dtype_code(t.scalar_type());
  d.row = static_cast<int32_t>(row);
  d.step = 1;
  const bool aligned = reinterpret_cast<uintptr_t>(d.ptr) % 16 == 0;
  if (indices.has_value()) {
    TORCH_CHECK(indptr.has_value() && t.dim() >= 1, "paged stats need a [pages, ...] cache");
    TORCH_CHECK(indices->scalar_type() == at::kInt && indptr->scalar_type() == at::kInt,
                "paged stats need int32 indices and indptr");
    TORCH_CHECK(indices->is_contiguous() && indptr->is_contiguous(),
                "paged stats need contiguous indices and indptr");
    TORCH_CHECK(t.size(0) <= INT32_MAX && indices->numel() <= INT32_MAX &&
                    indptr->numel() > batch,
                "paged stats need int32-countable pages and indices, and indptr of batch + 1");
    d.mode = kPaged;
    d.indices = indices->data_ptr<int32_t>();
    d.indptr = indptr->data_ptr<int32_t>();
    d.batch = static_cast<int32_t>(batch);
    d.num_pages = static_cast<int32_t>(t.size(0));
    d.num_indices = static_cast<int32_t>(indices->numel());
    d.page_stride = t.stride(0);
    d.ndim = coalesce(t.sizes(), t.strides(), 1, d.sizes, d.strides);
    d.n = t.size(0) ? t.numel() / t.size(0) : 0;
    const bool contig = d.ndim == 0 || (d.ndim == 1 && d.strides[0] == 1);
    d.contiguous = contig ? 1 : 0;
    if (contig && aligned && (d.page_stride * item) % 16 == 0 && (d.n * item) % 16 == 0)
      d.contiguous = 2;
    it.work = t.numel();
    return it;
  }
  d.ndim = coalesce(t.sizes(), t.strides(), 0, d.sizes, d.strides);
  const bool contig = d.ndim == 0 || (d.ndim == 1 && d.strides[0] == 1);
  d.contiguous = contig ? 1 : 0;
  const int64_t numel = t.numel();
  if (step > 1) {
    d.mode = kSampled;
    d.step = step;
    d.n = (numel + step - 1) / step;
  } else {
    d.mode = kFull;
    d.n = numel;
    if (contig && aligned) d.contiguous = 2;
  }
  it.work = d.n;
  return it;
}

void mask_last_page(Item& it, const at::Tensor& t, const at::Tensor& last_page_len,
                    int64_t slot_dim) {
  TensorDesc& d = it.d;
  if (d.mode != kPaged || slot_dim <= 0 || t.dim() - 1 < slot_dim) return;
  TORCH_CHECK(last_page_len.scalar_type() == at::kInt && last_page_len.is_contiguous() &&
                  last_page_len.numel() >= d.batch && last_page_len.device() == t.device(),
              "paged stats need a contiguous int32 last_page_len with one entry per request, "
              "on the cache's device");
  const int64_t axis = t.dim() - slot_dim;  // in t's dims: dim 0 is the page
  int64_t slot_stride = 1;
  for (int64_t k = axis + 1; k < t.dim(); ++k) slot_stride *= t.size(k);
  const int64_t page_size = t.size(axis);
  // The kernel finds a slot in 32-bit arithmetic; no real cache has 2^31 values per page.
  if (page_size <= 0 || slot_stride <= 0 || d.n >= (int64_t{1} << 31)) return;
  d.last_page_len = last_page_len.data_ptr<int32_t>();
  d.slot_stride = static_cast<int32_t>(slot_stride);
  d.page_size = static_cast<int32_t>(page_size);
  // The vector path masks whole 16-byte vectors: each must lie in one slot.
  if (d.contiguous == 2 && (slot_stride * t.element_size()) % 16 != 0) d.contiguous = 1;
}

void launch_items(std::vector<Item>& items, int64_t* out, cudaStream_t stream, int sm_count,
                  const Publish& pub) {
  static_assert(kThreads == kStatsThreads, "block size must match the kernel's launch bounds");
  // One launch is sized to about one wave of resident blocks, shared among its tensors
  // in proportion to their work: no second wave, and each output row sees at most a
  // few hundred block atomics.  A small tensor gets few blocks: at least one 4-deep
  // round of 16-byte loads per thread (vector paths) or 4 elements per thread (scalar
  // strided/sampled/paged paths, which cost more per element).
  static constexpr int kElemBytes[] = {4, 2, 2, 1, 1, 1, 1, 4, 8, 1, 8};  // by DType
  const int64_t wave = static_cast<int64_t>(std::max(sm_count, 1)) * kStatsMinBlocksPerSm;
  const int64_t vec_bytes_per_block = static_cast<int64_t>(kThreads) * 16 * 4;
  const int64_t scalar_elems_per_block = static_cast<int64_t>(kThreads) * 4;
  const bool publishing = pub.counter != nullptr;
  if (publishing) {
    // Each launch publishes its own rows: launches split at row boundaries (items in
    // row order), launch k owning rows [first row of k, first row of k+1).
    TORCH_CHECK(pub.publish != nullptr && 0 <= pub.row_lo && pub.row_lo <= pub.row_hi,
                "otel_flashinfer stats: bad publish range");
    for (const Item& it : items)
      TORCH_CHECK(it.d.row >= pub.row_lo && it.d.row < pub.row_hi,
                  "otel_flashinfer stats: row outside the published range");
    if (items.size() > static_cast<size_t>(kMaxTensorsPerLaunch))
      std::stable_sort(items.begin(), items.end(),
                       [](const Item& a, const Item& b) { return a.d.row < b.d.row; });
    if (items.empty()) {  // nothing to read: the rows still publish (as zeros)
      if (pub.row_hi == pub.row_lo) return;
      LaunchDesc ld{};
      ld.counter = pub.counter;
      ld.publish = pub.publish;
      ld.row_lo = static_cast<int32_t>(pub.row_lo);
      ld.row_hi = static_cast<int32_t>(pub.row_hi);
      ld.rezero = pub.rezero ? 1 : 0;
      ld.stamp_start = pub.stamp_start;
      ld.stamp_end = pub.stamp_end;
      ld.stamp_also = pub.stamp_also;
      ld.gate = pub.gate;
      int err = launch_tensor_stats(ld, 1, kThreads, out, stream);
      TORCH_CHECK(err == 0, "otel_flashinfer stats kernel: ",
                  cudaGetErrorString(static_cast<cudaError_t>(err)));
      note_gated_node(stream, ld.gate, pub.branch);
      return;
    }
  }
  size_t first = 0;
  while (first < items.size()) {
    LaunchDesc ld{};
    ld.gate = pub.gate;
    size_t last = std::min(items.size(), first + kMaxTensorsPerLaunch);
    if (publishing && last < items.size()) {
      while (last > first && items[last].d.row == items[last - 1].d.row) --last;
      TORCH_CHECK(last > first, "otel_flashinfer stats: more than ", kMaxTensorsPerLaunch,
                  " tensors in one row");
    }
    if (publishing) {
      ld.counter = pub.counter;
      ld.publish = pub.publish;
      ld.row_lo = static_cast<int32_t>(first == 0 ? pub.row_lo : items[first].d.row);
      ld.row_hi = static_cast<int32_t>(last == items.size() ? pub.row_hi : items[last].d.row);
      ld.rezero = pub.rezero ? 1 : 0;
      if (last == items.size()) ld.stamp_end = pub.stamp_end;  // the publishing block's
    }
    if (first == 0) {  // block 0's: no publish needed
      ld.stamp_start = pub.stamp_start;
      ld.stamp_also = pub.stamp_also;
    }
    int64_t want[kMaxTensorsPerLaunch];
    int64_t total_want = 0;
    for (size_t k = first; k < last; ++k) {
      const TensorDesc& d = items[k].d;
      const int64_t work = std::max<int64_t>(items[k].work, 0);
      int64_t nb;
      if (d.contiguous == 2) {
        const int esz = (d.dtype >= 0 && d.dtype <= kF64) ? kElemBytes[d.dtype] : 8;
        const int64_t bytes = work <= INT64_MAX / esz ? work * esz : INT64_MAX;
        nb = bytes / vec_bytes_per_block + (bytes % vec_bytes_per_block != 0);
      } else {
        nb = work / scalar_elems_per_block + (work % scalar_elems_per_block != 0);
      }
      nb = std::min(wave, std::max<int64_t>(1, nb));
      want[k - first] = nb;
      total_want += nb;
    }
    int blocks = 0;
    for (size_t k = first; k < last; ++k) {
      TensorDesc d = items[k].d;
      int64_t nb = want[k - first];
      if (total_want > wave) nb = std::max<int64_t>(1, nb * wave / total_want);
      d.block_begin = blocks;
      d.nblocks = static_cast<int32_t>(nb);
      blocks += static_cast<int>(nb);
      ld.t[ld.count++] = d;
    }
    int err = launch_tensor_stats(ld, blocks, kThreads, out, stream);
    TORCH_CHECK(err == 0, "otel_flashinfer stats kernel: ", cudaGetErrorString(
                                                              static_cast<cudaError_t>(err)));
    if (blocks > 0) note_gated_node(stream, ld.gate, pub.branch);  // only a launch made a node
    first = last;
  }
}

namespace {

// Statistics into `out` (zeroed first if `zero`); whether a kernel was launched.
bool run(at::Tensor& out, const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& rows,
         const std::vector<int64_t>& steps, const std::vector<std::optional<at::Tensor>>& indices,
         const std::vector<std::optional<at::Tensor>>& indptr, const std::vector<int64_t>& batch,
         const std::vector<std::optional<at::Tensor>>& last_page_len,
         const std::vector<int64_t>& slot_dim, cudaStream_t stream, bool zero,
         const Publish& pub, int64_t sm_limit = 0) {
  const size_t n = tensors.size();
  TORCH_CHECK(rows.size() == n && steps.size() == n && indices.size() == n &&
                  indptr.size() == n && batch.size() == n,
              "otel_flashinfer stats: argument lists differ in length");
  TORCH_CHECK((last_page_len.empty() || last_page_len.size() == n) &&
                  slot_dim.size() == last_page_len.size(),
              "otel_flashinfer stats: last_page_len and slot_dim must match the tensors");
  std::vector<Item> items;
  items.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    TORCH_CHECK(rows[k] >= 0 && rows[k] < out.size(0), "stats row out of range");
    if (tensors[k].numel() == 0) continue;
    items.push_back(describe(tensors[k], rows[k], steps[k], indices[k], indptr[k], batch[k]));
    if (!last_page_len.empty() && last_page_len[k].has_value())
      mask_last_page(items.back(), tensors[k], *last_page_len[k], slot_dim[k]);
  }
  int sm_count = sm_count_of(out.get_device());
  if (sm_limit > 0 && sm_limit < sm_count) sm_count = static_cast<int>(sm_limit);
  if (zero) {
    C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, out.numel() * out.element_size(), stream));
  }
  launch_items(items, out.data_ptr<int64_t>(), stream, sm_count, pub);
  return !items.empty() || (pub.counter != nullptr && pub.row_hi > pub.row_lo);
}

// Graph or caller-owned output: out is int64 [rows, 8] on the device.  Under capture a
// memset node + the launch cost less GPU time than the last-block publish.
// GPU-time stamps of a captured call (each an int64 device address, 0: none):
// `stamp_start` gets %globaltimer as the launch starts (the call before it has ended);
// `stamp_end` as it ends, which takes the last-block count on `counter` (a zeroed
// uint32 on the device, zero again after each launch): the rows are "published" onto
// themselves, so nothing is copied or re-zeroed.  Returns whether a kernel was launched
// (with no tensor to read and no end stamp, none is, and nothing is stamped).
// `stamp_also` gets the same stamp as `stamp_start` (a launch on a forked branch: the
// call's start and the graph's anchor).  `gate` (an int32 device address, 0: none):
// the launch does nothing on a replay where the word is zero (`gate_set`).  `sm_limit`
// (0: all) sizes the launch's wave as if the device had that many multiprocessors: a
// launch on a branch beside the call leaves the rest of the GPU to the call.  `branch`:
// the current stream is our branch beside the call (stats/overlap.py), which a copy of
// the graph without statistics must not join around (lean_rules.h).
bool stats_into(at::Tensor out, std::vector<at::Tensor> tensors, std::vector<int64_t> rows,
                std::vector<int64_t> steps, std::vector<std::optional<at::Tensor>> indices,
                std::vector<std::optional<at::Tensor>> indptr, std::vector<int64_t> batch,
                bool zero, std::vector<std::optional<at::Tensor>> last_page_len,
                std::vector<int64_t> slot_dim, int64_t counter, int64_t stamp_start,
                int64_t stamp_end, int64_t stamp_also, int64_t gate, int64_t sm_limit,
                bool branch) {
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  Publish pub{};
  pub.gate = reinterpret_cast<const int32_t*>(gate);
  pub.branch = branch;
  pub.stamp_start = reinterpret_cast<int64_t*>(stamp_start);
  pub.stamp_also = stamp_start != 0 ? reinterpret_cast<int64_t*>(stamp_also) : nullptr;
  if (counter != 0 && stamp_end != 0) {
    pub.counter = reinterpret_cast<unsigned int*>(counter);
    pub.publish = out.data_ptr<int64_t>();
    pub.row_lo = 0;
    pub.row_hi = out.size(0);
    pub.rezero = false;
    pub.stamp_end = reinterpret_cast<int64_t*>(stamp_end);
  }
  return run(out, tensors, rows, steps, indices, indptr, batch, last_page_len, slot_dim, stream,
             zero, pub, sm_limit);
}

// Eager: temp output, launch, async copy into pinned host_ptr, record event.
void stats_eager(std::vector<at::Tensor> tensors, std::vector<int64_t> rows,
                 std::vector<int64_t> steps, std::vector<std::optional<at::Tensor>> indices,
                 std::vector<std::optional<at::Tensor>> indptr, std::vector<int64_t> batch,
                 int64_t nrows, int64_t host_ptr, int64_t event,
                 std::vector<std::optional<at::Tensor>> last_page_len,
                 std::vector<int64_t> slot_dim) {
  TORCH_CHECK(!tensors.empty(), "no tensors");
  c10::cuda::CUDAGuard guard(tensors[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = at::empty({nrows, kRowWords}, tensors[0].options().dtype(at::kLong));
  run(out, tensors, rows, steps, indices, indptr, batch, last_page_len, slot_dim, stream, true,
      Publish{});
  const size_t bytes = static_cast<size_t>(nrows) * kRowWords * sizeof(int64_t);
  C10_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(host_ptr), out.data_ptr(), bytes,
                                 cudaMemcpyDeviceToHost, stream));
  if (event) C10_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), stream));
}

// Fast eager path (StatsRecorder): one call, no allocation, no std::optional vectors,
// no memset, no copy.  The ring slot owns persistent device rows `dev_rows` (int64
// [capacity, kRowWords] on `device`, zero at rest) and a device `counter` word (zero at
// rest) per side of a call.  `items` holds kSlotItemInts int64 per tensor:
//   {tensor index, row, step, indices index (-1: none), indptr index (-1: none), batch,
//    last_page_len index (-1: none), slot_dim (see mask_last_page)}
// where the indices refer to `tensors`; rows lie in [row_lo, row_hi).  In stream order
// on the current stream:
//   - if `prev_stream` >= 0 differs from it: record `event` on prev_stream and wait for it
//     (the slot's earlier launch ran there);
//   - launch the statistics of every item; the launch's last block publishes rows
//     [row_lo, row_hi) into `pub_ptr` (the slot's pinned host rows, as a device-accessible
//     address: same row indices as dev_rows) and zeroes them again in dev_rows (no launch
//     when the range is empty);
//   - record `event` when given (it then covers this side and any earlier one).
// Returns the current stream's handle (>= 0) when work was enqueued; -1 when the current
// stream is capturing and -2 when some tensor cannot take this path (not a CUDA tensor of
// `device`, index arrays not contiguous int32 on it): nothing is enqueued then.  Invalid
// arguments raise before anything is enqueued.
constexpr size_t kSlotItemInts = 8;

int64_t stats_slot(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& items,
                   int64_t device, int64_t dev_rows, int64_t capacity, int64_t row_lo,
                   int64_t row_hi, int64_t pub_ptr, int64_t counter, int64_t event,
                   int64_t prev_stream) {
  TORCH_CHECK(items.size() % kSlotItemInts == 0, "otel_flashinfer stats: bad item list");
  TORCH_CHECK(dev_rows != 0 && capacity > 0 && row_lo >= 0 && row_lo <= row_hi &&
                  row_hi <= capacity && (row_lo == row_hi || (pub_ptr != 0 && counter != 0)),
              "otel_flashinfer stats: bad slot arguments");
  const int64_t nt = static_cast<int64_t>(tensors.size());
  const size_t n = items.size() / kSlotItemInts;
  auto on_device = [&](const at::Tensor& t) {
    return t.defined() && t.is_cuda() && t.get_device() == device;
  };
  for (size_t k = 0; k < n; ++k) {
    const int64_t* it = items.data() + k * kSlotItemInts;
    TORCH_CHECK(it[0] >= 0 && it[0] < nt && it[3] < nt && it[4] < nt && it[6] < nt,
                "otel_flashinfer stats: tensor index out of range");
    TORCH_CHECK(it[1] >= row_lo && it[1] < row_hi, "stats row out of range");
    TORCH_CHECK(it[2] >= 1, "otel_flashinfer stats: step must be >= 1");
    if (!on_device(tensors[it[0]])) return -2;
    if (it[3] >= 0 || it[4] >= 0) {
      if (it[3] < 0 || it[4] < 0) return -2;
      const at::Tensor& ix = tensors[it[3]];
      const at::Tensor& ip = tensors[it[4]];
      if (!on_device(ix) || !on_device(ip) || ix.scalar_type() != at::kInt ||
          ip.scalar_type() != at::kInt || !ix.is_contiguous() || !ip.is_contiguous())
        return -2;
      if (it[6] >= 0) {
        const at::Tensor& lp = tensors[it[6]];
        if (!on_device(lp) || lp.scalar_type() != at::kInt || !lp.is_contiguous() ||
            lp.numel() < it[5])
          return -2;
      }
    }
  }
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device))
                            .stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return -1;
  std::vector<Item> launch;
  launch.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    const int64_t* it = items.data() + k * kSlotItemInts;
    const at::Tensor& t = tensors[it[0]];
    if (t.numel() == 0) continue;
    std::optional<at::Tensor> ix, ip;
    if (it[3] >= 0) {
      ix = tensors[it[3]];
      ip = tensors[it[4]];
    }
    launch.push_back(describe(t, it[1], it[2], ix, ip, it[5]));
    if (it[3] >= 0 && it[6] >= 0) mask_last_page(launch.back(), t, tensors[it[6]], it[7]);
  }
  // Everything is validated: enqueue.
  const cudaEvent_t ev = reinterpret_cast<cudaEvent_t>(event);
  const cudaStream_t prev = reinterpret_cast<cudaStream_t>(prev_stream);
  if (prev_stream >= 0 && prev != stream && ev) {
    C10_CUDA_CHECK(cudaEventRecord(ev, prev));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, ev, 0));
  }
  if (row_hi > row_lo) {
    Publish pub;
    pub.counter = reinterpret_cast<unsigned int*>(counter);
    pub.publish = reinterpret_cast<int64_t*>(pub_ptr);
    pub.row_lo = row_lo;
    pub.row_hi = row_hi;
    pub.rezero = true;
    launch_items(launch, reinterpret_cast<int64_t*>(dev_rows), stream,
                 sm_count_of(static_cast<int>(device)), pub);
  }
  if (ev) C10_CUDA_CHECK(cudaEventRecord(ev, stream));
  return reinterpret_cast<int64_t>(stream);
}

// Before a graph replay: its statistics launches run (`on`) or return at once, as the
// gate word says from then on in the current stream's order.  `gate_key` is what the
// word must be for this replay on the current stream of `device` (the stream's handle
// << 1 | on): the caller writes (`gate_write`) only when it differs from the last
// written, so a graph whose replays are all traced pays one memset in all.  On a new
// stream, the caller first orders it after the last one (torch's wait_stream), whose
// replay may still be reading the word.
int64_t gate_key(int64_t device, bool on) {
  const auto index = static_cast<c10::DeviceIndex>(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(index).stream();
  return (static_cast<int64_t>(reinterpret_cast<intptr_t>(stream)) << 1) | (on ? 1 : 0);
}

void gate_write(int64_t device, int64_t gate, bool on) {
  TORCH_CHECK(gate != 0 && gate % 4 == 0, "otel_flashinfer stats: bad gate address");
  const auto index = static_cast<c10::DeviceIndex>(device);
  c10::cuda::CUDAGuard guard(index);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(index).stream();
  // Byte-wise: 0x01010101 is as non-zero as 1 to the kernel.
  C10_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(gate), on ? 1 : 0, 4, stream));
}

// After a graph replay: copy the graph's output rows into a pinned slot.
void snapshot(at::Tensor out, int64_t host_ptr, int64_t event) {
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(host_ptr), out.data_ptr(),
                                 out.numel() * out.element_size(), cudaMemcpyDeviceToHost,
                                 stream));
  if (event) C10_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), stream));
}

// The same by a kernel into the slot's device address (`dst`, mapped pinned memory):
// no copy engine between two replays (launch_copy_rows).
// `head` (0: none): the graph's head stamp word, written with this copy's own start
// into words `head_at` and `head_at + 1` of the slot (launch_copy_rows).
void snapshot_kernel(at::Tensor out, int64_t dst, int64_t event, int64_t head, int64_t head_at) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.scalar_type() == at::kLong,
              "otel_flashinfer stats: snapshot rows must be contiguous int64 on a GPU");
  TORCH_CHECK(dst != 0 && dst % 8 == 0, "otel_flashinfer stats: bad snapshot address");
  TORCH_CHECK(head == 0 || (head % 8 == 0 && head_at >= 0 && head_at + 1 < out.numel()),
              "otel_flashinfer stats: bad head stamp address or word");
  c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int err = launch_copy_rows(out.data_ptr<int64_t>(), reinterpret_cast<int64_t*>(dst),
                                   out.numel(), stream,
                                   head ? reinterpret_cast<const int64_t*>(head) : nullptr,
                                   head ? head_at : -1);
  TORCH_CHECK(err == 0, "otel_flashinfer snapshot kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  if (event) C10_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), stream));
}

// Device-accessible address of pinned host memory (0 when it is not pinned/mapped).
int64_t host_device_ptr(int64_t host_ptr) {
  void* d = nullptr;
  if (cudaHostGetDevicePointer(&d, reinterpret_cast<void*>(host_ptr), 0) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return reinterpret_cast<int64_t>(d);
}

int64_t event_create() {
  cudaEvent_t e = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return reinterpret_cast<int64_t>(e);
}

// 0: done, 1: not ready, otherwise the CUDA error code (the error is cleared).
int64_t event_query(int64_t event) {
  cudaError_t r = cudaEventQuery(reinterpret_cast<cudaEvent_t>(event));
  if (r == cudaSuccess) return 0;
  if (r == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return 1;
  }
  (void)cudaGetLastError();
  return static_cast<int64_t>(r);
}

// Lent to the span encoder (stats_api.h): the worker polls slots without Python.
otel_flashinfer_stats_api kStatsApi = {OTEL_FLASHINFER_STATS_API_VERSION, event_query};

// A stream of our own on `device` (non-blocking, never destroyed): torch's pool hands
// its streams to anyone, and a pool stream we fork a capture onto could be one the
// application queues work on from another thread.
int64_t new_stream(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t s = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(s));
}

void event_destroy(int64_t event) {
  if (event) (void)cudaEventDestroy(reinterpret_cast<cudaEvent_t>(event));
}

}  // namespace
}  // namespace otel_fi

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using Optionals = std::vector<std::optional<at::Tensor>>;
  m.def("stats_into", &otel_fi::stats_into, "statistics into a caller-owned device buffer",
        py::arg("out"), py::arg("tensors"), py::arg("rows"), py::arg("steps"),
        py::arg("indices"), py::arg("indptr"), py::arg("batch"), py::arg("zero"),
        py::arg("last_page_len") = Optionals(), py::arg("slot_dim") = std::vector<int64_t>(),
        py::arg("counter") = 0, py::arg("stamp_start") = 0, py::arg("stamp_end") = 0,
        py::arg("stamp_also") = 0, py::arg("gate") = 0, py::arg("sm_limit") = 0,
        py::arg("branch") = false);
  m.def("gate_key", &otel_fi::gate_key,
        "what a graph's statistics gate must say for a replay on the current stream",
        py::arg("device"), py::arg("on"));
  m.def("gate_write", &otel_fi::gate_write,
        "set a graph's statistics gate in the current stream's order",
        py::arg("device"), py::arg("gate"), py::arg("on"));
  m.def("new_stream", &otel_fi::new_stream, "a non-blocking CUDA stream of our own",
        py::arg("device"));
  m.def("stats_eager", &otel_fi::stats_eager, "statistics copied into a pinned slot + event",
        py::arg("tensors"), py::arg("rows"), py::arg("steps"), py::arg("indices"),
        py::arg("indptr"), py::arg("batch"), py::arg("nrows"), py::arg("host_ptr"),
        py::arg("event"), py::arg("last_page_len") = Optionals(),
        py::arg("slot_dim") = std::vector<int64_t>());
  m.def("stats_slot", &otel_fi::stats_slot,
        "statistics into a ring slot's zero-at-rest rows, published into its pinned rows");
  m.def("host_device_ptr", &otel_fi::host_device_ptr);
  m.def("snapshot", &otel_fi::snapshot, "copy a graph's rows into a pinned slot + event");
  m.def("snapshot_kernel", &otel_fi::snapshot_kernel,
        "copy a graph's rows into a pinned slot's device address by a kernel + event",
        pybind11::arg("out"), pybind11::arg("dst"), pybind11::arg("event"),
        pybind11::arg("head") = 0, pybind11::arg("head_at") = -1);

  m.def("event_create", &otel_fi::event_create);
  m.def("event_query", &otel_fi::event_query);
  m.def("event_destroy", &otel_fi::event_destroy);
  PyObject* api = PyCapsule_New(&otel_fi::kStatsApi, "otel_flashinfer.stats_api", nullptr);
  if (api == nullptr || PyModule_AddObject(m.ptr(), "stats_api", api) != 0) {
    Py_XDECREF(api);
    throw pybind11::error_already_set();
  }
  m.attr("ROW_WORDS") = otel_fi::kRowWords;
  m.def("set_small_launches", [](bool on) { otel_fi::small_launches = on; },
        "pass few tensors' descriptors in a small parameter block (default on)");
  otel_fi::register_span_hooks(m);
  otel_fi::register_blob_staging(m);
  otel_fi::register_gate_nodes(m);
  otel_fi::register_lean_graph(m);
}

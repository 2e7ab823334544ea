// Level 10's page gather and fingerprints in one launch.
//
// A run's paged KV cache is snapshotted by gathering the pages its plan references,
// and each gathered page gets a fingerprint so that the writer stores only the pages it
// has not stored before (otel_flashinfer/blobs/fingerprint.py says why the hash is what
// it is).  In torch ops that was ten launches, int64 temporaries four times the pages'
// bytes and ~200 us of GPU time for the benchmark decode's 32 MB; here one block per
// page reads the page once, writes its copy and folds both hash lanes.
//
// The result is bit for bit the torch path's (page_fingerprints): per lane the sum, mod
// 2**64, of each sign-extended 32-bit half times its weight; wrapping addition does
// not depend on order, so the block's reduction order does not matter.  The clamped
// page id goes out beside the two lanes: one [n, 3] int64 tensor, one copy to the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "stats_launch.h"

namespace otel_fi {
namespace {

constexpr int kFpThreads = 256;
constexpr int kFpWarps = kFpThreads / 32;

__device__ __forceinline__ void fold(uint64_t& a0, uint64_t& a1, int32_t half,
                                     const int64_t* __restrict__ w0,
                                     const int64_t* __restrict__ w1, int64_t j) {
  const uint64_t v = static_cast<uint64_t>(static_cast<int64_t>(half));
  a0 += v * static_cast<uint64_t>(w0[j]);
  a1 += v * static_cast<uint64_t>(w1[j]);
}

// One block per gathered page p: pages[p] = cache[clamp(idx[p])], meta[p] = (id, lanes).
template <typename Idx, bool kVec>
__global__ void __launch_bounds__(kFpThreads)
    gather_fingerprint_kernel(const int32_t* __restrict__ cache, int64_t words,
                              int64_t num_pages, const Idx* __restrict__ idx,
                              int32_t* __restrict__ pages, int64_t* __restrict__ meta,
                              const int64_t* __restrict__ w) {
  const int64_t p = blockIdx.x;
  int64_t id = static_cast<int64_t>(idx[p]);
  id = id < 0 ? 0 : (id >= num_pages ? num_pages - 1 : id);
  const int32_t* src = cache + id * words;
  int32_t* dst = pages + p * words;
  const int64_t* w0 = w;
  const int64_t* w1 = w + words;
  uint64_t a0 = 0, a1 = 0;
  if (kVec) {
    const int4* s4 = reinterpret_cast<const int4*>(src);
    int4* d4 = reinterpret_cast<int4*>(dst);
    for (int64_t k = threadIdx.x; k < words / 4; k += kFpThreads) {
      const int4 v = s4[k];
      d4[k] = v;
      const int64_t j = k * 4;
      fold(a0, a1, v.x, w0, w1, j);
      fold(a0, a1, v.y, w0, w1, j + 1);
      fold(a0, a1, v.z, w0, w1, j + 2);
      fold(a0, a1, v.w, w0, w1, j + 3);
    }
  } else {
    for (int64_t j = threadIdx.x; j < words; j += kFpThreads) {
      const int32_t v = src[j];
      dst[j] = v;
      fold(a0, a1, v, w0, w1, j);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    a0 += __shfl_down_sync(0xffffffffu, a0, off);
    a1 += __shfl_down_sync(0xffffffffu, a1, off);
  }
  __shared__ uint64_t s0[kFpWarps], s1[kFpWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    s0[warp] = a0;
    s1[warp] = a1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t t0 = 0, t1 = 0;
    for (int i = 0; i < kFpWarps; ++i) {
      t0 += s0[i];
      t1 += s1[i];
    }
    meta[p * 3] = id;
    meta[p * 3 + 1] = static_cast<int64_t>(t0);
    meta[p * 3 + 2] = static_cast<int64_t>(t1);
  }
}

template <typename Idx>
void launch(const at::Tensor& cache, int64_t words, const at::Tensor& indices, int64_t n,
            at::Tensor& pages, at::Tensor& meta, const at::Tensor& weights,
            cudaStream_t stream) {
  const auto* src = static_cast<const int32_t*>(cache.data_ptr());
  auto* dst = static_cast<int32_t*>(pages.data_ptr());
  const bool vec = words % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  const auto* idx = static_cast<const Idx*>(indices.data_ptr());
  auto* m = meta.data_ptr<int64_t>();
  const auto* w = weights.data_ptr<int64_t>();
  const dim3 grid(static_cast<unsigned>(n));
  if (vec) {
    gather_fingerprint_kernel<Idx, true>
        <<<grid, kFpThreads, 0, stream>>>(src, words, cache.size(0), idx, dst, m, w);
  } else {
    gather_fingerprint_kernel<Idx, false>
        <<<grid, kFpThreads, 0, stream>>>(src, words, cache.size(0), idx, dst, m, w);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<at::Tensor> gather_fingerprints(const at::Tensor& cache, const at::Tensor& indices,
                                            int64_t n, const at::Tensor& weights) {
  TORCH_CHECK(cache.is_cuda() && cache.dim() >= 2 && cache.is_contiguous() &&
                  cache.size(0) > 0,
              "gather_fingerprints: the cache must be a contiguous CUDA tensor of pages");
  TORCH_CHECK(indices.device() == cache.device() && indices.dim() == 1 &&
                  indices.is_contiguous() &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
              "gather_fingerprints: indices must be contiguous int32/int64 on the cache's "
              "device");
  const int64_t page_bytes = cache.numel() / cache.size(0) * cache.element_size();
  TORCH_CHECK(page_bytes > 0 && page_bytes % 8 == 0,
              "gather_fingerprints: a page must be a whole number of 8-byte words");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 8 == 0,
              "gather_fingerprints: the cache must start on an 8-byte boundary");
  const int64_t words = page_bytes / 4;
  TORCH_CHECK(weights.device() == cache.device() && weights.scalar_type() == at::kLong &&
                  weights.is_contiguous() && weights.dim() == 2 && weights.size(0) == 2 &&
                  weights.size(1) == words,
              "gather_fingerprints: weights must be int64 [2, page bytes / 4]");
  n = std::max<int64_t>(0, std::min<int64_t>(n, indices.numel()));
  TORCH_CHECK(n < (int64_t{1} << 31), "gather_fingerprints: too many pages");
  c10::cuda::CUDAGuard guard(cache.device());
  std::vector<int64_t> shape(cache.sizes().begin(), cache.sizes().end());
  shape[0] = n;
  at::Tensor pages = at::empty(shape, cache.options());
  at::Tensor meta = at::empty({n, 3}, cache.options().dtype(at::kLong));
  if (n > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cache.device().index()).stream();
    if (indices.scalar_type() == at::kInt) {
      launch<int32_t>(cache, words, indices, n, pages, meta, weights, stream);
    } else {
      launch<int64_t>(cache, words, indices, n, pages, meta, weights, stream);
    }
  }
  return {pages, meta};
}

}  // namespace otel_fi

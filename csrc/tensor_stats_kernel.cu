// Level-5 tensor statistics: one launch covers all tensors of a call.
//
// Each tensor gets a contiguous range of blocks (TensorDesc::block_begin/nblocks);
// its blocks grid-stride over the tensor's elements and fold their partial
// results into the tensor's output row with 64-bit atomics, so no second launch
// and no host sync are needed.  Everything the kernel needs travels in the
// kernel parameters, so a CUDA graph capture records it by value.
//
// Semantics (same as otel_flashinfer/stats/torch_ops.py):
//   min/max over all non-NaN values (+-Inf included), mean over finite values,
//   NaN and Inf counted.  Integer and bool tensors have no NaN/Inf.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "tensor_stats.h"

namespace otel_fi {
namespace {

// Order-preserving map from double to uint64 (larger double -> larger key).
__device__ __forceinline__ unsigned long long ord_key(double d) {
  unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(d));
  return (b & 0x8000000000000000ULL) ? ~b : (b | 0x8000000000000000ULL);
}

struct Acc {
  float lo = INFINITY;   // float covers every float dtype exactly
  float hi = -INFINITY;
  double dlo = INFINITY;  // integer dtypes (int32/int64 need more than float)
  double dhi = -INFINITY;
  double sum = 0.0;
  float part = 0.f;  // float partial of the current vector, folded into sum
  unsigned long long nan = 0, inf = 0, seen = 0;
  __device__ __forceinline__ void commit() { sum += static_cast<double>(part); part = 0.f; }
};

__device__ __forceinline__ float f8e4m3_to_float(uint32_t b) {
  // float8_e4m3fn: no Inf; NaN is S.1111.111.
  uint32_t s = (b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 7u;
  if ((b & 0x7Fu) == 0x7Fu) return __int_as_float(0x7FC00000);
  float v = (e == 0) ? __uint_as_float(0u) + static_cast<float>(m) * 0.001953125f  // m * 2^-9
                     : __uint_as_float(((e + 120u) << 23) | (m << 20));
  return __uint_as_float(__float_as_uint(v) | s);
}

template <int DT>
struct Elem;
#define OTEL_FI_FLOAT_ELEM(DT_, RAW_, EXPR_)                                  \
  template <>                                                                 \
  struct Elem<DT_> {                                                          \
    using Raw = RAW_;                                                         \
    static constexpr bool kFloat = true;                                      \
    __device__ __forceinline__ static float conv(Raw r) { return EXPR_; }     \
  };
OTEL_FI_FLOAT_ELEM(kF32, uint32_t, __uint_as_float(r))
OTEL_FI_FLOAT_ELEM(kF16, uint16_t, __half2float(__ushort_as_half(r)))
OTEL_FI_FLOAT_ELEM(kBF16, uint16_t, __uint_as_float(static_cast<uint32_t>(r) << 16))
OTEL_FI_FLOAT_ELEM(kF8E4M3, uint8_t, f8e4m3_to_float(r))
OTEL_FI_FLOAT_ELEM(kF8E5M2, uint8_t,
                   __half2float(__ushort_as_half(static_cast<uint16_t>(r) << 8)))
#undef OTEL_FI_FLOAT_ELEM
#define OTEL_FI_INT_ELEM(DT_, RAW_, EXPR_)                                    \
  template <>                                                                 \
  struct Elem<DT_> {                                                          \
    using Raw = RAW_;                                                         \
    static constexpr bool kFloat = false;                                     \
    __device__ __forceinline__ static double conv(Raw r) { return EXPR_; }    \
  };
OTEL_FI_INT_ELEM(kI8, uint8_t, static_cast<double>(static_cast<int8_t>(r)))
OTEL_FI_INT_ELEM(kU8, uint8_t, static_cast<double>(r))
OTEL_FI_INT_ELEM(kBool, uint8_t, r ? 1.0 : 0.0)
OTEL_FI_INT_ELEM(kI32, uint32_t, static_cast<double>(static_cast<int32_t>(r)))
OTEL_FI_INT_ELEM(kI64, unsigned long long,
                 static_cast<double>(static_cast<long long>(r)))
OTEL_FI_INT_ELEM(kF64, unsigned long long, __longlong_as_double(static_cast<long long>(r)))
#undef OTEL_FI_INT_ELEM

// f64 has NaN/Inf: handled by the double branch below checking isnan/isinf.
template <int DT>
__device__ __forceinline__ void visit(typename Elem<DT>::Raw r, Acc& a) {
  if constexpr (Elem<DT>::kFloat) {
    float x = Elem<DT>::conv(r);
    bool isn = x != x;
    bool isi = fabsf(x) == INFINITY;
    a.nan += isn;
    a.inf += isi;
    a.lo = fminf(a.lo, x);  // fminf/fmaxf drop NaN operands
    a.hi = fmaxf(a.hi, x);
    a.part += (isn || isi) ? 0.f : x;
  } else {
    double x = Elem<DT>::conv(r);
    if (DT == kF64) {
      bool isn = x != x;
      bool isi = fabs(x) == INFINITY;
      a.nan += isn;
      a.inf += isi;
      a.sum += (isn || isi) ? 0.0 : x;
    } else {
      a.sum += x;
    }
    a.dlo = fmin(a.dlo, x);
    a.dhi = fmax(a.dhi, x);
  }
  a.seen += 1;
}

// A 16-byte vector: float partial sum of its finite values, redone in double in the
// rare case that it overflowed (values near FLT_MAX; Inf elements never enter it).
template <int DT>
__device__ __noinline__ double vec_sum_double(uint4 w) {
  using Raw = typename Elem<DT>::Raw;
  const Raw* e = reinterpret_cast<const Raw*>(&w);
  double s = 0.0;
  for (int k = 0; k < static_cast<int>(16 / sizeof(Raw)); ++k) {
    float x = Elem<DT>::conv(e[k]);
    s += (fabsf(x) < INFINITY) ? static_cast<double>(x) : 0.0;  // finite values only
  }
  return s;
}

template <int DT>
__device__ __forceinline__ void visit_vec(const uint4& w, Acc& a) {
  using Raw = typename Elem<DT>::Raw;
  constexpr int kVec = 16 / sizeof(Raw);
  const Raw* e = reinterpret_cast<const Raw*>(&w);
#pragma unroll
  for (int k = 0; k < kVec; ++k) visit<DT>(e[k], a);
  if constexpr (Elem<DT>::kFloat) {
    if (fabsf(a.part) == INFINITY) {
      a.part = 0.f;
      a.sum += vec_sum_double<DT>(w);
      return;
    }
  }
  a.commit();
}

__device__ __forceinline__ int64_t strided_offset(int64_t idx, const TensorDesc& d) {
  int64_t off = 0;
#pragma unroll
  for (int k = kMaxDims - 1; k >= 0; --k) {
    if (k < d.ndim) {
      int64_t s = d.sizes[k];
      int64_t q = idx / s;
      off += (idx - q * s) * d.strides[k];
      idx = q;
    }
  }
  return off;
}

// Number of referenced pages, read on the device (changes between graph replays).
__device__ __forceinline__ void paged_range(const TensorDesc& d, int64_t& start, int64_t& count) {
  start = d.indptr[0];
  count = static_cast<int64_t>(d.indptr[d.batch]) - start;
  if (count < 0) count = 0;
}

template <int DT>
__device__ void run_tensor(const TensorDesc& d, int64_t lb, Acc& a) {
  using Raw = typename Elem<DT>::Raw;
  constexpr int kVec = 16 / sizeof(Raw);
  const int64_t tid = lb * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(d.nblocks) * blockDim.x;
  const Raw* base = static_cast<const Raw*>(d.ptr);

  if (d.mode == kFull && d.contiguous == 2) {
    // 16-byte vector loads, 4 in flight per thread.
    const uint4* p = static_cast<const uint4*>(d.ptr);
    const int64_t nvec = d.n / kVec;
    int64_t v = tid;
    for (; v + 3 * stride < nvec; v += 4 * stride) {
      uint4 w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) w[u] = __ldg(p + v + u * stride);
#pragma unroll
      for (int u = 0; u < 4; ++u) visit_vec<DT>(w[u], a);
    }
    for (; v < nvec; v += stride) {
      visit_vec<DT>(__ldg(p + v), a);
    }
    for (int64_t i = nvec * kVec + tid; i < d.n; i += stride) visit<DT>(base[i], a);
    a.commit();
    return;
  }
  if (d.mode == kPaged) {
    int64_t start, count;
    paged_range(d, start, count);
    if (d.contiguous == 2) {
      const int64_t vpp = d.n / kVec;  // vectors per page
      const int64_t total = count * vpp;
      const char* b = static_cast<const char*>(d.ptr);
      const int64_t page_bytes = d.page_stride * static_cast<int64_t>(sizeof(Raw));
      for (int64_t v = tid; v < total; v += stride) {
        int64_t j = v / vpp, r = v - j * vpp;
        int64_t page = d.indices[start + j];
        visit_vec<DT>(__ldg(reinterpret_cast<const uint4*>(b + page * page_bytes) + r), a);
      }
      return;
    }
    const int64_t total = count * d.n;
    for (int64_t i = tid; i < total; i += stride) {
      int64_t j = i / d.n, r = i - j * d.n;
      int64_t page = d.indices[start + j];
      int64_t off = d.contiguous ? r : strided_offset(r, d);
      visit<DT>(base[page * d.page_stride + off], a);
      a.commit();
    }
    return;
  }
  // Full (non-vectorisable) or sampled: logical index -> element offset.
  for (int64_t i = tid; i < d.n; i += stride) {
    int64_t logical = i * d.step;
    int64_t off = d.contiguous ? logical : strided_offset(logical, d);
    visit<DT>(base[off], a);
    a.commit();
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void block_flush(Acc a, bool is_float, int64_t* row) {
  __shared__ double s_lo[32], s_hi[32], s_sum[32];
  __shared__ unsigned long long s_nan[32], s_inf[32], s_seen[32];
  double lo = is_float ? static_cast<double>(a.lo) : a.dlo;
  double hi = is_float ? static_cast<double>(a.hi) : a.dhi;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  double sum = warp_sum(a.sum);
  unsigned long long nan = warp_sum(a.nan), inf = warp_sum(a.inf), seen = warp_sum(a.seen);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) {
    s_lo[warp] = lo; s_hi[warp] = hi; s_sum[warp] = sum;
    s_nan[warp] = nan; s_inf[warp] = inf; s_seen[warp] = seen;
  }
  __syncthreads();
  if (warp != 0) return;
  bool live = lane < nwarps;
  lo = live ? s_lo[lane] : INFINITY;
  hi = live ? s_hi[lane] : -INFINITY;
  sum = live ? s_sum[lane] : 0.0;
  nan = live ? s_nan[lane] : 0ULL;
  inf = live ? s_inf[lane] : 0ULL;
  seen = live ? s_seen[lane] : 0ULL;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  sum = warp_sum(sum);
  nan = warp_sum(nan);
  inf = warp_sum(inf);
  seen = warp_sum(seen);
  if (lane != 0 || seen == 0) return;
  auto* u = reinterpret_cast<unsigned long long*>(row);
  if (nan < seen) {  // at least one non-NaN value: min/max defined
    atomicMax(u + kMin, ~ord_key(lo));
    atomicMax(u + kMax, ord_key(hi));
  }
  atomicAdd(reinterpret_cast<double*>(row + kSum), sum);
  atomicAdd(u + kFinite, seen - nan - inf);
  if (nan) atomicAdd(u + kNan, nan);
  if (inf) atomicAdd(u + kInf, inf);
  atomicAdd(u + kSeen, seen);
}

__global__ void __launch_bounds__(256, 3) tensor_stats_kernel(const __grid_constant__ LaunchDesc desc, int64_t* out) {
  int t = 0;
  const int b = blockIdx.x;
  for (int k = 1; k < desc.count; ++k)
    if (b >= desc.t[k].block_begin) t = k;
  const TensorDesc& d = desc.t[t];
  const int64_t lb = b - d.block_begin;
  Acc a;
  bool is_float = true;
  switch (d.dtype) {
    case kF32: run_tensor<kF32>(d, lb, a); break;
    case kF16: run_tensor<kF16>(d, lb, a); break;
    case kBF16: run_tensor<kBF16>(d, lb, a); break;
    case kF8E4M3: run_tensor<kF8E4M3>(d, lb, a); break;
    case kF8E5M2: run_tensor<kF8E5M2>(d, lb, a); break;
    case kI8: run_tensor<kI8>(d, lb, a); is_float = false; break;
    case kU8: run_tensor<kU8>(d, lb, a); is_float = false; break;
    case kBool: run_tensor<kBool>(d, lb, a); is_float = false; break;
    case kI32: run_tensor<kI32>(d, lb, a); is_float = false; break;
    case kI64: run_tensor<kI64>(d, lb, a); is_float = false; break;
    case kF64: run_tensor<kF64>(d, lb, a); is_float = false; break;
    default: break;
  }
  block_flush(a, is_float, out + static_cast<int64_t>(d.row) * kRowWords);
}

}  // namespace

int launch_tensor_stats(const LaunchDesc& desc, int total_blocks, int threads, int64_t* out,
                        void* stream) {
  if (desc.count <= 0 || total_blocks <= 0) return 0;
  tensor_stats_kernel<<<total_blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(desc,
                                                                                        out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace otel_fi

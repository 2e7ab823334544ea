// Level-5 tensor statistics: one launch covers all tensors of a call.
//
// Each tensor gets a contiguous range of blocks (TensorDesc::block_begin/nblocks);
// its blocks stride over the tensor's elements and fold their partial results into
// the tensor's output row with 64-bit atomics, so no second launch and no host sync
// are needed.  Everything the kernel needs travels in the kernel parameters, so a
// CUDA graph capture records it by value.  launch_items sizes the grid to about one
// wave of resident blocks, so each row sees at most a few hundred block atomics.
//
// Semantics (same as otel_flashinfer/stats/torch_ops.py):
//   min/max over all non-NaN values (+-Inf included), mean over finite values,
//   NaN and Inf counted.  Integer and bool tensors have no NaN/Inf.
//
// Hot paths work on 16-byte vectors: a vector with no NaN/Inf (tested on the raw
// bits) takes a fast path (packed half2/bf162 min/max for 16-bit and fp8 floats,
// a float partial sum per vector added in double, integer sums for small ints);
// a vector holding a NaN/Inf, or whose float partial overflowed, is redone element
// by element (slow path, rare).  Counters are per vector, not per element.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
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
  long long isum = 0;  // exact integer sum (i8/u8/bool/i32), folded into sum at the end
  float part = 0.f;    // float partial of scalar paths, folded into sum
  // Per-thread counters: a thread covers far fewer than 2^32 elements (grid of >= 256
  // threads per tensor, tensors < 2^40 elements); widened to 64 bits in block_flush.
  unsigned int nan = 0, inf = 0, seen = 0;
  __device__ __forceinline__ void commit() { sum += static_cast<double>(part); part = 0.f; }
};

// Packed running min/max words of the vector fast paths (meaning depends on dtype).
struct Packed {
  uint32_t lo2, hi2;
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

// One element (scalar paths and the generic vector path); the caller counts `seen`.
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
}

// ---- 16-bit float words (f16 / bf16; fp8 is widened to f16 first) -------------

template <bool BF>
__device__ __forceinline__ float2 to_f2(uint32_t w) {
  if constexpr (BF) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  } else {
    __half2 h;
    __builtin_memcpy(&h, &w, 4);
    return __half22float2(h);
  }
}

template <bool BF>
__device__ __forceinline__ uint32_t pmin(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (BF) {
    __nv_bfloat162 x, y;
    __builtin_memcpy(&x, &a, 4);
    __builtin_memcpy(&y, &b, 4);
    __nv_bfloat162 m = __hmin2(x, y);
    __builtin_memcpy(&r, &m, 4);
  } else {
    __half2 x, y;
    __builtin_memcpy(&x, &a, 4);
    __builtin_memcpy(&y, &b, 4);
    __half2 m = __hmin2(x, y);
    __builtin_memcpy(&r, &m, 4);
  }
  return r;
}

template <bool BF>
__device__ __forceinline__ uint32_t pmax(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (BF) {
    __nv_bfloat162 x, y;
    __builtin_memcpy(&x, &a, 4);
    __builtin_memcpy(&y, &b, 4);
    __nv_bfloat162 m = __hmax2(x, y);
    __builtin_memcpy(&r, &m, 4);
  } else {
    __half2 x, y;
    __builtin_memcpy(&x, &a, 4);
    __builtin_memcpy(&y, &b, 4);
    __half2 m = __hmax2(x, y);
    __builtin_memcpy(&r, &m, 4);
  }
  return r;
}

// Result of a slow-path vector.
struct Part {
  float lo, hi;
  double sum;
  unsigned int nan, inf;
};

__device__ __forceinline__ void merge_part(const Part& p, Acc& a) {
  a.lo = fminf(a.lo, p.lo);
  a.hi = fmaxf(a.hi, p.hi);
  a.sum += p.sum;
  a.nan += p.nan;
  a.inf += p.inf;
}

// `n` float values element by element: NaN/Inf counted, min/max over non-NaN, float
// partial sum over finite values, redone in double if it overflowed.
template <int N>
__device__ __forceinline__ Part slow_floats(const float (&x)[N]) {
  Part p{INFINITY, -INFINITY, 0.0, 0u, 0u};
  float part = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    bool isn = x[k] != x[k];
    bool isi = fabsf(x[k]) == INFINITY;
    p.nan += isn;
    p.inf += isi;
    p.lo = fminf(p.lo, x[k]);
    p.hi = fmaxf(p.hi, x[k]);
    part += (isn || isi) ? 0.f : x[k];
  }
  if (fabsf(part) < INFINITY) {
    p.sum = part;
  } else {
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < N; ++k) s += (fabsf(x[k]) < INFINITY) ? static_cast<double>(x[k]) : 0.0;
    p.sum = s;
  }
  return p;
}

template <bool BF>
__device__ __forceinline__ Part slow16(uint4 w) {
  float x[8];
  float2 f;
  f = to_f2<BF>(w.x); x[0] = f.x; x[1] = f.y;
  f = to_f2<BF>(w.y); x[2] = f.x; x[3] = f.y;
  f = to_f2<BF>(w.z); x[4] = f.x; x[5] = f.y;
  f = to_f2<BF>(w.w); x[6] = f.x; x[7] = f.y;
  return slow_floats<8>(x);
}

__device__ __forceinline__ Part slow32(uint4 w) {
  float x[4] = {__uint_as_float(w.x), __uint_as_float(w.y), __uint_as_float(w.z),
                __uint_as_float(w.w)};
  return slow_floats<4>(x);
}

// 8 x f16 or bf16.  kOvf: the float partial of 8 finite values can overflow (bf16).
template <bool BF, bool kOvf>
__device__ __forceinline__ void vec16(const uint4& w, Acc& a, Packed& pk) {
  // Per 16-bit lane, bit 15 of (w & E) + O is set iff the exponent is all ones.
  constexpr uint32_t E = BF ? 0x7f807f80u : 0x7c007c00u;
  constexpr uint32_t O = BF ? 0x00800080u : 0x04000400u;
  const uint32_t bad = (((w.x & E) + O) | ((w.y & E) + O) | ((w.z & E) + O) | ((w.w & E) + O)) &
                       0x80008000u;
  a.seen += 8;
  if (bad == 0) {
    const float2 f0 = to_f2<BF>(w.x), f1 = to_f2<BF>(w.y), f2 = to_f2<BF>(w.z),
                 f3 = to_f2<BF>(w.w);
    const float s = ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
    if (!kOvf || fabsf(s) < INFINITY) {
      pk.lo2 = pmin<BF>(pk.lo2, pmin<BF>(pmin<BF>(w.x, w.y), pmin<BF>(w.z, w.w)));
      pk.hi2 = pmax<BF>(pk.hi2, pmax<BF>(pmax<BF>(w.x, w.y), pmax<BF>(w.z, w.w)));
      a.sum += static_cast<double>(s);
      return;
    }
  }
  merge_part(slow16<BF>(w), a);
}

__device__ __forceinline__ void vec_f32(const uint4& w, Acc& a) {
  const float x0 = __uint_as_float(w.x), x1 = __uint_as_float(w.y), x2 = __uint_as_float(w.z),
              x3 = __uint_as_float(w.w);
  a.seen += 4;
  const bool fin = (fabsf(x0) < INFINITY) & (fabsf(x1) < INFINITY) & (fabsf(x2) < INFINITY) &
                   (fabsf(x3) < INFINITY);
  if (fin) {
    const float s = (x0 + x1) + (x2 + x3);
    if (fabsf(s) < INFINITY) {
      a.lo = fminf(a.lo, fminf(fminf(x0, x1), fminf(x2, x3)));
      a.hi = fmaxf(a.hi, fmaxf(fmaxf(x0, x1), fmaxf(x2, x3)));
      a.sum += static_cast<double>(s);
      return;
    }
  }
  merge_part(slow32(w), a);
}

// fp8 x 16 -> two vectors of 8 x f16 (exact: every fp8 value, NaN and Inf included,
// is a half value).
__device__ __forceinline__ uint32_t e5m2x2_to_h2(uint32_t q, bool high) {
  return __byte_perm(q, 0u, high ? 0x3424u : 0x1404u);  // byte b -> half b << 8
}
__device__ __forceinline__ uint32_t e4m3x2_to_h2(uint32_t q16) {
  __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(q16), __NV_E4M3);
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}

template <bool E4M3>
__device__ __forceinline__ void vec_f8(const uint4& w, Acc& a, Packed& pk) {
  uint4 h0, h1;
  if constexpr (E4M3) {
    h0 = make_uint4(e4m3x2_to_h2(w.x & 0xffffu), e4m3x2_to_h2(w.x >> 16),
                    e4m3x2_to_h2(w.y & 0xffffu), e4m3x2_to_h2(w.y >> 16));
    h1 = make_uint4(e4m3x2_to_h2(w.z & 0xffffu), e4m3x2_to_h2(w.z >> 16),
                    e4m3x2_to_h2(w.w & 0xffffu), e4m3x2_to_h2(w.w >> 16));
  } else {
    h0 = make_uint4(e5m2x2_to_h2(w.x, false), e5m2x2_to_h2(w.x, true),
                    e5m2x2_to_h2(w.y, false), e5m2x2_to_h2(w.y, true));
    h1 = make_uint4(e5m2x2_to_h2(w.z, false), e5m2x2_to_h2(w.z, true),
                    e5m2x2_to_h2(w.w, false), e5m2x2_to_h2(w.w, true));
  }
  vec16<false, false>(h0, a, pk);
  vec16<false, false>(h1, a, pk);
}

// ---- small integers ----------------------------------------------------------

__device__ __forceinline__ void vec_i8(const uint4& w, Acc& a, Packed& pk) {
  int s = __dp4a(static_cast<int>(w.x), 0x01010101, 0);
  s = __dp4a(static_cast<int>(w.y), 0x01010101, s);
  s = __dp4a(static_cast<int>(w.z), 0x01010101, s);
  s = __dp4a(static_cast<int>(w.w), 0x01010101, s);
  a.isum += s;
  pk.lo2 = __vmins4(pk.lo2, __vmins4(__vmins4(w.x, w.y), __vmins4(w.z, w.w)));
  pk.hi2 = __vmaxs4(pk.hi2, __vmaxs4(__vmaxs4(w.x, w.y), __vmaxs4(w.z, w.w)));
  a.seen += 16;
}

__device__ __forceinline__ void vec_u8(const uint4& w, Acc& a, Packed& pk) {
  unsigned s = __dp4a(w.x, 0x01010101u, 0u);
  s = __dp4a(w.y, 0x01010101u, s);
  s = __dp4a(w.z, 0x01010101u, s);
  s = __dp4a(w.w, 0x01010101u, s);
  a.isum += s;
  pk.lo2 = __vminu4(pk.lo2, __vminu4(__vminu4(w.x, w.y), __vminu4(w.z, w.w)));
  pk.hi2 = __vmaxu4(pk.hi2, __vmaxu4(__vmaxu4(w.x, w.y), __vmaxu4(w.z, w.w)));
  a.seen += 16;
}

// Bit 7 of each byte set iff the byte is non-zero (a bool byte counts as 1 when non-zero).
__device__ __forceinline__ uint32_t nonzero_bytes(uint32_t q) {
  return (((q & 0x7f7f7f7fu) + 0x7f7f7f7fu) | q) & 0x80808080u;
}

__device__ __forceinline__ void vec_bool(const uint4& w, Acc& a, Packed& pk) {
  const uint32_t n0 = nonzero_bytes(w.x), n1 = nonzero_bytes(w.y), n2 = nonzero_bytes(w.z),
                 n3 = nonzero_bytes(w.w);
  a.isum += __popc(n0) + __popc(n1) + __popc(n2) + __popc(n3);
  pk.lo2 &= n0 & n1 & n2 & n3;  // stays 0x80808080 while every byte is non-zero
  pk.hi2 |= n0 | n1 | n2 | n3;  // non-zero once a byte is non-zero
  a.seen += 16;
}

__device__ __forceinline__ void vec_i32(const uint4& w, Acc& a, Packed& pk) {
  const int x0 = static_cast<int>(w.x), x1 = static_cast<int>(w.y), x2 = static_cast<int>(w.z),
            x3 = static_cast<int>(w.w);
  a.isum += (static_cast<long long>(x0) + x1) + (static_cast<long long>(x2) + x3);
  pk.lo2 = static_cast<uint32_t>(min(static_cast<int>(pk.lo2), min(min(x0, x1), min(x2, x3))));
  pk.hi2 = static_cast<uint32_t>(max(static_cast<int>(pk.hi2), max(max(x0, x1), max(x2, x3))));
  a.seen += 4;
}

// ---- dispatch ----------------------------------------------------------------

// Identity values of the packed min/max words.
template <int DT>
__device__ __forceinline__ Packed packed_init() {
  switch (DT) {
    case kF16: case kF8E4M3: case kF8E5M2: return Packed{0x7c007c00u, 0xfc00fc00u};  // +-Inf
    case kBF16: return Packed{0x7f807f80u, 0xff80ff80u};                            // +-Inf
    case kI8: return Packed{0x7f7f7f7fu, 0x80808080u};
    case kU8: return Packed{0xffffffffu, 0u};
    case kBool: return Packed{0x80808080u, 0u};
    case kI32: return Packed{0x7fffffffu, 0x80000000u};
    default: return Packed{0u, 0u};
  }
}

// Folds the packed min/max and the integer sum into the scalar accumulators.  The
// packed identities are in range of the dtype (e.g. 127 for i8), so folding them
// never changes a min/max over at least one element.
template <int DT>
__device__ __forceinline__ void fold_packed(const Packed& pk, Acc& a) {
  if constexpr (DT == kF16 || DT == kF8E4M3 || DT == kF8E5M2 || DT == kBF16) {
    constexpr bool BF = DT == kBF16;
    const float2 l = to_f2<BF>(pk.lo2), h = to_f2<BF>(pk.hi2);
    a.lo = fminf(a.lo, fminf(l.x, l.y));
    a.hi = fmaxf(a.hi, fmaxf(h.x, h.y));
  } else if constexpr (DT == kI8 || DT == kU8) {
    int lo = 1 << 30, hi = -(1 << 30);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int l = DT == kI8 ? static_cast<int>(static_cast<int8_t>(pk.lo2 >> (8 * k)))
                              : static_cast<int>((pk.lo2 >> (8 * k)) & 0xffu);
      const int h = DT == kI8 ? static_cast<int>(static_cast<int8_t>(pk.hi2 >> (8 * k)))
                              : static_cast<int>((pk.hi2 >> (8 * k)) & 0xffu);
      lo = min(lo, l);
      hi = max(hi, h);
    }
    a.dlo = fmin(a.dlo, static_cast<double>(lo));
    a.dhi = fmax(a.dhi, static_cast<double>(hi));
  } else if constexpr (DT == kBool) {
    a.dlo = fmin(a.dlo, pk.lo2 == 0x80808080u ? 1.0 : 0.0);
    a.dhi = fmax(a.dhi, pk.hi2 != 0u ? 1.0 : 0.0);
  } else if constexpr (DT == kI32) {
    a.dlo = fmin(a.dlo, static_cast<double>(static_cast<int>(pk.lo2)));
    a.dhi = fmax(a.dhi, static_cast<double>(static_cast<int>(pk.hi2)));
  }
  a.sum += static_cast<double>(a.isum);
  a.isum = 0;
}

// One 16-byte vector of dtype DT.
template <int DT>
__device__ __forceinline__ void visit_vec(const uint4& w, Acc& a, Packed& pk) {
  if constexpr (DT == kF16) {
    vec16<false, false>(w, a, pk);  // 8 finite halves never overflow a float sum
  } else if constexpr (DT == kBF16) {
    vec16<true, true>(w, a, pk);
  } else if constexpr (DT == kF32) {
    vec_f32(w, a);
  } else if constexpr (DT == kF8E4M3) {
    vec_f8<true>(w, a, pk);
  } else if constexpr (DT == kF8E5M2) {
    vec_f8<false>(w, a, pk);
  } else if constexpr (DT == kI8) {
    vec_i8(w, a, pk);
  } else if constexpr (DT == kU8) {
    vec_u8(w, a, pk);
  } else if constexpr (DT == kBool) {
    vec_bool(w, a, pk);
  } else if constexpr (DT == kI32) {
    vec_i32(w, a, pk);
  } else {  // i64, f64: two elements, in double
    using Raw = typename Elem<DT>::Raw;
    const Raw* e = reinterpret_cast<const Raw*>(&w);
#pragma unroll
    for (int k = 0; k < static_cast<int>(16 / sizeof(Raw)); ++k) visit<DT>(e[k], a);
    a.seen += 16 / sizeof(Raw);
  }
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
// Bounds outside indices are clamped to it (a bad indptr must not make us read past it).
__device__ __forceinline__ void paged_range(const TensorDesc& d, int64_t& start, int64_t& count) {
  start = min(max(static_cast<int64_t>(d.indptr[0]), int64_t{0}),
              static_cast<int64_t>(d.num_indices));
  const int64_t end = min(static_cast<int64_t>(d.indptr[d.batch]),
                          static_cast<int64_t>(d.num_indices));
  count = end - start;
  if (count < 0) count = 0;
}

// Whether a page id names a page of the cache (others are left out, never read).
__device__ __forceinline__ bool page_ok(const TensorDesc& d, int64_t page) {
  return page >= 0 && page < d.num_pages;
}

// How many slots of referenced page g (an index into indices) hold tokens: the
// request's last_page_len when g is its last page, else every slot (INT32_MAX).  The
// request is found by binary search in indptr (a few cached loads per work unit).
__device__ __forceinline__ int32_t page_limit(const TensorDesc& d, int64_t g) {
  if (d.last_page_len == nullptr) return INT32_MAX;
  int32_t lo = 0, hi = d.batch;
  while (lo < hi) {  // first request b with indptr[b + 1] > g
    const int32_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(d.indptr[mid + 1]) > g) hi = mid; else lo = mid + 1;
  }
  if (lo >= d.batch || static_cast<int64_t>(d.indptr[lo + 1]) - 1 != g) return INT32_MAX;
  return d.last_page_len[lo];
}

// Whether logical index r of a page with `limit` filled slots holds a token (r < 2^31:
// describe() turns masking off for larger pages).
__device__ __forceinline__ bool slot_ok(const TensorDesc& d, int64_t r, int32_t limit) {
  if (limit >= d.page_size) return true;
  const uint32_t slot = (static_cast<uint32_t>(r) / static_cast<uint32_t>(d.slot_stride)) %
                        static_cast<uint32_t>(d.page_size);
  return static_cast<int32_t>(slot) < limit;
}

// q = u / div, r = u - q * div, with a 32-bit division when both fit.
__device__ __forceinline__ void divmod(int64_t u, int64_t div, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(u) | static_cast<uint64_t>(div)) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(u) / static_cast<uint32_t>(div);
    q = q32;
  } else {
    q = u / div;
  }
  r = u - q * div;
}

constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread

template <int DT>
__device__ void run_tensor(const TensorDesc& d, int64_t lb, Acc& a) {
  using Raw = typename Elem<DT>::Raw;
  constexpr int kVec = 16 / sizeof(Raw);
  const int64_t tid = lb * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(d.nblocks) * blockDim.x;
  const Raw* base = static_cast<const Raw*>(d.ptr);
  Packed pk = packed_init<DT>();

  if (d.mode == kFull && d.contiguous == 2) {
    // 16-byte vector loads, kUnroll in flight per thread.
    const uint4* p = static_cast<const uint4*>(d.ptr);
    const int64_t nvec = d.n / kVec;
    int64_t v = tid;
    for (; v + (kUnroll - 1) * stride < nvec; v += kUnroll * stride) {
      uint4 w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) w[u] = __ldg(p + v + u * stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) visit_vec<DT>(w[u], a, pk);
    }
    for (; v < nvec; v += stride) visit_vec<DT>(__ldg(p + v), a, pk);
    for (int64_t i = nvec * kVec + tid; i < d.n; i += stride) {
      visit<DT>(base[i], a);
      a.seen += 1;
    }
    a.commit();
    fold_packed<DT>(pk, a);
    return;
  }
  if (d.mode == kPaged) {
    int64_t start, count;
    paged_range(d, start, count);
    if (d.contiguous == 2) {
      // Work unit of a warp: kUnroll*32 consecutive vectors of one page, so the page
      // index is looked up (and the unit divided) once per unit, not per vector; the
      // next unit's page index is loaded while the current unit's data is in flight.
      constexpr int64_t kUnit = 32 * kUnroll;
      const int lane = threadIdx.x & 31;
      const int64_t wpb = blockDim.x >> 5;
      const int64_t wstride = static_cast<int64_t>(d.nblocks) * wpb;
      const int64_t vpp = d.n / kVec;  // vectors per page (a page is a whole number)
      const int64_t pvs = d.page_stride / kVec;  // page stride in vectors
      const int64_t upp = (vpp + kUnit - 1) / kUnit;  // units per page
      const int64_t units = count * upp;
      const uint4* b = static_cast<const uint4*>(d.ptr);
      int64_t u = lb * wpb + (threadIdx.x >> 5);
      if (vpp > 0 && u < units) {
        int64_t j, c;
        divmod(u, upp, j, c);
        int64_t page = d.indices[start + j];
        int32_t lim = page_limit(d, start + j);
        while (true) {
          const bool ok = page_ok(d, page);
          const uint4* p = b + (ok ? page : 0) * pvs + c * kUnit + lane;
          // vectors of the page from p on (none of a page outside the cache)
          const int64_t rem = ok ? vpp - c * kUnit - lane : 0;
          uint4 w[kUnroll];
          const bool whole = rem > (kUnroll - 1) * 32;
          if (whole) {
#pragma unroll
            for (int k = 0; k < kUnroll; ++k) w[k] = __ldg(p + k * 32);
          } else {
#pragma unroll
            for (int k = 0; k < kUnroll; ++k)
              w[k] = (k * 32 < rem) ? __ldg(p + k * 32) : make_uint4(0u, 0u, 0u, 0u);
          }
          const int64_t un = u + wstride;
          int64_t jn = 0, cn = 0, pagen = 0;
          int32_t limn = INT32_MAX;
          if (un < units) {
            divmod(un, upp, jn, cn);
            pagen = d.indices[start + jn];
            limn = jn == j ? lim : page_limit(d, start + jn);
          }
          if (lim < d.page_size) {  // a request's last page: only its filled slots
            // (a vector never straddles two slots: describe() checks slot_stride)
#pragma unroll
            for (int k = 0; k < kUnroll; ++k)
              if (k * 32 < rem && slot_ok(d, (c * kUnit + lane + k * 32) * kVec, lim))
                visit_vec<DT>(w[k], a, pk);
          } else if (whole) {
#pragma unroll
            for (int k = 0; k < kUnroll; ++k) visit_vec<DT>(w[k], a, pk);
          } else {
#pragma unroll
            for (int k = 0; k < kUnroll; ++k)
              if (k * 32 < rem) visit_vec<DT>(w[k], a, pk);
          }
          if (un >= units) break;
          u = un;
          j = jn;
          c = cn;
          page = pagen;
          lim = limn;
        }
      }
      fold_packed<DT>(pk, a);
      return;
    }
    const int64_t total = count * d.n;
    int64_t lim_j = -1;  // the page whose limit `lim` holds (a thread's pages repeat)
    int32_t lim = INT32_MAX;
    for (int64_t i = tid; i < total; i += stride) {
      int64_t j = i / d.n, r = i - j * d.n;
      if (d.last_page_len != nullptr) {
        if (j != lim_j) {
          lim_j = j;
          lim = page_limit(d, start + j);
        }
        if (!slot_ok(d, r, lim)) continue;
      }
      int64_t page = d.indices[start + j];
      if (!page_ok(d, page)) continue;
      int64_t off = d.contiguous ? r : strided_offset(r, d);
      visit<DT>(base[page * d.page_stride + off], a);
      a.seen += 1;
      a.commit();
    }
    return;
  }
  // Full (non-vectorisable) or sampled: logical index -> element offset.
  for (int64_t i = tid; i < d.n; i += stride) {
    int64_t logical = i * d.step;
    int64_t off = d.contiguous ? logical : strided_offset(logical, d);
    visit<DT>(base[off], a);
    a.seen += 1;
    a.commit();
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void block_flush(const Acc& a, bool is_float, int64_t* row) {
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
  unsigned long long nan = warp_sum(static_cast<unsigned long long>(a.nan)),
                     inf = warp_sum(static_cast<unsigned long long>(a.inf)),
                     seen = warp_sum(static_cast<unsigned long long>(a.seen));
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
  if (lane != 0 || seen == 0) return;  // thread 0 below; every thread returns here
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

// "Last block publishes and re-zeroes".  Every block calls it exactly once, after its
// block_flush (whose atomics thread 0 issued): thread 0 fences them and counts the
// block; the block that counts gridDim.x - 1 sees every other block's atomics (each
// fenced before its count) and publishes rows [row_lo, row_hi).
__device__ __forceinline__ long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<long long>(t);
}

template <class Desc>
__device__ __forceinline__ void publish_rows(const Desc& desc, int64_t* out) {
  __shared__ unsigned int s_last;
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(desc.counter, 1u) == gridDim.x - 1 ? 1u : 0u;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const int64_t lo = static_cast<int64_t>(desc.row_lo) * kRowWords;
  const int64_t hi = static_cast<int64_t>(desc.row_hi) * kRowWords;
  long long* acc = reinterpret_cast<long long*>(out);
  long long* pub = reinterpret_cast<long long*>(desc.publish);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const long long v = __ldcg(acc + i);  // L2: where the atomics landed
    pub[i] = v;
    if (desc.rezero) __stcg(acc + i, 0LL);
  }
  __threadfence_system();  // publish may be pinned host memory
  __syncthreads();
  if (threadIdx.x == 0) {
    if (desc.stamp_end != nullptr) {
      *reinterpret_cast<volatile long long*>(desc.stamp_end) = global_ns();
      __threadfence_system();
    }
    atomicExch(desc.counter, 0u);
  }
}

template <int MaxT>
__global__ void __launch_bounds__(kStatsThreads, kStatsMinBlocksPerSm)
    tensor_stats_kernel(const __grid_constant__ LaunchDescT<MaxT> desc, int64_t* out) {
  // A replay that is not traced: every block leaves before touching a row, a stamp or
  // the counter (the gate is set in stream order before the replay; L2, not L1).
  if (desc.gate != nullptr && __ldcg(desc.gate) == 0) return;
  // Block 0 is among the first to run: the previous kernel on the stream has ended.
  // Its thread 0 fences before counting the block (publish_rows), so the publishing
  // block reads the stamp with the rows.
  if (desc.stamp_start != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    const long long now = global_ns();
    *desc.stamp_start = now;
    if (desc.stamp_also != nullptr) *desc.stamp_also = now;
  }
  if (desc.count > 0) {
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
  if (desc.counter != nullptr) publish_rows(desc, out);
}

// A replay's rows into its pinned slot (mapped: `dst` is its device address), as a
// kernel on the replay's stream rather than a copy-engine memcpy, which waits for the
// graph's end and holds the next replay behind it (about 18 us of idle GPU a replay of
// the captured decode step, H100).
// `head` (or null): the word the graph's head node stamped (head_stamp_kernel); its value
// goes to dst[head_at] and this kernel's own start to dst[head_at + 1], in place of
// those words of `src` (unused words of the graph's anchor row): the replay's GPU time
// without an event pair around it.  One thread writes each word, so no copy races them.
__global__ void copy_rows_kernel(const long long* __restrict__ src, long long* dst,
                                 int64_t words, const long long* head, int64_t head_at) {
  const long long now = head != nullptr ? global_ns() : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < words;
       i += stride)
    dst[i] = head == nullptr ? src[i] : i == head_at ? *head : i == head_at + 1 ? now : src[i];
  __threadfence_system();  // the host reads them once the slot's event completes
}

__global__ void head_stamp_kernel(long long* word) { *word = global_ns(); }

}  // namespace

int launch_copy_rows(const int64_t* src, int64_t* dst, int64_t words, void* stream,
                     const int64_t* head, int64_t head_at) {
  if (words <= 0) return 0;
  if (head != nullptr && (head_at < 0 || head_at + 1 >= words))
    return static_cast<int>(cudaErrorInvalidValue);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((words + threads - 1) / threads, 32);
  copy_rows_kernel<<<static_cast<int>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const long long*>(src), reinterpret_cast<long long*>(dst), words,
      reinterpret_cast<const long long*>(head), head_at);
  return static_cast<int>(cudaGetLastError());
}

const void* head_stamp_kernel_fn() { return reinterpret_cast<const void*>(&head_stamp_kernel); }

bool small_launches = true;

int launch_tensor_stats(const LaunchDesc& desc, int total_blocks, int threads, int64_t* out,
                        void* stream) {
  if (total_blocks <= 0 || (desc.count <= 0 && desc.counter == nullptr)) return 0;
  if (desc.count <= 0 && total_blocks != 1) return static_cast<int>(cudaErrorInvalidValue);
  if (threads <= 0 || threads > kStatsThreads || threads % 32 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (desc.count <= kSmallLaunch && small_launches) {
    SmallLaunchDesc small;
    for (int k = 0; k < desc.count; ++k) small.t[k] = desc.t[k];
    small.counter = desc.counter;
    small.publish = desc.publish;
    small.stamp_start = desc.stamp_start;
    small.stamp_end = desc.stamp_end;
    small.stamp_also = desc.stamp_also;
    small.gate = desc.gate;
    small.row_lo = desc.row_lo;
    small.row_hi = desc.row_hi;
    small.rezero = desc.rezero;
    small.count = desc.count;
    tensor_stats_kernel<kSmallLaunch><<<total_blocks, threads, 0, s>>>(small, out);
  } else {
    tensor_stats_kernel<kMaxTensorsPerLaunch><<<total_blocks, threads, 0, s>>>(desc, out);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace otel_fi

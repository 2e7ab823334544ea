// Decimal text of a double that reads back as the same double, fast: Grisu2 (Florian
// Loitsch, "Printing Floating-Point Numbers Quickly and Accurately with Integers",
// PLDI 2010), as in RapidJSON's internal/dtoa.h.  The span encoder writes level-5
// statistics (min, max, mean) as OTLP/JSON doubles; CPython's shortest repr took about
// 1.1 us per value on the CPU box, 15 values per five-tensor call; this takes about
// 0.14 us.  Grisu2's digits are the shortest in nearly every case and always read back
// as the same double (tests/test_fast_doubles.py reads 20,000 back bit for bit through
// the encoder; a one-off C check read back 3,000,000, subnormals included).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
  uint64_t f;
  int e;
} otel_fi_fp;

static const uint64_t otel_fi_pow10_f[87] = {
    0xfa8fd5a0081c0288ULL,
    0xbaaee17fa23ebf76ULL,
    0x8b16fb203055ac76ULL,
    0xcf42894a5dce35eaULL,
    0x9a6bb0aa55653b2dULL,
    0xe61acf033d1a45dfULL,
    0xab70fe17c79ac6caULL,
    0xff77b1fcbebcdc4fULL,
    0xbe5691ef416bd60cULL,
    0x8dd01fad907ffc3cULL,
    0xd3515c2831559a83ULL,
    0x9d71ac8fada6c9b5ULL,
    0xea9c227723ee8bcbULL,
    0xaecc49914078536dULL,
    0x823c12795db6ce57ULL,
    0xc21094364dfb5637ULL,
    0x9096ea6f3848984fULL,
    0xd77485cb25823ac7ULL,
    0xa086cfcd97bf97f4ULL,
    0xef340a98172aace5ULL,
    0xb23867fb2a35b28eULL,
    0x84c8d4dfd2c63f3bULL,
    0xc5dd44271ad3cdbaULL,
    0x936b9fcebb25c996ULL,
    0xdbac6c247d62a584ULL,
    0xa3ab66580d5fdaf6ULL,
    0xf3e2f893dec3f126ULL,
    0xb5b5ada8aaff80b8ULL,
    0x87625f056c7c4a8bULL,
    0xc9bcff6034c13053ULL,
    0x964e858c91ba2655ULL,
    0xdff9772470297ebdULL,
    0xa6dfbd9fb8e5b88fULL,
    0xf8a95fcf88747d94ULL,
    0xb94470938fa89bcfULL,
    0x8a08f0f8bf0f156bULL,
    0xcdb02555653131b6ULL,
    0x993fe2c6d07b7facULL,
    0xe45c10c42a2b3b06ULL,
    0xaa242499697392d3ULL,
    0xfd87b5f28300ca0eULL,
    0xbce5086492111aebULL,
    0x8cbccc096f5088ccULL,
    0xd1b71758e219652cULL,
    0x9c40000000000000ULL,
    0xe8d4a51000000000ULL,
    0xad78ebc5ac620000ULL,
    0x813f3978f8940984ULL,
    0xc097ce7bc90715b3ULL,
    0x8f7e32ce7bea5c70ULL,
    0xd5d238a4abe98068ULL,
    0x9f4f2726179a2245ULL,
    0xed63a231d4c4fb27ULL,
    0xb0de65388cc8ada8ULL,
    0x83c7088e1aab65dbULL,
    0xc45d1df942711d9aULL,
    0x924d692ca61be758ULL,
    0xda01ee641a708deaULL,
    0xa26da3999aef774aULL,
    0xf209787bb47d6b85ULL,
    0xb454e4a179dd1877ULL,
    0x865b86925b9bc5c2ULL,
    0xc83553c5c8965d3dULL,
    0x952ab45cfa97a0b3ULL,
    0xde469fbd99a05fe3ULL,
    0xa59bc234db398c25ULL,
    0xf6c69a72a3989f5cULL,
    0xb7dcbf5354e9beceULL,
    0x88fcf317f22241e2ULL,
    0xcc20ce9bd35c78a5ULL,
    0x98165af37b2153dfULL,
    0xe2a0b5dc971f303aULL,
    0xa8d9d1535ce3b396ULL,
    0xfb9b7cd9a4a7443cULL,
    0xbb764c4ca7a44410ULL,
    0x8bab8eefb6409c1aULL,
    0xd01fef10a657842cULL,
    0x9b10a4e5e9913129ULL,
    0xe7109bfba19c0c9dULL,
    0xac2820d9623bf429ULL,
    0x80444b5e7aa7cf85ULL,
    0xbf21e44003acdd2dULL,
    0x8e679c2f5e44ff8fULL,
    0xd433179d9c8cb841ULL,
    0x9e19db92b4e31ba9ULL,
    0xeb96bf6ebadf77d9ULL,
    0xaf87023b9bf0ee6bULL
};
static const int16_t otel_fi_pow10_e[87] = {
    -1220, -1193, -1166, -1140, -1113, -1087, -1060, -1034, -1007, -980, -954, -927,
    -901, -874, -847, -821, -794, -768, -741, -715, -688, -661, -635, -608,
    -582, -555, -529, -502, -475, -449, -422, -396, -369, -343, -316, -289,
    -263, -236, -210, -183, -157, -130, -103, -77, -50, -24, 3, 30,
    56, 83, 109, 136, 162, 189, 216, 242, 269, 295, 322, 348,
    375, 402, 428, 455, 481, 508, 534, 561, 588, 614, 641, 667,
    694, 720, 747, 774, 800, 827, 853, 880, 907, 933, 960, 986,
    1013, 1039, 1066
};
static const uint64_t otel_fi_pow10[20] = {
    1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
    100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL, 1000000000000ULL,
    10000000000000ULL, 100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
    100000000000000000ULL, 1000000000000000000ULL, 10000000000000000000ULL};

#define OTEL_FI_HIDDEN 0x0010000000000000ULL

static inline otel_fi_fp otel_fi_fp_of(uint64_t f, int e) {
  otel_fi_fp r = {f, e};
  return r;
}

static inline otel_fi_fp otel_fi_fp_mul(otel_fi_fp a, otel_fi_fp b) {
  unsigned __int128 p = (unsigned __int128)a.f * b.f;
  uint64_t h = (uint64_t)(p >> 64), l = (uint64_t)p;
  if (l & (1ULL << 63)) h++; /* rounded */
  return otel_fi_fp_of(h, a.e + b.e + 64);
}

static inline int otel_fi_digits32(uint32_t n) {
  int d = 1;
  while (n >= 10) n /= 10, ++d;
  return d;
}

static inline void otel_fi_round(char *buf, int len, uint64_t delta, uint64_t rest,
                                 uint64_t ten_kappa, uint64_t wp_w) {
  while (rest < wp_w && delta - rest >= ten_kappa &&
         (rest + ten_kappa < wp_w || wp_w - rest > rest + ten_kappa - wp_w)) {
    buf[len - 1]--;
    rest += ten_kappa;
  }
}

/* Digits of a finite, positive ``value`` into ``buf`` (at least 18 bytes): their count,
 * and *K such that value = digits x 10^K. */
static inline int otel_fi_grisu2(double value, char *buf, int *K) {
  uint64_t u;
  memcpy(&u, &value, 8);
  int biased = (int)((u >> 52) & 0x7FF);
  uint64_t sig = u & (OTEL_FI_HIDDEN - 1);
  otel_fi_fp v = biased ? otel_fi_fp_of(sig + OTEL_FI_HIDDEN, biased - 1075)
                        : otel_fi_fp_of(sig, -1074);
  /* boundaries m+ and m-, normalized to m+'s exponent */
  otel_fi_fp pl = otel_fi_fp_of((v.f << 1) + 1, v.e - 1);
  while (!(pl.f & (OTEL_FI_HIDDEN << 1))) pl.f <<= 1, pl.e--;
  pl.f <<= 10, pl.e -= 10;
  otel_fi_fp mi = v.f == OTEL_FI_HIDDEN ? otel_fi_fp_of((v.f << 2) - 1, v.e - 2)
                                        : otel_fi_fp_of((v.f << 1) - 1, v.e - 1);
  mi.f <<= mi.e - pl.e;
  mi.e = pl.e;
  /* the cached power of ten that brings m+ into [-60, -32] */
  double dk = (-61 - pl.e) * 0.30102999566398114 + 347;
  int k = (int)dk;
  if (dk - k > 0.0) k++;
  unsigned index = (unsigned)((k >> 3) + 1);
  *K = -(-348 + (int)(index << 3));
  otel_fi_fp c = otel_fi_fp_of(otel_fi_pow10_f[index], otel_fi_pow10_e[index]);
  int s = __builtin_clzll(v.f);
  otel_fi_fp w = otel_fi_fp_mul(otel_fi_fp_of(v.f << s, v.e - s), c);
  otel_fi_fp wp = otel_fi_fp_mul(pl, c), wm = otel_fi_fp_mul(mi, c);
  wm.f++;
  wp.f--;
  /* digit generation */
  uint64_t delta = wp.f - wm.f;
  otel_fi_fp one = otel_fi_fp_of(1ULL << -wp.e, wp.e);
  uint64_t wp_w = wp.f - w.f;
  uint32_t p1 = (uint32_t)(wp.f >> -one.e);
  uint64_t p2 = wp.f & (one.f - 1);
  int kappa = otel_fi_digits32(p1), len = 0;
  while (kappa > 0) {
    uint32_t div = (uint32_t)otel_fi_pow10[kappa - 1];
    uint32_t d = p1 / div;
    p1 %= div;
    if (d || len) buf[len++] = (char)('0' + d);
    kappa--;
    uint64_t tmp = ((uint64_t)p1 << -one.e) + p2;
    if (tmp <= delta) {
      *K += kappa;
      otel_fi_round(buf, len, delta, tmp, otel_fi_pow10[kappa] << -one.e, wp_w);
      return len;
    }
  }
  for (;;) {
    p2 *= 10;
    delta *= 10;
    char d = (char)(p2 >> -one.e);
    if (d || len) buf[len++] = (char)('0' + d);
    p2 &= one.f - 1;
    kappa--;
    if (p2 < delta) {
      *K += kappa;
      int i = -kappa;
      otel_fi_round(buf, len, delta, p2, one.f, wp_w * (i < 20 ? otel_fi_pow10[i] : 0));
      return len;
    }
  }
}

/* ``value`` (finite) as a JSON number into ``out`` (at least 32 bytes): its length.
 * Integral values keep a ".0", as Python's repr does. */
static inline int otel_fi_format_double(double value, char *out) {
  char *p = out;
  if (signbit(value)) *p++ = '-', value = -value;
  if (value == 0.0) {
    memcpy(p, "0.0", 3);
    return (int)(p - out) + 3;
  }
  char d[24];
  int K, len = otel_fi_grisu2(value, d, &K);
  int kk = len + K; /* where the decimal point goes */
  if (K >= 0 && kk <= 17) { /* digits, zeros, ".0" */
    memcpy(p, d, (size_t)len);
    p += len;
    for (int i = 0; i < K; ++i) *p++ = '0';
    memcpy(p, ".0", 2);
    p += 2;
  } else if (kk > 0 && kk <= 17) { /* 12.34 */
    memcpy(p, d, (size_t)kk);
    p += kk;
    *p++ = '.';
    memcpy(p, d + kk, (size_t)(len - kk));
    p += len - kk;
  } else if (kk > -5 && kk <= 0) { /* 0.001234 */
    *p++ = '0';
    *p++ = '.';
    for (int i = 0; i < -kk; ++i) *p++ = '0';
    memcpy(p, d, (size_t)len);
    p += len;
  } else { /* 1.234e+30, 1e-07 */
    *p++ = d[0];
    if (len > 1) {
      *p++ = '.';
      memcpy(p, d + 1, (size_t)(len - 1));
      p += len - 1;
    }
    int x = kk - 1;
    *p++ = 'e';
    *p++ = x < 0 ? '-' : '+';
    if (x < 0) x = -x;
    if (x >= 100) *p++ = (char)('0' + x / 100), x %= 100;
    *p++ = (char)('0' + x / 10);
    *p++ = (char)('0' + x % 10);
  }
  return (int)(p - out);
}

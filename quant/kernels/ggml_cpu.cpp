// mamba-cli's native 4-bit CPU kernels: matrix products over GGUF blocks as they lie in the file.
//
// Registered as torch custom ops in the `mamba_cli` namespace (quant/native.py builds and loads this
// file once per machine and torch version):
//
//   ggml_mm(x, w, type, k)      x : (M, K) float32, w : (N, row_bytes) uint8 blocks of `type`
//                               -> (M, N) float32 = x @ dequant(w).T
//   ggml_mm_cat(x, ws, types, k, rows)   several weight matrices side by side -> (M, sum of N)
//   ggml_mm_id(x, ws, type, k, ids)      row r of x times ws[ids[r]] -> (M, N): a MoE's chosen experts
//   ggml_dequant(w, type, k)    w : (N, row_bytes) uint8 -> (N, K) float32
//
// As llama.cpp does, activations are quantized to 8 bits per block first (Q8_0 for the 32-blocks of
// Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for the 256-blocks of Q4_K/Q5_K/Q6_K), the block dot
// products are integer, and each block's integer sum is scaled and accumulated in float32.
// Rounding follows llama.cpp's x86 build: round-half-to-even everywhere, fp16 by IEEE rounding.
//
// Legend: M activation rows, N weight rows (outputs), K inputs, R activation rows handled together
// (up to 4: the unpacked weight block is reused for each), RW weight rows handled together (the 32-block
// types: 4 for R <= 2, else 2; each activation block is reused for each), nb blocks per row.
//
// Paths: AVX2 (+FMA, F16C) when compiled for a CPU that has it, with VNNI dot products where the CPU has
// AVX-512-VNNI or AVX-VNNI; NEON with the ARMv8.2 dot product (SDOT) on ARM CPUs that have it (Apple M1 and
// later, Graviton 2 and later, Cortex-A76 and later): the one-token and few-row products of every type, in
// the plain path's order of float operations (same results); otherwise plain C++ of the same integer
// arithmetic, auto-vectorized by the compiler. On AVX2, from a few activation rows on,
// the weights go 8 rows at a time through tiles built per call (see "tiles" below: prefill); one token of
// Q4_0 / Q4_1 weights takes two rows per vector and two blocks at a time (dot_nib4). Threads come
// from torch's intra-op pool (at::parallel_for over N, each thread a contiguous share, the idle taking
// others' rows from the back).

#ifndef MC_CORE_ONLY  // MC_CORE_ONLY: the kernels without torch (tests/native/simd_check.cpp includes this file)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#else
#include <cstdlib>
#define TORCH_CHECK(cond, ...) \
  do {                         \
    if (!(cond)) std::abort(); \
  } while (0)
#endif

#include <cmath>
#include <cstdint>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MC_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define MC_NEON 1
#endif

namespace {

// ---------------------------------------------------------------- block layouts (ggml-common.h)

enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };
constexpr int QK = 32;    // elements per block of the 32-block types
constexpr int QK_K = 256; // elements per super-block of the K types

using fp16 = uint16_t;
struct BQ4_0 { fp16 d; uint8_t qs[16]; };                                  // 18 bytes / 32
struct BQ4_1 { fp16 d, m; uint8_t qs[16]; };                               // 20 bytes / 32
struct BQ5_0 { fp16 d; uint8_t qh[4]; uint8_t qs[16]; };                   // 22 bytes / 32
struct BQ5_1 { fp16 d, m; uint8_t qh[4]; uint8_t qs[16]; };                // 24 bytes / 32
struct BQ8_0 { fp16 d; int8_t qs[32]; };                                   // 34 bytes / 32
struct BQ8_1 { fp16 d, s; int8_t qs[32]; };                                // 36: s = d * sum(qs)
struct BQ4_K { fp16 d, dmin; uint8_t scales[12]; uint8_t qs[128]; };       // 144 bytes / 256
struct BQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; fp16 d; }; // 210 bytes / 256
struct BQ8_K { float d; int8_t qs[256]; int16_t bsums[16]; };              // 292: bsums per 16
static_assert(sizeof(BQ4_0) == 18 && sizeof(BQ4_1) == 20 && sizeof(BQ5_0) == 22 && sizeof(BQ5_1) == 24,
              "32-block layouts");
static_assert(sizeof(BQ8_0) == 34 && sizeof(BQ8_1) == 36 && sizeof(BQ4_K) == 144 && sizeof(BQ6_K) == 210 &&
              sizeof(BQ8_K) == 292, "block layouts");

// ---------------------------------------------------------------- fp16 and rounding

inline float h2f(fp16 h) {
#ifdef MC_AVX2
  return _cvtsh_ss(h);
#elif defined(__aarch64__)  // one fcvt: every value, subnormals and NaN payloads included, as the plain code
  __fp16 v;
  std::memcpy(&v, &h, 2);
  return (float)v;
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline fp16 f2h(float f) {
#ifdef MC_AVX2
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  x &= 0x7FFFFFFF;
  if (x >= 0x7F800000) return (fp16)(sign | 0x7C00 | (x > 0x7F800000 ? 0x200 : 0));  // inf / nan
  if (x >= 0x477FF000) return (fp16)(sign | 0x7C00);                                  // overflows
  if (x < 0x38800000) {  // subnormal half (or zero): round the shifted mantissa to nearest even
    const uint32_t shift = 126 - (x >> 23);
    if (shift > 24) return (fp16)sign;
    const uint32_t man = (x & 0x7FFFFF) | 0x800000;
    uint32_t h = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return (fp16)(sign | h);
  }
  uint32_t h = ((x >> 13) - (112u << 10));
  const uint32_t rem = x & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return (fp16)(sign | h);
#endif
}

inline int round_even(float v) { return (int)std::nearbyint(v); }  // default FE_TONEAREST

// ---------------------------------------------------------------- activation quantization

// Q8_0 / Q8_1 of one row of K values (K % 32 == 0). llama.cpp's AVX2 path: id = 127 / amax.
#ifdef MC_AVX2
// 32 floats times id, rounded half to even -> 32 int8 in order (the same values as round_even(x * id));
// *sum gets their sum. The values are within +-127, so the packs never saturate.
inline __m256i round_pack32(const float* x, __m256 id, int* sum) {
  __m256i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), id),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (sum) {
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i r = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x4e));
    *sum = _mm_cvtsi128_si32(_mm_add_epi32(r, _mm_shuffle_epi32(r, 0xb1)));
  }
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline float max_abs(const float* x, int n) {  // n % 8 == 0
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8)  // NaN as the first operand yields m: NaNs are skipped, as std::max does
    m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), m);
  __m128 r = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}
#endif

#ifdef MC_NEON
inline float max_abs(const float* x, int n) {  // n % 4 == 0; maxNum skips NaNs, as std::max does
  float32x4_t m = vdupq_n_f32(0.f);
  for (int j = 0; j < n; j += 4) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(x + j)));
  return vmaxnmvq_f32(m);
}

// n floats times id rounded half to even (the same values as round_even(x * id)), at most 127 (the plain
// Q8_K path's min), as int8; returns their sum
inline int round_pack(const float* x, float id, int8_t* q, int n) {
  int32x4_t sum = vdupq_n_s32(0);
  const int32x4_t top = vdupq_n_s32(127);
  for (int j = 0; j < n; j += 8) {
    const int32x4_t a = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j), id)), top);
    const int32x4_t b = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j + 4), id)), top);
    sum = vaddq_s32(sum, vaddq_s32(a, b));
    vst1_s8(q + j, vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(b))));
  }
  return vaddvq_s32(sum);
}
#endif

// sums (Q8_0 only, optional): each block's sum of quants, as float (exact: at most 32 x 127)
template <bool WithSum>
void quantize_q8(const float* x, void* out, int64_t k, float* sums = nullptr) {
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
#if defined(MC_AVX2) || defined(MC_NEON)
    const float amax = max_abs(x, QK);
#else
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
#endif
    const float d = amax / 127.f, id = amax != 0.f ? 127.f / amax : 0.f;
    int8_t* qs;
    if constexpr (WithSum) {
      auto* b = static_cast<BQ8_1*>(out) + i;
      b->d = f2h(d);
      qs = b->qs;
    } else {
      auto* b = static_cast<BQ8_0*>(out) + i;
      b->d = f2h(d);
      qs = b->qs;
    }
    int sum = 0;
#ifdef MC_AVX2
    _mm256_storeu_si256((__m256i*)qs, round_pack32(x, _mm256_set1_ps(id), WithSum || sums ? &sum : nullptr));
#elif defined(MC_NEON)
    sum = round_pack(x, id, qs, QK);
#else
    for (int j = 0; j < QK; ++j) {
      qs[j] = (int8_t)round_even(x[j] * id);
      sum += qs[j];
    }
#endif
    if constexpr (WithSum) static_cast<BQ8_1*>(out)[i].s = f2h(d * (float)sum);
    else if (sums) sums[i] = (float)sum;
  }
}

// Q8_K of one row (K % 256 == 0): scale from the signed value of largest magnitude (the first one), -127 / max.
void quantize_q8_k(const float* x, BQ8_K* y, int64_t k) {
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K, ++y) {
    float amax = 0.f, max = 0.f;
#if defined(MC_AVX2) || defined(MC_NEON)
    amax = max_abs(x, QK_K);
    for (int j = 0; j < QK_K; ++j)
      if (std::fabs(x[j]) == amax) { max = x[j]; break; }
#else
    for (int j = 0; j < QK_K; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) { amax = ax; max = x[j]; }
    }
#endif
    if (amax == 0.f) {
      std::memset(y, 0, sizeof(BQ8_K));
      continue;
    }
    const float iscale = -127.f / max;
#ifdef MC_AVX2
    const __m256 is = _mm256_set1_ps(iscale);
    for (int j = 0; j < QK_K; j += 32)  // |iscale * x| <= 127: the scalar path's min(127, .) never bites
      _mm256_storeu_si256((__m256i*)(y->qs + j), round_pack32(x + j, is, nullptr));
#elif defined(MC_NEON)
    round_pack(x, iscale, y->qs, QK_K);
#else
    for (int j = 0; j < QK_K; ++j) y->qs[j] = (int8_t)std::min(127, round_even(iscale * x[j]));
#endif
    for (int j = 0; j < QK_K / 16; ++j) {
      int s = 0;
      for (int l = 0; l < 16; ++l) s += y->qs[16 * j + l];
      y->bsums[j] = (int16_t)s;
    }
    y->d = 1.f / iscale;
  }
}

// Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes.
inline void k4_scales(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      sc[j] = q[j] & 63;
      mn[j] = q[j + 4] & 63;
    } else {
      sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      mn[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
  }
}

// The same, word-parallel (x86: little-endian): u as 16 bytes, the 8 scales then the 8 mins.
inline void k4_unpack(const uint8_t* q, uint32_t u[4]) {
  std::memcpy(u, q, 12);
  u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
  const uint32_t t = u[1] & 0x3f3f3f3f;
  u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
  u[2] = t;
  u[0] &= 0x3f3f3f3f;
}

// ---------------------------------------------------------------- AVX2 helpers

#ifdef MC_AVX2
inline float hsum(__m256 x) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15) then high nibbles (16..31)
inline __m256i nibbles32(const uint8_t* p) {  // one broadcast load, one variable shift, one and
  const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  return _mm256_and_si256(_mm256_srlv_epi32(t, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0xF));
}
// 32 bits -> 32 bytes of 0xFF (bit set) or 0x00
inline __m256i bits32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
// unsigned bytes u times signed bytes s, summed in quads -> 8 int32 (one VNNI instruction where the CPU
// has it; the same sums either way, since no pair of our products reaches int16's saturation)
inline __m256i dot_us(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

#ifdef MC_NEON
// ---------------------------------------------------------------- NEON helpers (ARMv8.2 dot products)
//
// The NEON path keeps the plain path's arithmetic and order: each block's (or sub-block's) integer dot
// product from SDOT (int8 x int8, 4-lane sums), summed across lanes (exact), then scaled and accumulated in
// float32 as the plain loops do, so both give the same floats (tests/native/simd_check.cpp checks it).

// 16 bytes of nibbles -> 32 quants 0..15: the low nibbles (elements 0-15), then the high ones (16-31)
inline int8x16x2_t nibbles32(const uint8_t* qs) {
  const uint8x16_t v = vld1q_u8(qs);
  return {{vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0xF))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))}};
}

// Q5's fifth bits: bit j of the 32-bit qh -> 0x10 in byte j
inline int8x16x2_t fifth_bits32(const uint8_t* qh) {
  static const uint8_t kByte[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  uint32_t h;
  std::memcpy(&h, qh, 4);
  const uint8x16_t bytes = vreinterpretq_u8_u32(vdupq_n_u32(h)), bit = vld1q_u8(kBit), x10 = vdupq_n_u8(0x10);
  const uint8x16_t lo = vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(kByte)), bit);
  const uint8x16_t hi = vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(kByte + 16)), bit);
  return {{vreinterpretq_s8_u8(vandq_u8(lo, x10)), vreinterpretq_s8_u8(vandq_u8(hi, x10))}};
}

inline int8x16x2_t or_sub(int8x16x2_t a, int8x16x2_t b, int8_t off) {  // (a | b) - off, bytewise
  const int8x16_t o = vdupq_n_s8(off);
  return {{vsubq_s8(vorrq_s8(a.val[0], b.val[0]), o), vsubq_s8(vorrq_s8(a.val[1], b.val[1]), o)}};
}

// the sum of a[j] * y[j] over 32 int8 quants
inline int dot32_s8(const int8x16x2_t& a, const int8_t* y) {
  return vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), a.val[0], vld1q_s8(y)), a.val[1], vld1q_s8(y + 16)));
}

// the sum of a[j] * y[j] over 16 int8 quants
inline int dot16_s8(int8x16_t a, const int8_t* y) { return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), a, vld1q_s8(y))); }
#endif

// ---------------------------------------------------------------- row dot products
//
// Each dot<R> computes out[r] = <weight row w, activation row r> for r < R from quantized activations
// q8[r] (the whole row), reusing each unpacked weight block for the R activation rows.

// The 32-blocks differ only in how a block's 32 quants are unpacked. Each decoder gives them as bytes
// for the AVX2 path and one at a time for the plain path; the value is d * q (+ m). For the AVX2 path Q4_0
// and Q5_0 give their stored unsigned quants u = q + kOffset (0..15, 0..31): maddubs multiplies them with
// the signed activations directly, and the block's kOffset * sum(activation quants) is subtracted from the
// integer sum, exactly (two sign instructions a block and row fewer than signing both operands). Q8_0
// gives signed bytes; the types with a min (kMin) give 0..31.
struct DQ4_0 {
  using B = BQ4_0;
  static constexpr bool kMin = false;
  static constexpr int kOffset = 8;
  static int q(const B& b, int j) { return (j < 16 ? b.qs[j] & 0xF : b.qs[j - 16] >> 4) - 8; }
#ifdef MC_AVX2
  static __m256i v(const B& b) { return nibbles32(b.qs); }
#endif
#ifdef MC_NEON  // the NEON decoders give the quants q as the plain path does (signed, offset taken off)
  static int8x16x2_t n(const B& b) {
    const int8x16x2_t u = nibbles32(b.qs);
    return {{vsubq_s8(u.val[0], vdupq_n_s8(8)), vsubq_s8(u.val[1], vdupq_n_s8(8))}};
  }
#endif
};
struct DQ4_1 {
  using B = BQ4_1;
  static constexpr bool kMin = true;
  static constexpr int kOffset = 0;
  static int q(const B& b, int j) { return j < 16 ? b.qs[j] & 0xF : b.qs[j - 16] >> 4; }
#ifdef MC_AVX2
  static __m256i v(const B& b) { return nibbles32(b.qs); }
#endif
#ifdef MC_NEON
  static int8x16x2_t n(const B& b) { return nibbles32(b.qs); }
#endif
};
inline int fifth_bit(const uint8_t* qh, int j) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  return (int)((h >> j) & 1) << 4;
}
struct DQ5_0 {
  using B = BQ5_0;
  static constexpr bool kMin = false;
  static constexpr int kOffset = 16;
  static int q(const B& b, int j) { return (j < 16 ? b.qs[j] & 0xF : b.qs[j - 16] >> 4) + fifth_bit(b.qh, j) - 16; }
#ifdef MC_AVX2
  static __m256i v(const B& b) {  // nibble | (bit << 4)
    return _mm256_or_si256(nibbles32(b.qs), _mm256_and_si256(bits32(b.qh), _mm256_set1_epi8(0x10)));
  }
#endif
#ifdef MC_NEON
  static int8x16x2_t n(const B& b) { return or_sub(nibbles32(b.qs), fifth_bits32(b.qh), 16); }
#endif
};
struct DQ5_1 {
  using B = BQ5_1;
  static constexpr bool kMin = true;
  static constexpr int kOffset = 0;
  static int q(const B& b, int j) { return (j < 16 ? b.qs[j] & 0xF : b.qs[j - 16] >> 4) + fifth_bit(b.qh, j); }
#ifdef MC_AVX2
  static __m256i v(const B& b) {
    return _mm256_or_si256(nibbles32(b.qs), _mm256_and_si256(bits32(b.qh), _mm256_set1_epi8(0x10)));
  }
#endif
#ifdef MC_NEON
  static int8x16x2_t n(const B& b) { return or_sub(nibbles32(b.qs), fifth_bits32(b.qh), 0); }
#endif
};
struct DQ8_0 {
  using B = BQ8_0;
  static constexpr bool kMin = false;
  static constexpr int kOffset = 0;
  static int q(const B& b, int j) { return b.qs[j]; }
#ifdef MC_AVX2
  static __m256i v(const B& b) { return _mm256_loadu_si256((const __m256i*)b.qs); }
#endif
#ifdef MC_NEON
  static int8x16x2_t n(const B& b) { return {{vld1q_s8(b.qs), vld1q_s8(b.qs + 16)}}; }
#endif
};

#ifdef MC_AVX2
// A stretch of weight rows read as one stream, prefetched `ahead` bytes on, kStep bytes a step (from step
// i's place): every cache line of it, once. The 32-block types' one-token kernels read RW consecutive rows
// (a group: one block of each per step) and prefetch the group as one stretch; per-row prefetches (one a
// row and block) made RW interleaved streams of a row's length each, which short rows paid for: two threads
// from memory, in process, Q8_0 49152 x 576 18.0 -> 23.4 GB/s, 24576 x 1152 22.1 -> 25.0; Q4_0 768 x 1536
// 15.2 -> 18.5, 3072 x 768 16.3 -> 19.4, 14336 x 4096 24.2 -> 27.8; Q4_1 576 x 1536 13.4 -> 15.9, 3072 x 576
// 20.1 -> 21.2. Q6_K's one row a block: its 210-byte block spans up to 4 lines.
template <size_t kStep, decltype(_MM_HINT_T1) kHint = _MM_HINT_T1>
inline void group_prefetch(const void* row0, int64_t ahead, int64_t i) {
  const char* p = (const char*)row0 + ahead + i * (int64_t)kStep;
  for (size_t o = 0; o < kStep; o += 64) _mm_prefetch(p + o, kHint);
}

// One activation row against 4 weight rows of 4-bit quants (Q4_0, Q4_1): the one-token product, where the
// weights stream from memory once and the unpacking and summing per block bound the speed. Two rows share a
// vector (row a in the low 128 bits, row b in the high): one load, and and a shift unpack both rows' 32 quants
// into their low and high nibbles, met by the activation block's halves (each repeated in both 128-bit
// lanes); the two maddubs are summed in int16 (at most 2 x 2 x 15 x 127). Two blocks at a time (K a multiple
// of 64, as every width here: dot32 takes the rest), the four rows' integer sums end in one vector of 8 (rows
// 0, 2 / 1, 3 of blocks i and i + 1, below), converted and scaled once: ~25% fewer instructions a block and
// row than dot32's four rows of one block.
template <class D>
void dot_nib4(int64_t nb, const uint8_t* const* wr, const uint8_t* act, const float* dx, const float* sx,
              float* out, int64_t ahead) {
  using A = std::conditional_t<D::kMin, BQ8_1, BQ8_0>;
  using B = typename D::B;
  const A* y = (const A*)act;
  const B *w0 = (const B*)wr[0], *w1 = (const B*)wr[1], *w2 = (const B*)wr[2], *w3 = (const B*)wr[3];
  const __m256i m4 = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  // rows a, b of block i: [a: 8 int16 pair sums | b: 8]
  auto pair = [&](const B* a, const B* b, int64_t i, __m256i ylo, __m256i yhi) {
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)a[i].qs)),
                                              _mm_loadu_si128((const __m128i*)b[i].qs), 1);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    return _mm256_add_epi16(_mm256_maddubs_epi16(lo, ylo), _mm256_maddubs_epi16(hi, yhi));
  };
  // block i's sums: lanes [row 0 (two halves), row 2 (two) | row 1, row 3]
  auto block = [&](int64_t i) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)y[i].qs);
    const __m256i ylo = _mm256_permute4x64_epi64(v, 0x44), yhi = _mm256_permute4x64_epi64(v, 0xEE);
    return _mm256_hadd_epi32(_mm256_madd_epi16(pair(w0, w1, i, ylo, yhi), ones),
                             _mm256_madd_epi16(pair(w2, w3, i, ylo, yhi), ones));
  };
  // two blocks' activation values (i, j = i + 1) in the sums' lane order: [i, i, j, j | i, i, j, j]
  auto lanes2 = [](const float* v, int64_t i) {
    double d;
    std::memcpy(&d, v + i, 8);
    return _mm256_permute_ps(_mm256_castpd_ps(_mm256_set1_pd(d)), 0x50);
  };
  auto head32 = [](const B* b) {
    uint32_t u;
    std::memcpy(&u, b, 4);
    return (uint64_t)u;
  };
  const __m128i split16 = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
  for (int64_t i = 0; i < nb; i += 2) {  // nb even (dot32 takes odd counts)
    const int64_t j = i + 1;
    if (ahead) group_prefetch<8 * sizeof(B)>(w0, ahead, i / 2);  // two blocks of the 4 rows a step
    // [row 0 i, row 2 i, row 0 j, row 2 j | row 1 i, row 3 i, row 1 j, row 3 j]
    __m256 isum = _mm256_cvtepi32_ps(_mm256_hadd_epi32(block(i), block(j)));
    const __m256 sxv = lanes2(sx, i);
    if constexpr (D::kOffset != 0) isum = _mm256_fnmadd_ps(sxv, _mm256_set1_ps((float)D::kOffset), isum);
    if constexpr (D::kMin) {
      // each block's d and m (its first 32 bits) in the sums' lane order, d's in the low 8 bytes and m's in
      // the high 8: two 64-bit moves and a byte shuffle per 4 words, where 16 16-bit inserts crowded the
      // shuffle ports of this compute-bound loop (Q4_1, one thread, in cache: 12.4 -> 13.1 GB/s; Q4_0's d
      // alone, 8 inserts, measured no faster so)
      const __m128i wa = _mm_shuffle_epi8(_mm_set_epi64x((int64_t)(head32(w0 + j) | head32(w2 + j) << 32),
                                                         (int64_t)(head32(w0 + i) | head32(w2 + i) << 32)), split16);
      const __m128i wb = _mm_shuffle_epi8(_mm_set_epi64x((int64_t)(head32(w1 + j) | head32(w3 + j) << 32),
                                                         (int64_t)(head32(w1 + i) | head32(w3 + i) << 32)), split16);
      acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtph_ps(_mm_unpacklo_epi64(wa, wb)), lanes2(dx, i)), isum, acc);
      accm = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_unpackhi_epi64(wa, wb)), sxv, accm);
    } else {
      const __m256 dw = _mm256_cvtph_ps(_mm_setr_epi16((short)w0[i].d, (short)w2[i].d, (short)w0[j].d,
                                                       (short)w2[j].d, (short)w1[i].d, (short)w3[i].d,
                                                       (short)w1[j].d, (short)w3[j].d));
      acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, lanes2(dx, i)), isum, acc);
    }
  }
  // row 0: lanes 0 + 2, row 2: 1 + 3, row 1: 4 + 6, row 3: 5 + 7
  const __m256 t = _mm256_add_ps(acc, accm);
  const __m128 lo = _mm256_castps256_ps128(t), hi = _mm256_extractf128_ps(t, 1);
  const __m128 slo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo)), shi = _mm_add_ps(hi, _mm_movehl_ps(hi, hi));
  out[0] = _mm_cvtss_f32(slo);
  out[2] = _mm_cvtss_f32(_mm_movehdup_ps(slo));
  out[1] = _mm_cvtss_f32(shi);
  out[3] = _mm_cvtss_f32(_mm_movehdup_ps(shi));
}
#endif

// 32-blocks against Q8_0 activations (Q8_1 for the types with a min, whose min term is m * s). dx, sx:
// the activation blocks' d and s as float (for Q8_0 activations sx is the sum of the block's quants).
// RW weight rows at once: each activation block is loaded once
// for the RW rows, and the RW x R independent accumulator chains keep the core busy while the weight
// streams arrive (one row at a time was latency-bound: ~3 ns a block).
template <class D, int RW, int R>
void dot32(int64_t nb, const uint8_t* const* wr, const uint8_t* const* act, const float* const* dx,
           const float* const* sx, float* out, int64_t ahead) {
  using A = std::conditional_t<D::kMin, BQ8_1, BQ8_0>;
  using B = typename D::B;
  const A* const* q8 = (const A* const*)act;
  const B* w[RW];
  for (int c = 0; c < RW; ++c) w[c] = (const B*)wr[c];
  float mins[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) mins[c][r] = 0.f;
#ifdef MC_AVX2
  if constexpr (RW == 4 && R == 1 && (std::is_same_v<D, DQ4_0> || std::is_same_v<D, DQ4_1>)) {
    if (nb % 2 == 0) {  // one token (rows of an odd block count, rare, go on below)
      dot_nib4<D>(nb, wr, act[0], dx[0], sx[0], out, 4 * ahead);
      return;
    }
  }
  constexpr bool kUnsigned = D::kMin || D::kOffset != 0;  // weight bytes maddubs takes as they are
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
  constexpr bool kPairs16 = false;
#else
  constexpr bool kPairs16 = kUnsigned;  // 5-bit quants at most: maddubs' int16 pair sums can be added once more
#endif
  if constexpr (RW == 4) {
    // Four rows: each block's four integer dot products are summed across their lanes together (three
    // hadds) and scaled as one 4-float vector, the four weight scales converted by one vcvtph2ps: 2.5
    // fewer instructions a block and row than scaling each row's 8 lanes (this loop is compute-bound)
    __m128 acc4[R], min4[R];
    for (int r = 0; r < R; ++r) acc4[r] = min4[r] = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; ++i) {
      // four groups of rows on, into L2: one group ahead (into L1) left a large matrix read from memory
      // at 14-15 GB/s on two threads, four on at 24-26 (SmolLM2's Q8_0 head, 49152 x 576)
      if (ahead) group_prefetch<RW * sizeof(B)>(w[0], 4 * ahead, i);
      __m256i y[R], s[RW][R];
      for (int r = 0; r < R; ++r) y[r] = _mm256_loadu_si256((const __m256i*)q8[r][i].qs);
      for (int c = 0; c < RW; ++c) {
        const __m256i q = D::v(w[c][i]);
        const __m256i aq = kUnsigned ? q : _mm256_sign_epi8(q, q);
        for (int r = 0; r < R; ++r) {
          if constexpr (kPairs16)
            s[c][r] = _mm256_maddubs_epi16(aq, y[r]);
          else
            s[c][r] = dot_us(aq, kUnsigned ? y[r] : _mm256_sign_epi8(y[r], q));
        }
      }
      const __m128 dw = _mm_cvtph_ps(_mm_setr_epi16((short)w[0][i].d, (short)w[1][i].d, (short)w[2][i].d,
                                                    (short)w[3][i].d, 0, 0, 0, 0));
      __m128 mw;
      if constexpr (D::kMin)
        mw = _mm_cvtph_ps(_mm_setr_epi16((short)w[0][i].m, (short)w[1][i].m, (short)w[2][i].m, (short)w[3][i].m,
                                         0, 0, 0, 0));
      for (int r = 0; r < R; ++r) {
        __m256i h;
        if constexpr (kPairs16) {  // int16 pair sums of two rows added (at most 4 * 31 * 127), then widened
          const __m256i one = _mm256_set1_epi16(1);
          h = _mm256_hadd_epi32(_mm256_madd_epi16(_mm256_hadd_epi16(s[0][r], s[1][r]), one),
                                _mm256_madd_epi16(_mm256_hadd_epi16(s[2][r], s[3][r]), one));
        } else {
          h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0][r], s[1][r]), _mm256_hadd_epi32(s[2][r], s[3][r]));
        }
        const __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        __m128 isum = _mm_cvtepi32_ps(sum4);
        if constexpr (D::kOffset != 0)  // integers below 2^24: exact in float
          isum = _mm_fnmadd_ps(_mm_set1_ps(sx[r][i]), _mm_set1_ps((float)D::kOffset), isum);
        acc4[r] = _mm_fmadd_ps(_mm_mul_ps(dw, _mm_set1_ps(dx[r][i])), isum, acc4[r]);
        if constexpr (D::kMin) min4[r] = _mm_fmadd_ps(mw, _mm_set1_ps(sx[r][i]), min4[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float v[4];
      _mm_storeu_ps(v, _mm_add_ps(acc4[r], min4[r]));
      for (int c = 0; c < RW; ++c) out[c * R + r] = v[c];
    }
    return;
  }
  __m256 acc[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < nb; ++i) {
    __m256i y[R];
    for (int r = 0; r < R; ++r) y[r] = _mm256_loadu_si256((const __m256i*)q8[r][i].qs);
    for (int c = 0; c < RW; ++c) {
      // RW interleaved row streams confuse the hardware prefetcher: fetch the next group's rows (`ahead`
      // bytes on) at the pace this group is read
      if constexpr (RW > 1) _mm_prefetch((const char*)(w[c] + i) + ahead, _MM_HINT_T0);
      const __m256i q = D::v(w[c][i]);
      const __m256i aq = kUnsigned ? q : _mm256_sign_epi8(q, q);  // unsigned bytes for maddubs
      const float dw = h2f(w[c][i].d);
      for (int r = 0; r < R; ++r) {
        const __m256i yy = kUnsigned ? y[r] : _mm256_sign_epi8(y[r], q);
        __m256i dot = dot_us(aq, yy);
        if constexpr (D::kOffset != 0)  // the offset's integer term, from the first lane
          dot = _mm256_sub_epi32(dot, _mm256_setr_epi32(D::kOffset * (int)sx[r][i], 0, 0, 0, 0, 0, 0, 0));
        const __m256 p = _mm256_cvtepi32_ps(dot);
        acc[c][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx[r][i]), p, acc[c][r]);
        if constexpr (D::kMin) mins[c][r] += h2f(w[c][i].m) * sx[r][i];
      }
    }
  }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = hsum(acc[c][r]) + mins[c][r];
#elif defined(MC_NEON)
  float s[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) s[c][r] = 0.f;
  for (int64_t i = 0; i < nb; ++i)
    for (int c = 0; c < RW; ++c) {
      const int8x16x2_t q = D::n(w[c][i]);  // unpacked once for the R activation rows
      const float dw = h2f(w[c][i].d);
      for (int r = 0; r < R; ++r) {
        s[c][r] += (float)dot32_s8(q, q8[r][i].qs) * dw * dx[r][i];
        if constexpr (D::kMin) mins[c][r] += h2f(w[c][i].m) * sx[r][i];
      }
    }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = s[c][r] + mins[c][r];
#else
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < nb; ++i) {
        int sum = 0;
        for (int j = 0; j < QK; ++j) sum += D::q(w[c][i], j) * q8[r][i].qs[j];
        s += (float)sum * h2f(w[c][i].d) * dx[r][i];
        if constexpr (D::kMin) mins[c][r] += h2f(w[c][i].m) * sx[r][i];
      }
      out[c * R + r] = s + mins[c][r];
    }
#endif
}

template <class D>
void dequant32(const uint8_t* src, float* y, int64_t k) {
  for (auto* b = (const typename D::B*)src; k > 0; k -= QK, ++b, y += QK) {
    const float d = h2f(b->d);
    float m = 0.f;
    if constexpr (D::kMin) m = h2f(b->m);
    for (int j = 0; j < QK; ++j) y[j] = d * D::q(*b, j) + m;
  }
}

// Q4_K: x = d * sc[j] * q - dmin * mn[j] per 32-element sub-block j; the min term uses Q8_K's bsums.
// RW weight rows at once, as dot32.
template <int RW, int R>
void dot_q4_k(int64_t nb, const uint8_t* const* wr, const BQ8_K* const* q8, const float* const*, const float* const*,
              float* out, int64_t) {
  const BQ4_K* w[RW];
  for (int c = 0; c < RW; ++c) w[c] = (const BQ4_K*)wr[c];
#ifdef MC_AVX2
  __m256 acc[RW][R];
  __m128 accm[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps(), accm[c][r] = _mm_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0xF);
  for (int64_t i = 0; i < nb; ++i) {
    __m256i scales[RW];
    __m256i sumi[RW][R];
    for (int c = 0; c < RW; ++c) {
      // 32 blocks ahead, non-temporal (into L1, first out): one token against long rows (K = 14336) read
      // 16.7-22.2 -> 23.7-26.3 GB/s on two threads, the activations' 16 KB no longer pushed out of L1 by the
      // weight stream; 4096-long rows unchanged (Q6_K lost with the same hint: it keeps T1, 8 ahead)
      _mm_prefetch((const char*)(w[c] + i + 32), _MM_HINT_NTA);
      _mm_prefetch((const char*)(w[c] + i + 32) + 64, _MM_HINT_NTA);
      // the 12 packed bytes -> 8 scales (bytes 0..7) and 8 mins (bytes 8..15), as 32-bit words
      uint32_t u[4];
      k4_unpack(w[c][i].scales, u);
      const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
      const __m128i mins = _mm256_extracti128_si256(sm, 1);  // 8 x int16
      const __m128i sc = _mm256_castsi256_si128(sm);
      scales[c] = _mm256_set_m128i(sc, sc);
      const float dmin = h2f(w[c][i].dmin);
      for (int r = 0; r < R; ++r) {  // sum_j mn[j] * (bsum[2j] + bsum[2j+1])
        const __m256i bs = _mm256_loadu_si256((const __m256i*)q8[r][i].bsums);
        const __m128i pair = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        const __m128 pm = _mm_cvtepi32_ps(_mm_madd_epi16(mins, pair));
        accm[c][r] = _mm_fmadd_ps(_mm_set1_ps(dmin * q8[r][i].d), pm, accm[c][r]);
        sumi[c][r] = _mm256_setzero_si256();
      }
    }
    for (int j = 0; j < 4; ++j) {  // 64 elements: 32 low nibbles (sub-block 2j), 32 high (2j+1)
      __m256i yl[R], yh[R];
      for (int r = 0; r < R; ++r) {
        yl[r] = _mm256_loadu_si256((const __m256i*)(q8[r][i].qs + 64 * j));
        yh[r] = _mm256_loadu_si256((const __m256i*)(q8[r][i].qs + 64 * j + 32));
      }
      // scale of sub-block 2j (2j+1) broadcast as int16: bytes (2k, 2k+1) of the int16 scale vector
      const __m256i pick_l = _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j)));
      const __m256i pick_h = _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * j + 1)));
      for (int c = 0; c < RW; ++c) {
        const __m256i sl = _mm256_shuffle_epi8(scales[c], pick_l);
        const __m256i sh = _mm256_shuffle_epi8(scales[c], pick_h);
        const __m256i bits = _mm256_loadu_si256((const __m256i*)(w[c][i].qs + 32 * j));
        const __m256i lo = _mm256_and_si256(bits, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        for (int r = 0; r < R; ++r) {
          const __m256i pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, yl[r]));
          const __m256i ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, yh[r]));
          sumi[c][r] = _mm256_add_epi32(sumi[c][r], _mm256_add_epi32(pl, ph));
        }
      }
    }
    for (int c = 0; c < RW; ++c) {
      const float d = h2f(w[c][i].d);
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm256_fmadd_ps(_mm256_set1_ps(d * q8[r][i].d), _mm256_cvtepi32_ps(sumi[c][r]), acc[c][r]);
    }
  }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) {
      __m128 m = _mm_add_ps(accm[c][r], _mm_movehl_ps(accm[c][r], accm[c][r]));
      m = _mm_add_ss(m, _mm_movehdup_ps(m));
      out[c * R + r] = hsum(acc[c][r]) - _mm_cvtss_f32(m);
    }
#elif defined(MC_NEON)
  float acc[RW][R], mins[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = mins[c][r] = 0.f;
  const uint8x16_t m4 = vdupq_n_u8(0xF);
  for (int64_t i = 0; i < nb; ++i)
    for (int c = 0; c < RW; ++c) {
      uint8_t sc[8], mn[8];
      k4_scales(w[c][i].scales, sc, mn);
      int8x16_t q[16];  // sub-block 2j: the low nibbles of bytes 32j..32j+31 (q[4j], q[4j+1]); 2j+1: the high
      for (int j = 0; j < 4; ++j) {
        const uint8x16_t v0 = vld1q_u8(w[c][i].qs + 32 * j), v1 = vld1q_u8(w[c][i].qs + 32 * j + 16);
        q[4 * j] = vreinterpretq_s8_u8(vandq_u8(v0, m4));
        q[4 * j + 1] = vreinterpretq_s8_u8(vandq_u8(v1, m4));
        q[4 * j + 2] = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4));
        q[4 * j + 3] = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
      }
      const float d = h2f(w[c][i].d), dmin = h2f(w[c][i].dmin);
      for (int r = 0; r < R; ++r) {
        const BQ8_K& y = q8[r][i];
        int m = 0, sum = 0;
        for (int j = 0; j < 8; ++j) m += mn[j] * (y.bsums[2 * j] + y.bsums[2 * j + 1]);
        for (int j = 0; j < 4; ++j)
          sum += sc[2 * j] * dot32_s8({{q[4 * j], q[4 * j + 1]}}, y.qs + 64 * j) +
                 sc[2 * j + 1] * dot32_s8({{q[4 * j + 2], q[4 * j + 3]}}, y.qs + 64 * j + 32);
        acc[c][r] += d * y.d * (float)sum;
        mins[c][r] += dmin * y.d * (float)m;
      }
    }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = acc[c][r] - mins[c][r];
#else
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f, mins = 0.f;
      for (int64_t i = 0; i < nb; ++i) {
        uint8_t sc[8], mn[8];
        k4_scales(w[c][i].scales, sc, mn);
        const BQ8_K& y = q8[r][i];
        int m = 0, sum = 0;
        for (int j = 0; j < 8; ++j) m += mn[j] * (y.bsums[2 * j] + y.bsums[2 * j + 1]);
        for (int j = 0; j < 4; ++j) {
          int sl = 0, sh = 0;
          for (int l = 0; l < 32; ++l) {
            sl += (w[c][i].qs[32 * j + l] & 0xF) * y.qs[64 * j + l];
            sh += (w[c][i].qs[32 * j + l] >> 4) * y.qs[64 * j + 32 + l];
          }
          sum += sc[2 * j] * sl + sc[2 * j + 1] * sh;
        }
        acc += h2f(w[c][i].d) * y.d * (float)sum;
        mins += h2f(w[c][i].dmin) * y.d * (float)m;
      }
      out[c * R + r] = acc - mins;
    }
#endif
}

// Q6_K: x = d * sc[g] * (q - 32), q six bits (4 in ql, 2 in qh), 16 groups of 16 with int8 scales.
#ifdef MC_AVX2
// byte shuffles of 8 int16 scales (one 128-bit lane, both lanes holding the same 8): group g's 32 elements
// take scale 2g in the low lane's 8 int16 (elements 0-15) and 2g + 1 in the high lane's (16-31)
#define MC_Q6_PAIR(a) (int8_t)(2 * (a)), (int8_t)(2 * (a) + 1)
#define MC_Q6_LANE(a) MC_Q6_PAIR(a), MC_Q6_PAIR(a), MC_Q6_PAIR(a), MC_Q6_PAIR(a), MC_Q6_PAIR(a), MC_Q6_PAIR(a), \
                      MC_Q6_PAIR(a), MC_Q6_PAIR(a)
alignas(32) static const int8_t kQ6ScaleBytes[4][32] = {{MC_Q6_LANE(0), MC_Q6_LANE(1)}, {MC_Q6_LANE(2), MC_Q6_LANE(3)},
                                                        {MC_Q6_LANE(4), MC_Q6_LANE(5)}, {MC_Q6_LANE(6), MC_Q6_LANE(7)}};
#undef MC_Q6_LANE
#undef MC_Q6_PAIR
static const __m256i* const kQ6Scale = (const __m256i*)kQ6ScaleBytes;
#endif

template <int RW, int R>
void dot_q6_k(int64_t nb, const uint8_t* const* wr, const BQ8_K* const* q8, const float* const*, const float* const*,
              float* out, int64_t) {
  const BQ6_K* w[RW];
  for (int c = 0; c < RW; ++c) w[c] = (const BQ6_K*)wr[c];
#ifdef MC_AVX2
  __m256 acc[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  for (int64_t i = 0; i < nb; ++i) {
    __m256i sumi[RW][R], sc16[RW];  // sc16: the 16 scales as int16
    for (int c = 0; c < RW; ++c) {
      // every cache line of the block 32 ahead (a 210-byte block spans up to 4 lines; one prefetch a block
      // left the rest to the hardware prefetcher): one token, 2 threads, from memory, in process,
      // 4096 x 14336 15-18 -> 26-28 GB/s, 32000 x 4096 15-18 -> 27-29, 32000 x 768 12-15 -> 22-26
      group_prefetch<sizeof(BQ6_K), _MM_HINT_T0>(w[c], 32 * (int64_t)sizeof(BQ6_K), i);
      sc16[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)w[c][i].scales));
      for (int r = 0; r < R; ++r) {  // the -32 offset: 32 * sum_g sc[g] * bsum[g]
        const __m256i bs = _mm256_loadu_si256((const __m256i*)q8[r][i].bsums);
        sumi[c][r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16[c]), 5));
      }
    }
    for (int j = 0; j < 2; ++j) {  // 128 elements: ql[64 j ..], qh[32 j ..]
      for (int c = 0; c < RW; ++c) {
        // scales 8j .. 8j + 7 in both lanes: each group's scales are then one byte shuffle away
        const __m256i sj = j == 0 ? _mm256_permute2x128_si256(sc16[c], sc16[c], 0x00)
                                  : _mm256_permute2x128_si256(sc16[c], sc16[c], 0x11);
        const uint8_t* ql = w[c][i].ql + 64 * j;
        const __m256i b1 = _mm256_loadu_si256((const __m256i*)ql);
        const __m256i b2 = _mm256_loadu_si256((const __m256i*)(ql + 32));
        const __m256i bh = _mm256_loadu_si256((const __m256i*)(w[c][i].qh + 32 * j));
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(b1, m15), _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(b2, m15),
                               _mm256_slli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8(12)), 2));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15),
                               _mm256_and_si256(bh, _mm256_set1_epi8(48)));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15),
                               _mm256_srli_epi16(_mm256_and_si256(bh, _mm256_set1_epi8((char)0xC0)), 2));
        for (int g = 0; g < 4; ++g) {
          // 32 elements = two groups of 16: their scales as 8 + 8 int16 lanes, by one byte shuffle
          const __m256i s = _mm256_shuffle_epi8(sj, kQ6Scale[g]);
          for (int r = 0; r < R; ++r) {
            const __m256i yv = _mm256_loadu_si256((const __m256i*)(q8[r][i].qs + 128 * j + 32 * g));
            sumi[c][r] = _mm256_add_epi32(sumi[c][r], _mm256_madd_epi16(s, _mm256_maddubs_epi16(q[g], yv)));
          }
        }
      }
    }
    for (int c = 0; c < RW; ++c) {
      const float dw = h2f(w[c][i].d);
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * q8[r][i].d), _mm256_cvtepi32_ps(sumi[c][r]), acc[c][r]);
    }
  }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = hsum(acc[c][r]);
#elif defined(MC_NEON)
  float s[RW][R];
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) s[c][r] = 0.f;
  const uint8x16_t m15 = vdupq_n_u8(15), m3 = vdupq_n_u8(3);
  const int8x16_t m32 = vdupq_n_s8(32);
  for (int64_t i = 0; i < nb; ++i)
    for (int c = 0; c < RW; ++c) {
      // per half j, 128 quants in 8 vectors of 16: element 16t + l of the half is vector t (its scale sc[t])
      int8x16_t q[2][8];
      for (int j = 0; j < 2; ++j) {
        const uint8_t* ql = w[c][i].ql + 64 * j;
        const uint8_t* qh = w[c][i].qh + 32 * j;
        for (int u = 0; u < 2; ++u) {  // elements 16u..16u+15 of each of the four 32-runs
          const uint8x16_t l0 = vld1q_u8(ql + 16 * u), l1 = vld1q_u8(ql + 32 + 16 * u), h = vld1q_u8(qh + 16 * u);
          const uint8x16_t a = vorrq_u8(vandq_u8(l0, m15), vshlq_n_u8(vandq_u8(h, m3), 4));
          const uint8x16_t b = vorrq_u8(vandq_u8(l1, m15), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 2), m3), 4));
          const uint8x16_t e = vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h, 4), m3), 4));
          const uint8x16_t f = vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(h, 6), 4));
          q[j][u] = vsubq_s8(vreinterpretq_s8_u8(a), m32);
          q[j][2 + u] = vsubq_s8(vreinterpretq_s8_u8(b), m32);
          q[j][4 + u] = vsubq_s8(vreinterpretq_s8_u8(e), m32);
          q[j][6 + u] = vsubq_s8(vreinterpretq_s8_u8(f), m32);
        }
      }
      const float d = h2f(w[c][i].d);
      for (int r = 0; r < R; ++r) {
        int sum = 0;
        for (int j = 0; j < 2; ++j) {
          const int8_t* y = q8[r][i].qs + 128 * j;
          const int8_t* sc = w[c][i].scales + 8 * j;
          for (int t = 0; t < 8; ++t) sum += sc[t] * dot16_s8(q[j][t], y + 16 * t);
        }
        s[c][r] += d * q8[r][i].d * (float)sum;
      }
    }
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) out[c * R + r] = s[c][r];
#else
  for (int c = 0; c < RW; ++c)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < nb; ++i) {
        int sum = 0;
        for (int j = 0; j < 2; ++j) {
          const uint8_t* ql = w[c][i].ql + 64 * j;
          const uint8_t* qh = w[c][i].qh + 32 * j;
          const int8_t* y = q8[r][i].qs + 128 * j;
          const int8_t* sc = w[c][i].scales + 8 * j;
          for (int l = 0; l < 32; ++l) {
            const int g = l / 16;
            const int a = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            const int b = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int e = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int f = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            sum += sc[g] * a * y[l] + sc[g + 2] * b * y[l + 32] + sc[g + 4] * e * y[l + 64] + sc[g + 6] * f * y[l + 96];
          }
        }
        s += h2f(w[c][i].d) * q8[r][i].d * (float)sum;
      }
      out[c * R + r] = s;
    }
#endif
}

// ---------------------------------------------------------------- tiles (many activation rows)
//
// From a few activation rows on (tiled(), below), weights are multiplied 8 rows at a time through a tile:
// the 8 rows' blocks copied (per call, into the thread's scratch: the file's blocks stay as they are) so that
// one 32-byte vector holds 8 consecutive quants of 4 rows as bytes, and each group's scale is an int16 lane
// of the row it belongs to. One activation row's 8 quants, broadcast to the 4 rows, then make 4 rows'
// products in one maddubs; the products of one scale group are summed as int16 (exact: at most 4 x 2 x 15 x
// 127 for Q4_K, 2 x 2 x 63 x 127 for Q6_K) before one madd applies the scale. The lanes are weight rows: no
// per-row horizontal sums. llama.cpp repacks its weights this way at load (block_q4_Kx8); here a tile is
// built once per call and used for every activation row, so the mapped file is never copied.
#ifdef MC_AVX2
// lane q of hadd_epi32(rows 0-3 in lane pairs, rows 4-7 in lane pairs) holds row kOrd[q]
constexpr int kOrd[8] = {0, 1, 4, 5, 2, 3, 6, 7};

// 32 bytes of each of 4 rows -> out[2 p] (p = 0..3): chunk p (8 bytes) of the 4 rows, row c at bytes 8c. A 4 x 4
// transpose of 64-bit lanes (out has the tiles' stride of two vectors: the other half's rows in between).
inline void interleave4(const uint8_t* r0, const uint8_t* r1, const uint8_t* r2, const uint8_t* r3, __m256i* out) {
  const __m256i v0 = _mm256_loadu_si256((const __m256i*)r0), v1 = _mm256_loadu_si256((const __m256i*)r1);
  const __m256i v2 = _mm256_loadu_si256((const __m256i*)r2), v3 = _mm256_loadu_si256((const __m256i*)r3);
  const __m256i t0 = _mm256_unpacklo_epi64(v0, v1), t1 = _mm256_unpackhi_epi64(v0, v1);
  const __m256i t2 = _mm256_unpacklo_epi64(v2, v3), t3 = _mm256_unpackhi_epi64(v2, v3);
  _mm256_store_si256(out, _mm256_permute2x128_si256(t0, t2, 0x20));
  _mm256_store_si256(out + 2, _mm256_permute2x128_si256(t1, t3, 0x20));
  _mm256_store_si256(out + 4, _mm256_permute2x128_si256(t0, t2, 0x31));
  _mm256_store_si256(out + 6, _mm256_permute2x128_si256(t1, t3, 0x31));
}

struct alignas(32) TileK {  // one super-block of 8 weight rows
  uint8_t q[8][4][2][32]; // sub-block j (32 quants), chunk p (8 quants), half h: rows 4h..4h+3 x 8 quants
  int16_t sc[16][2][16];  // scale group g, half h: lane l -> row 4h + l / 4's scale (Q4_K: 8 groups of 32,
                          // Q6_K: 16 groups of 16)
  int16_t off[8][16];     // pair t: lanes 2q, 2q + 1 -> row kOrd[q]'s mins (Q4_K) or scales (Q6_K) 2t, 2t + 1
  float d[8], dmin[8];    // row kOrd[q] in lane q
};

// Builds a tile of super-block i from 8 row pointers (Q4_K or Q6_K).
void make_tile(int64_t type, const uint8_t* const* rows, int64_t i, TileK* t) {
  alignas(32) uint8_t qv[8][256];  // each row's quants in element order
  int16_t sc[8][16], off[8][16];   // per row: each group's scale; the mins (Q4_K) or scales (Q6_K) of off
  const __m256i m15 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  for (int c = 0; c < 8; ++c) {
    if (type == Q4_K) {
      const BQ4_K& b = ((const BQ4_K*)rows[c])[i];
      uint32_t u[4];
      k4_unpack(b.scales, u);
      const uint8_t* sm = (const uint8_t*)u;
      for (int j = 0; j < 8; ++j) sc[c][j] = sm[j], off[c][j] = sm[8 + j];
      for (int j = 0; j < 4; ++j) {  // 32 bytes: low nibbles are sub-block 2j, high nibbles 2j + 1
        const __m256i v = _mm256_loadu_si256((const __m256i*)(b.qs + 32 * j));
        _mm256_store_si256((__m256i*)(qv[c] + 64 * j), _mm256_and_si256(v, m15));
        _mm256_store_si256((__m256i*)(qv[c] + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m15));
      }
      t->d[c] = h2f(b.d), t->dmin[c] = h2f(b.dmin);
    } else {
      const BQ6_K& b = ((const BQ6_K*)rows[c])[i];
      for (int g = 0; g < 16; ++g) sc[c][g] = off[c][g] = b.scales[g];
      for (int h = 0; h < 2; ++h) {  // as dot_q6_k: 128 elements from ql[64 h ..], qh[32 h ..]
        const __m256i b1 = _mm256_loadu_si256((const __m256i*)(b.ql + 64 * h));
        const __m256i b2 = _mm256_loadu_si256((const __m256i*)(b.ql + 64 * h + 32));
        const __m256i bh = _mm256_loadu_si256((const __m256i*)(b.qh + 32 * h));
        uint8_t* o = qv[c] + 128 * h;
        _mm256_store_si256((__m256i*)o, _mm256_or_si256(_mm256_and_si256(b1, m15),
                                                        _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4)));
        _mm256_store_si256((__m256i*)(o + 32),
                           _mm256_or_si256(_mm256_and_si256(b2, m15),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m3), 4)));
        _mm256_store_si256((__m256i*)(o + 64),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m15),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m3), 4)));
        _mm256_store_si256((__m256i*)(o + 96),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m15),
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m3), 4)));
      }
      t->d[c] = h2f(b.d), t->dmin[c] = 0.f;
    }
  }
  for (int j = 0; j < 8; ++j)  // sub-block j of rows 4h..4h+3 -> its 4 chunks
    for (int h = 0; h < 2; ++h)
      interleave4(qv[4 * h] + 32 * j, qv[4 * h + 1] + 32 * j, qv[4 * h + 2] + 32 * j, qv[4 * h + 3] + 32 * j,
                  (__m256i*)t->q[j] + h);
  const int groups = type == Q4_K ? 8 : 16;
  for (int g = 0; g < groups; ++g)
    for (int c = 0; c < 8; ++c) {  // row c's scale in its 4 int16 lanes
      const uint64_t v = (uint64_t)(uint16_t)sc[c][g] * 0x0001000100010001ull;
      std::memcpy(&t->sc[g][c / 4][4 * (c % 4)], &v, 8);
    }
  float d[8], dmin[8];
  for (int q = 0; q < 8; ++q) d[q] = t->d[kOrd[q]], dmin[q] = t->dmin[kOrd[q]];
  for (int q = 0; q < 8; ++q) t->d[q] = d[q], t->dmin[q] = dmin[q];
  for (int p = 0; p < groups / 2; ++p)
    for (int q = 0; q < 8; ++q) t->off[p][2 * q] = off[kOrd[q]][2 * p], t->off[p][2 * q + 1] = off[kOrd[q]][2 * p + 1];
}

// R activation rows (R <= 4) against the 8 rows of nb tiles: acc[r] (lanes in kOrd order) += each super-block's
// products, scaled.
template <int64_t Type, int R>
void tile_rows(int64_t nb, const TileK* tiles, const BQ8_K* const* y, __m256* acc) {
  for (int64_t i = 0; i < nb; ++i) {
    const TileK& t = tiles[i];
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    for (int j = 0; j < 8; ++j) {  // sub-blocks of 32
      const __m256i* w = (const __m256i*)t.q[j];
      if constexpr (Type == Q4_K) {
        const __m256i s0 = _mm256_load_si256((const __m256i*)t.sc[j][0]);
        const __m256i s1 = _mm256_load_si256((const __m256i*)t.sc[j][1]);
        for (int r = 0; r < R; ++r) {
          const int8_t* yq = y[r][i].qs + 32 * j;
          __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
          for (int p = 0; p < 4; ++p) {
            const __m256i yb = _mm256_set1_epi64x(*(const int64_t*)(yq + 8 * p));
            p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p), yb));
            p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p + 1), yb));
          }
          a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(p0, s0));
          a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(p1, s1));
        }
      } else {  // Q6_K: groups 2j (chunks 0, 1) and 2j + 1 (chunks 2, 3)
        for (int g = 0; g < 2; ++g) {
          const __m256i s0 = _mm256_load_si256((const __m256i*)t.sc[2 * j + g][0]);
          const __m256i s1 = _mm256_load_si256((const __m256i*)t.sc[2 * j + g][1]);
          for (int r = 0; r < R; ++r) {
            const int8_t* yq = y[r][i].qs + 32 * j + 16 * g;
            const __m256i ya = _mm256_set1_epi64x(*(const int64_t*)yq);
            const __m256i yb = _mm256_set1_epi64x(*(const int64_t*)(yq + 8));
            const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_load_si256(w + 4 * g), ya),
                                                _mm256_maddubs_epi16(_mm256_load_si256(w + 4 * g + 2), yb));
            const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_load_si256(w + 4 * g + 1), ya),
                                                _mm256_maddubs_epi16(_mm256_load_si256(w + 4 * g + 3), yb));
            a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(p0, s0));
            a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(p1, s1));
          }
        }
      }
    }
    const __m256 d = _mm256_loadu_ps(t.d);
    for (int r = 0; r < R; ++r) {
      // the mins' (Q4_K) or the -32 offset's (Q6_K) term: off pairs times the activations' bsums
      const __m256i bs = _mm256_loadu_si256((const __m256i*)y[r][i].bsums);
      __m256i o = _mm256_setzero_si256();
      if constexpr (Type == Q4_K) {  // pairs of 16-sums -> the 8 sub-block sums, as 4 int32 pairs
        const __m128i s8 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
        alignas(16) int32_t b32[4];
        _mm_store_si128((__m128i*)b32, s8);
        for (int p = 0; p < 4; ++p)
          o = _mm256_add_epi32(o, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)t.off[p]), _mm256_set1_epi32(b32[p])));
      } else {
        alignas(32) int32_t b32[8];
        _mm256_store_si256((__m256i*)b32, bs);
        for (int p = 0; p < 8; ++p)
          o = _mm256_add_epi32(o, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)t.off[p]), _mm256_set1_epi32(b32[p])));
      }
      const __m256i isum = _mm256_hadd_epi32(a[r][0], a[r][1]);
      const __m256 dy = _mm256_set1_ps(y[r][i].d);
      if constexpr (Type == Q4_K) {
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(isum), acc[r]);
        acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(t.dmin), dy), _mm256_cvtepi32_ps(o), acc[r]);
      } else {
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(_mm256_sub_epi32(isum, _mm256_slli_epi32(o, 5))),
                                 acc[r]);
      }
    }
  }
}
// The 32-block types' tiles: the same layout for one block of 8 rows, each block's integer sums scaled in
// float (d of the 8 rows times the activation block's d; the types with a min add m * s; Q4_0 / Q5_0 take
// their offset times the activation quants' sum off the integer sum, as dot32 does). Q8_0's signed quants
// are kept with their magnitudes: maddubs of |w| and the activations signed as w, each chunk widened at once
// (2 x 128 x 127 leaves no room for a second chunk in int16).
struct alignas(32) Tile32 {  // one block of 8 weight rows
  uint8_t q[4][2][32];       // chunk p (8 quants), half h: rows 4h..4h+3 x 8 quants (Q8_0: |q|)
  int8_t sgn[4][2][32];      // Q8_0 only: the signed quants
  float d[8], m[8];          // row kOrd[q] in lane q
};

template <class D>
void make_tile32(const uint8_t* const* rows, int64_t i, Tile32* t) {
  constexpr bool kSigned = std::is_same_v<D, DQ8_0>;
  alignas(32) uint8_t qv[8][32];  // each row's quants as maddubs takes them (Q8_0: |q|)
  const uint8_t* sq[8];           // Q8_0: each row's signed quants, in the file
  float d[8], m[8];
  for (int c = 0; c < 8; ++c) {
    const auto& b = ((const typename D::B*)rows[c])[i];
    const __m256i v = D::v(b);
    _mm256_store_si256((__m256i*)qv[c], kSigned ? _mm256_abs_epi8(v) : v);
    sq[c] = (const uint8_t*)b.qs;
    d[c] = h2f(b.d);
    if constexpr (D::kMin) m[c] = h2f(b.m); else m[c] = 0.f;
  }
  for (int h = 0; h < 2; ++h) {
    interleave4(qv[4 * h], qv[4 * h + 1], qv[4 * h + 2], qv[4 * h + 3], (__m256i*)t->q + h);
    if constexpr (kSigned) interleave4(sq[4 * h], sq[4 * h + 1], sq[4 * h + 2], sq[4 * h + 3], (__m256i*)t->sgn + h);
  }
  for (int q = 0; q < 8; ++q) t->d[q] = d[kOrd[q]], t->m[q] = m[kOrd[q]];
}

// R activation rows (R <= 4) against the 8 rows of nb tiles: acc[r] (lanes in kOrd order) += each block's
// products, scaled. act: Q8_0 / Q8_1 rows; dx, sx: their blocks' d and s (Q8_0: sum of quants) as float.
template <class D, int R>
void tile32_rows(int64_t nb, const Tile32* tiles, const uint8_t* const* act, const float* const* dx,
                 const float* const* sx, __m256* acc) {
  using A = std::conditional_t<D::kMin, BQ8_1, BQ8_0>;
  constexpr bool kSigned = std::is_same_v<D, DQ8_0>;
  const __m256i one = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < nb; ++i) {
    const Tile32& t = tiles[i];
    const __m256i* w = (const __m256i*)t.q;
    const __m256i* sg = (const __m256i*)t.sgn;
    const __m256 d = _mm256_load_ps(t.d);
    for (int r = 0; r < R; ++r) {
      const int8_t* yq = ((const A*)act[r])[i].qs;
      __m256i s0, s1;
      if constexpr (kSigned) {
        s0 = s1 = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          const __m256i yb = _mm256_set1_epi64x(*(const int64_t*)(yq + 8 * p));
          s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p),
                                _mm256_sign_epi8(yb, _mm256_load_si256(sg + 2 * p))), one));
          s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p + 1),
                                _mm256_sign_epi8(yb, _mm256_load_si256(sg + 2 * p + 1))), one));
        }
      } else {  // at most 4 x 2 x 31 x 127 in int16
        __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          const __m256i yb = _mm256_set1_epi64x(*(const int64_t*)(yq + 8 * p));
          p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p), yb));
          p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(_mm256_load_si256(w + 2 * p + 1), yb));
        }
        s0 = _mm256_madd_epi16(p0, one), s1 = _mm256_madd_epi16(p1, one);
      }
      __m256 isum = _mm256_cvtepi32_ps(_mm256_hadd_epi32(s0, s1));
      if constexpr (D::kOffset != 0)  // integers below 2^24: exact in float
        isum = _mm256_fnmadd_ps(_mm256_set1_ps((float)D::kOffset), _mm256_set1_ps(sx[r][i]), isum);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(dx[r][i])), isum, acc[r]);
      if constexpr (D::kMin) acc[r] = _mm256_fmadd_ps(_mm256_load_ps(t.m), _mm256_set1_ps(sx[r][i]), acc[r]);
    }
  }
}

// Rows [j, je) (iteration order, as dot_tile) of a part against activation rows [0, m), 8 weight rows a
// tile: the item's tiles are built once (build(rows, i, tile) makes block i's tile of 8 row pointers), then
// every 4 activation rows (in L1) meet each tile (in L2): mul(cnt, r0, tiles, acc) adds activation rows
// r0 .. r0 + cnt - 1 times one tile's nb blocks into acc.
template <class Tile, class Build, class Mul>
void tile_part(int64_t nb, int64_t j, int64_t je, const uint8_t* wp, int64_t ws, const int64_t* src,
               const int64_t* dst, int64_t m, float* op, int64_t n, std::vector<Tile>& buf, Build build, Mul mul) {
  const int64_t tiles = (je - j + 7) / 8;
  buf.resize((size_t)(tiles * nb));
  std::vector<int64_t> col((size_t)(tiles * 8));
  for (int64_t t = 0; t < tiles; ++t) {
    const uint8_t* rows[8];
    for (int c = 0; c < 8; ++c) {
      const int64_t jj = j + 8 * t + c;
      const bool real = jj < je;  // a short last tile repeats its first row and stores nothing for the rest
      const int64_t it = real ? jj : j + 8 * t;
      rows[c] = wp + (src ? src[it] : it) * ws;
      col[(size_t)(8 * t + c)] = real ? (dst ? dst[jj] : jj) : -1;
    }
    for (int64_t i = 0; i < nb; ++i) build(rows, i, &buf[(size_t)(t * nb + i)]);
  }
  for (int64_t r0 = 0; r0 < m; r0 += 4) {
    const int64_t cnt = std::min<int64_t>(4, m - r0);
    for (int64_t t = 0; t < tiles; ++t) {
      __m256 acc[4];
      for (auto& a : acc) a = _mm256_setzero_ps();
      mul(cnt, r0, &buf[(size_t)(t * nb)], acc);
      for (int64_t r = 0; r < cnt; ++r) {
        alignas(32) float v[8];
        _mm256_store_ps(v, acc[r]);
        float* o = op + (r0 + r) * n;
        for (int q = 0; q < 8; ++q) {
          const int64_t c = col[(size_t)(8 * t + kOrd[q])];
          if (c >= 0) o[c] = v[q];
        }
      }
    }
  }
}

// The 32-block type's decoder (DQ4_0, ...) as the argument's type
template <class F>
void with_type32(int64_t type, F f) {
  switch (type) {
    case Q4_0: f(DQ4_0{}); break;
    case Q4_1: f(DQ4_1{}); break;
    case Q5_0: f(DQ5_0{}); break;
    case Q5_1: f(DQ5_1{}); break;
    default: f(DQ8_0{}); break;
  }
}

// R = cnt (1..4) as a template argument
template <class F>
void with_rows(int64_t cnt, F f) {
  switch (cnt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}
#endif

// ---------------------------------------------------------------- dequantization (rows -> float)

void dequant_row(int64_t type, const uint8_t* src, float* y, int64_t k) {
  switch (type) {
    case Q4_0: dequant32<DQ4_0>(src, y, k); break;
    case Q4_1: dequant32<DQ4_1>(src, y, k); break;
    case Q5_0: dequant32<DQ5_0>(src, y, k); break;
    case Q5_1: dequant32<DQ5_1>(src, y, k); break;
    case Q8_0: dequant32<DQ8_0>(src, y, k); break;
    case Q4_K:
      for (auto* b = (const BQ4_K*)src; k > 0; k -= QK_K, ++b) {
        uint8_t sc[8], mn[8];
        k4_scales(b->scales, sc, mn);
        const float d = h2f(b->d), dmin = h2f(b->dmin);
        for (int j = 0; j < 4; ++j, y += 64) {
          const float d1 = d * sc[2 * j], m1 = dmin * mn[2 * j], d2 = d * sc[2 * j + 1], m2 = dmin * mn[2 * j + 1];
          for (int l = 0; l < 32; ++l) {
            y[l] = d1 * (b->qs[32 * j + l] & 0xF) - m1;
            y[l + 32] = d2 * (b->qs[32 * j + l] >> 4) - m2;
          }
        }
      }
      break;
    case Q6_K:
      for (auto* b = (const BQ6_K*)src; k > 0; k -= QK_K, ++b) {
        const float d = h2f(b->d);
        for (int j = 0; j < 2; ++j, y += 128) {
          const uint8_t* ql = b->ql + 64 * j;
          const uint8_t* qh = b->qh + 32 * j;
          const int8_t* sc = b->scales + 8 * j;
          for (int l = 0; l < 32; ++l) {
            const int g = l / 16;
            y[l] = d * sc[g] * (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = d * sc[g + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = d * sc[g + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = d * sc[g + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
          }
        }
      }
      break;
  }
}

// ---------------------------------------------------------------- dispatch

struct TypeInfo {
  int64_t block;       // elements per block
  int64_t bytes;       // bytes per block
  int64_t act_bytes;   // bytes per block of the quantized activations
};

TypeInfo type_info(int64_t type) {
  switch (type) {
    case Q4_0: return {QK, sizeof(BQ4_0), sizeof(BQ8_0)};
    case Q4_1: return {QK, sizeof(BQ4_1), sizeof(BQ8_1)};
    case Q5_0: return {QK, sizeof(BQ5_0), sizeof(BQ8_0)};
    case Q5_1: return {QK, sizeof(BQ5_1), sizeof(BQ8_1)};
    case Q8_0: return {QK, sizeof(BQ8_0), sizeof(BQ8_0)};
    case Q4_K: return {QK_K, sizeof(BQ4_K), sizeof(BQ8_K)};
    case Q6_K: return {QK_K, sizeof(BQ6_K), sizeof(BQ8_K)};
    default: TORCH_CHECK(false, "mamba_cli: unsupported ggml type ", type);
  }
}

// sums: for the Q8_0 format, each block's sum of quants (see quantize_q8)
void quantize_row(int64_t type, const float* x, uint8_t* out, int64_t k, float* sums) {
  switch (type) {
    case Q4_1:
    case Q5_1: quantize_q8<true>(x, out, k); break;
    case Q4_K:
    case Q6_K: quantize_q8_k(x, (BQ8_K*)out, k); break;
    default: quantize_q8<false>(x, out, k, sums); break;
  }
}

// The activation format of a weight type: 0 Q8_0, 1 Q8_1, 2 Q8_K
inline int act_format(const TypeInfo& ti) {
  return ti.block == QK_K ? 2 : ti.act_bytes == (int64_t)sizeof(BQ8_1) ? 1 : 0;
}

// One activation row of K values quantized for weights of `type` into q, with each 32-block's d (dx) and s
// (sx) as float, as the row products take them: for Q8_0 s is the sum of the block's quants (Q4_0 and Q5_0
// subtract their offset times it), for Q8_1 its stored s. Q8_K blocks carry their own (dx, sx unwritten).
void quantize_act(int64_t type, const float* x, uint8_t* q, int64_t k, float* dx, float* sx) {
  const TypeInfo ti = type_info(type);
  const int f = act_format(ti);
  quantize_row(type, x, q, k, f == 0 ? sx : nullptr);
  for (int64_t i = 0; f < 2 && i < k / ti.block; ++i) {
    const fp16* h = (const fp16*)(q + i * ti.act_bytes);  // d, then s for Q8_1
    dx[i] = h2f(h[0]);
    if (f == 1) sx[i] = h2f(h[1]);
  }
}

// out[c * R + r] = <weight row w[c], activation row r> for c < RW, r < R
template <int RW, int R>
void dot_rows(int64_t type, int64_t nb, const uint8_t* const* w, const uint8_t* const* q8, const float* const* dx,
              const float* const* sx, float* out, int64_t ahead) {
  switch (type) {
    case Q4_0: dot32<DQ4_0, RW, R>(nb, w, q8, dx, sx, out, ahead); break;
    case Q4_1: dot32<DQ4_1, RW, R>(nb, w, q8, dx, sx, out, ahead); break;
    case Q5_0: dot32<DQ5_0, RW, R>(nb, w, q8, dx, sx, out, ahead); break;
    case Q5_1: dot32<DQ5_1, RW, R>(nb, w, q8, dx, sx, out, ahead); break;
    case Q8_0: dot32<DQ8_0, RW, R>(nb, w, q8, dx, sx, out, ahead); break;
    case Q4_K: dot_q4_k<RW, R>(nb, w, (const BQ8_K* const*)q8, dx, sx, out, ahead); break;
    case Q6_K: dot_q6_k<RW, R>(nb, w, (const BQ8_K* const*)q8, dx, sx, out, ahead); break;
  }
}

// Weight rows [j, je) (iteration order) against R activation rows: RW rows at a time, then one by one.
// Iteration index j reads stored row src(j) and writes output column dst(j).
template <int RW, int R>
void dot_tile(int64_t type, int64_t nb, int64_t j, int64_t je, const uint8_t* wp, int64_t ws, const int64_t* src,
              const int64_t* dst, const uint8_t* const* q8, const float* const* dx, const float* const* sx, float* op,
              int64_t n) {
  const uint8_t* wr[RW];
  float res[RW * R];
  for (; j + RW <= je; j += RW) {
    for (int c = 0; c < RW; ++c) wr[c] = wp + (src ? src[j + c] : j + c) * ws;
    dot_rows<RW, R>(type, nb, wr, q8, dx, sx, res, src ? 0 : RW * ws);
    for (int c = 0; c < RW; ++c)
      for (int r = 0; r < R; ++r) op[r * n + (dst ? dst[j + c] : j + c)] = res[c * R + r];
  }
  for (; j < je; ++j) {
    wr[0] = wp + (src ? src[j] : j) * ws;
    dot_rows<1, R>(type, nb, wr, q8, dx, sx, res, 0);
    for (int r = 0; r < R; ++r) op[r * n + (dst ? dst[j] : j)] = res[r];
  }
}

std::string simd() {
#if defined(MC_AVX2) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
  return "avx2+vnni";
#elif defined(MC_AVX2)
  return "avx2";
#elif defined(MC_NEON)
  return "neon+dotprod";
#else
  return "generic";
#endif
}


#ifndef MC_CORE_ONLY

void check_weights(const at::Tensor& w, int64_t type, int64_t k, const TypeInfo& ti) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              "mamba_cli: weights must be a 2-D uint8 CPU tensor of blocks");
  TORCH_CHECK(k > 0 && k % ti.block == 0, "mamba_cli: K=", k, " is not a multiple of the block size ", ti.block);
  TORCH_CHECK(w.size(1) == k / ti.block * ti.bytes, "mamba_cli: a row of ", k, " values of type ", type, " has ",
              k / ti.block * ti.bytes, " bytes, got ", w.size(1));
  TORCH_CHECK(w.stride(1) == 1, "mamba_cli: weight rows must be contiguous");
}

// One weight matrix of a product: its blocks, and how its rows map to output columns.
struct Part {
  const uint8_t* wp;
  int64_t ws, type, n, col0;  // row stride in bytes, type, output columns, first output column
  TypeInfo ti;
  at::Tensor rows;            // kept alive for src
  const int64_t* src;         // column j reads stored row src[j] (null: row j)
  std::vector<int64_t> inv;   // a full permutation walked in stored order: stored row s -> column inv[s]
  int act;                    // activation format: 0 Q8_0, 1 Q8_1, 2 Q8_K
  int64_t row = -1;           // >= 0: this part multiplies activation row `row` only, into output row `row`
};

// t itself where it already has `dtype` and is contiguous (as in every decode step: no dispatcher call),
// else a contiguous copy in `dtype`.
inline at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

Part make_part(const at::Tensor& w, int64_t type, int64_t k, const c10::optional<at::Tensor>& rows_in) {
  Part p;
  p.ti = type_info(type);
  check_weights(w, type, k, p.ti);
  p.wp = w.data_ptr<uint8_t>();
  p.ws = w.stride(0);
  p.type = type;
  p.src = nullptr;
  p.n = w.size(0);
  p.act = act_format(p.ti);
  // rows: output column j is weight row rows[j] (a row permutation read in place, e.g. llama.cpp's q/k).
  // A permutation of every row is walked in stored order, writing column inv[s] for stored row s: the
  // weight stream stays sequential for the hardware prefetcher. Any other index reads rows[j] for column j.
  if (rows_in.has_value()) {
    p.rows = contiguous_as(*rows_in, at::kLong);
    TORCH_CHECK(p.rows.dim() == 1, "mamba_cli: rows must be 1-D");
    const int64_t* r = p.rows.data_ptr<int64_t>();
    for (int64_t j = 0; j < p.rows.numel(); ++j)
      TORCH_CHECK(r[j] >= 0 && r[j] < w.size(0), "mamba_cli: a row index is out of range");
    if (p.rows.numel() == w.size(0)) {
      p.inv.assign((size_t)w.size(0), -1);
      bool perm = true;
      for (int64_t j = 0; j < p.rows.numel() && perm; ++j) {
        perm = p.inv[(size_t)r[j]] < 0;
        p.inv[(size_t)r[j]] = j;
      }
      if (!perm) p.inv.clear();
    }
    if (p.inv.empty()) p.src = r, p.n = p.rows.numel();
  }
  return p;
}

// Whether a part's rows go through tiles, and how many rows a work item of tiles has. The activation rows
// from which tiles win (2 threads, p25 of three runs; building them costs a few rows' products): the K types
// 12 (4096 x 4096 by rows / by tiles: Q4_K 1.75-2.61 / 1.95-2.90 ms at 8 rows, 2.62-3.13 / 2.50-2.81 at 12;
// Q6_K 2.91-3.55 / 2.11-2.76 at 12), the 32-block types 4 (Q4_0 1536 x 768: 119 vs 100 us), Q8_0 12 (its tile
// keeps signs too: 205 vs 216 us at 8 rows, 351 vs 307 at 12).
constexpr int64_t kTileItem = 32;
inline bool tiled(const Part& p, int64_t m) {
#ifdef MC_AVX2
  return p.row < 0 && m >= (p.ti.block == QK_K || p.type == Q8_0 ? 12 : 4);
#else
  return false;
#endif
}

// A range [lo, hi) of work items taken from both ends by several threads: lo and hi in one atomic word.
struct ItemRange {
  std::atomic<uint64_t> v{0};
  void set(int64_t lo, int64_t hi) { v.store((uint64_t)hi << 32 | (uint64_t)lo, std::memory_order_relaxed); }
  int64_t take(bool back) {  // the first (or last) item left, or -1
    uint64_t cur = v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur & 0xffffffffu, hi = cur >> 32;
      if (lo >= hi) return -1;
      const uint64_t nv = back ? (hi - 1) << 32 | lo : hi << 32 | (lo + 1);
      if (v.compare_exchange_weak(cur, nv, std::memory_order_relaxed)) return (int64_t)(back ? hi - 1 : lo);
    }
  }
  int64_t front() { return take(false); }
  int64_t back() { return take(true); }
};

// What mm_parts keeps per calling thread between calls.
struct Scratch {
  std::vector<uint8_t> q8[3];
  std::vector<float> scales[3];
  std::vector<std::array<int64_t, 3>> items;
  std::unique_ptr<ItemRange[]> shares;
  int64_t n_shares = 0;
  ItemRange* ranges(int64_t n) {
    if (n > n_shares) shares.reset(new ItemRange[(size_t)n]), n_shares = n;
    return shares.get();
  }
};

// x (M, K) times every part's rows, the parts' outputs side by side in one (M, sum of N) tensor. The
// activations are quantized once per format, and all the parts' rows share one parallel region.
// Parts with a row (ggml_mm_id) all write columns [0, N) of their own output row.
at::Tensor mm_parts(const at::Tensor& x_in, std::vector<Part>& parts, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "mamba_cli: activations must be (M, ", k, ")");
  const at::Tensor x = contiguous_as(x_in, at::kFloat);
  int64_t ntot = 0;
  for (Part& p : parts) {
    if (p.row >= 0) {
      p.col0 = 0, ntot = p.n;
    } else {
      p.col0 = ntot, ntot += p.n;
    }
  }
  const int64_t m = x.size(0);
  at::Tensor out = at::empty({m, ntot}, x.options());
  if (m == 0 || ntot == 0) return out;
  // quantized activations per format (Q8_0 / Q8_1 / Q8_K), with each 32-block's d and s as float; these
  // buffers and the work items below are the calling thread's, kept between calls (no allocation a call)
  thread_local Scratch scratch;
  std::vector<uint8_t>* q8 = scratch.q8;
  std::vector<float>* scales = scratch.scales;
  int64_t row_bytes[3] = {0, 0, 0}, nbk[3] = {0, 0, 0};
  const float* xp = x.data_ptr<float>();
  for (const Part& p : parts) {
    const int f = p.act;
    if (row_bytes[f]) continue;
    nbk[f] = k / p.ti.block;
    row_bytes[f] = nbk[f] * p.ti.act_bytes;
    q8[f].resize((size_t)(m * row_bytes[f]));
    scales[f].resize((size_t)(2 * m * nbk[f]));
    const int64_t nb = nbk[f], rb = row_bytes[f], type = p.type;
    uint8_t* qd = q8[f].data();
    float* sd = scales[f].data();
    auto quant_rows = [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        quantize_act(type, xp + r * k, qd + r * rb, k, sd + 2 * r * nb, sd + (2 * r + 1) * nb);
    };
    // one row (a decode step): inline, a parallel region would cost more than the row (4.3 -> 3.7 us a call)
    if (m == 1) quant_rows(0, 1); else at::parallel_for(0, m, 1, quant_rows);
  }
  // Work items: runs of at most `grain` rows of one part (a multiple of 4 rows: the 32-block kernels
  // take 4 weight rows at a time), split between the threads.
  std::vector<std::array<int64_t, 3>>& items = scratch.items;  // part, first row, end row (iteration order)
  items.clear();
  int64_t grain = std::max<int64_t>(4, std::min<int64_t>(64, ntot / (4 * at::get_num_threads())) & ~int64_t(3));
  for (int64_t pi = 0; pi < (int64_t)parts.size(); ++pi) {
    const int64_t g = tiled(parts[(size_t)pi], m) ? kTileItem : grain;
    for (int64_t j = 0; j < parts[pi].n; j += g) items.push_back({pi, j, std::min(parts[pi].n, j + g)});
  }
  float* op = out.data_ptr<float>();
  // Rows go in groups of JB (a few KB each, kept in L1/L2) and each group meets the activations 4 rows at
  // a time: the activations stream from L2 once per group instead of once per weight row, and every
  // weight block is unpacked once per 4 activation rows.
  constexpr int64_t JB = 16;
  // Each thread walks its own contiguous share of the items from the front (one stream through memory, as
  // the hardware prefetchers like), and a thread done with its share takes the others' remaining items from
  // their back: a thread that falls behind (the other tenant of its core, a late start) no longer keeps the
  // rest waiting at the end. Items are independent rows: results do not depend on who computed them.
  const int64_t n_items = (int64_t)items.size();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  ItemRange* shares = scratch.ranges(workers);
  for (int64_t t = 0; t < workers; ++t) shares[(size_t)t].set(n_items * t / workers, n_items * (t + 1) / workers);
  // One call per thread, w0 its share (run inline instead, the one call has w0 = 0 and takes every share).
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t /*end*/) {
    const uint8_t* act[4];
    const float *dx[4], *sx[4];
#ifdef MC_AVX2
    std::vector<TileK> tiles_k;
    std::vector<Tile32> tiles_32;
#endif
    int64_t share = w0, it = -1;
    auto claim = [&]() {  // own share from the front, then the others' from the back
      for (; share < w0 + workers; ++share) {
        ItemRange& r = shares[(size_t)(share % workers)];
        if ((it = share == w0 ? r.front() : r.back()) >= 0) return true;
      }
      return false;
    };
    while (claim()) {
      const Part& p = parts[(size_t)items[(size_t)it][0]];
      const int f = p.act;
      const int64_t nb = nbk[f], type = p.type;
      const int64_t* dst = p.inv.empty() ? nullptr : p.inv.data();
#ifdef MC_AVX2
      if (tiled(p, m)) {
        const int64_t j0 = items[(size_t)it][1], j1 = items[(size_t)it][2], rb = row_bytes[f];
        const uint8_t* qa = q8[f].data();
        const float* sc = scales[f].data();
        float* o = op + p.col0;
        if (p.ti.block == QK_K) {
          auto build = [&](const uint8_t* const* rows, int64_t i, TileK* t) { make_tile(type, rows, i, t); };
          auto mul = [&](int64_t cnt, int64_t r0, const TileK* t, __m256* acc) {
            const BQ8_K* y[4];
            for (int64_t r = 0; r < cnt; ++r) y[r] = (const BQ8_K*)(qa + (r0 + r) * rb);
            with_rows(cnt, [&](auto R) {
              if (type == Q4_K) tile_rows<Q4_K, R>(nb, t, y, acc); else tile_rows<Q6_K, R>(nb, t, y, acc);
            });
          };
          tile_part(nb, j0, j1, p.wp, p.ws, p.src, dst, m, o, ntot, tiles_k, build, mul);
        } else {
          with_type32(type, [&](auto dq) {
            using D = decltype(dq);
            auto build = [&](const uint8_t* const* rows, int64_t i, Tile32* t) { make_tile32<D>(rows, i, t); };
            auto mul = [&](int64_t cnt, int64_t r0, const Tile32* t, __m256* acc) {
              const uint8_t* a[4];
              const float *ddx[4], *ssx[4];
              for (int64_t r = 0; r < cnt; ++r) {
                a[r] = qa + (r0 + r) * rb;
                ddx[r] = sc + 2 * (r0 + r) * nb;
                ssx[r] = ddx[r] + nb;
              }
              with_rows(cnt, [&](auto R) { tile32_rows<D, R>(nb, t, a, ddx, ssx, acc); });
            };
            tile_part(nb, j0, j1, p.wp, p.ws, p.src, dst, m, o, ntot, tiles_32, build, mul);
          });
        }
        continue;
      }
#endif
      for (int64_t jb = items[(size_t)it][1]; jb < items[(size_t)it][2]; jb += JB) {
        const int64_t je = std::min(items[(size_t)it][2], jb + JB);
        const int64_t r_begin = p.row >= 0 ? p.row : 0, r_end = p.row >= 0 ? p.row + 1 : m;
        for (int64_t r0 = r_begin; r0 < r_end; r0 += 4) {
          const int64_t cnt = std::min<int64_t>(4, r_end - r0);
          for (int64_t r = 0; r < cnt; ++r) {
            act[r] = q8[f].data() + (r0 + r) * row_bytes[f];
            dx[r] = scales[f].data() + 2 * (r0 + r) * nb;
            sx[r] = dx[r] + nb;
          }
          float* o = op + r0 * ntot + p.col0;
          const uint8_t* wp = p.wp;
          const int64_t ws = p.ws;
          const int64_t* src = p.src;
          // RW x R accumulators (and the K types' per-row scales) stay within the 16 vector registers
          if (p.ti.block == QK) {
            switch (cnt) {
              case 1: dot_tile<4, 1>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              case 2: dot_tile<4, 2>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              case 3: dot_tile<2, 3>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              default: dot_tile<2, 4>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
            }
          } else {  // the K types: one weight row at a time measured fastest (their per-row scales fill registers)
            switch (cnt) {
              case 1: dot_tile<1, 1>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              case 2: dot_tile<1, 2>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              case 3: dot_tile<1, 3>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
              default: dot_tile<1, 4>(type, nb, jb, je, wp, ws, src, dst, act, dx, sx, o, ntot); break;
            }
          }
        }
      }
    }
  });
  return out;
}

at::Tensor ggml_mm(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k,
                   const c10::optional<at::Tensor>& rows) {
  std::vector<Part> parts;
  parts.push_back(make_part(w, type, k, rows));
  return mm_parts(x, parts, k);
}

// Several weight matrices of the same input width (q/k/v, gate/up) in one call: one (M, sum of N) output.
at::Tensor ggml_mm_cat(const at::Tensor& x, at::TensorList ws, at::IntArrayRef types, int64_t k,
                       const c10::List<c10::optional<at::Tensor>>& rows) {
  TORCH_CHECK(!ws.empty() && ws.size() == types.size() && ws.size() == rows.size(),
              "mamba_cli: ggml_mm_cat needs one type and one rows entry per weight");
  std::vector<Part> parts;
  for (size_t i = 0; i < ws.size(); ++i) parts.push_back(make_part(ws[i], types[i], k, rows.get(i)));
  return mm_parts(x, parts, k);
}

// Row r of x times expert ids[r]'s weights (one of ws, all N rows of `type`): (R, N). The chosen experts of a
// mixture-of-experts layer without their ids coming to the host (llama.cpp's mul_mat_id), all rows' products
// in one parallel region.
at::Tensor ggml_mm_id(const at::Tensor& x, at::TensorList ws, int64_t type, int64_t k, const at::Tensor& ids_in) {
  TORCH_CHECK(!ws.empty(), "mamba_cli: ggml_mm_id needs the experts' weights");
  TORCH_CHECK(x.dim() == 2 && ids_in.dim() == 1 && ids_in.numel() == x.size(0),
              "mamba_cli: ggml_mm_id needs one expert id per activation row");
  const at::Tensor ids = contiguous_as(ids_in, at::kLong);
  const int64_t* id = ids.data_ptr<int64_t>();
  if (x.size(0) == 0) {
    check_weights(ws[0], type, k, type_info(type));
    return at::empty({0, ws[0].size(0)}, x.options().dtype(at::kFloat));
  }
  std::vector<Part> parts;
  for (int64_t r = 0; r < x.size(0); ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < (int64_t)ws.size(), "mamba_cli: expert id ", id[r], " is out of range");
    parts.push_back(make_part(ws[(size_t)id[r]], type, k, c10::nullopt));
    parts.back().row = r;
    TORCH_CHECK(parts.back().n == parts[0].n, "mamba_cli: ggml_mm_id needs experts of one shape");
  }
  return mm_parts(x, parts, k);
}

at::Tensor ggml_dequant(const at::Tensor& w, int64_t type, int64_t k) {
  const TypeInfo ti = type_info(type);
  check_weights(w, type, k, ti);
  const int64_t n = w.size(0), ws = w.stride(0);
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) dequant_row(type, wp + j * ws, op + j * k, k);
  });
  return out;
}

#endif  // MC_CORE_ONLY

}  // namespace

#ifndef MC_CORE_ONLY

TORCH_LIBRARY(mamba_cli, m) {
  m.def("ggml_mm(Tensor x, Tensor w, int type, int k, Tensor? rows=None) -> Tensor");
  m.def("ggml_mm_cat(Tensor x, Tensor[] ws, int[] types, int k, Tensor?[] rows) -> Tensor");
  m.def("ggml_mm_id(Tensor x, Tensor[] ws, int type, int k, Tensor ids) -> Tensor");
  m.def("ggml_dequant(Tensor w, int type, int k) -> Tensor");
  m.def("simd() -> str", [] { return simd(); });
}

TORCH_LIBRARY_IMPL(mamba_cli, CPU, m) {
  m.impl("ggml_mm", &ggml_mm);
  m.impl("ggml_mm_cat", &ggml_mm_cat);
  m.impl("ggml_mm_id", &ggml_mm_id);
  m.impl("ggml_dequant", &ggml_dequant);
}
#endif  // MC_CORE_ONLY

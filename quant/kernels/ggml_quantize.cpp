// mamba-cli's native K-quant packers: llama.cpp's reference row quantizers for Q4_K and Q6_K, threaded.
//
// Registered as a torch custom op beside the matrix kernels (quant/native.py builds both files into one
// library):
//
//   ggml_quantize(x, type)     x : (B, block) float32 blocks -> (B, bytes per block) uint8, for
//                              Q4_0 / Q4_1 / Q8_0 (blocks of 32) and Q4_K / Q6_K (super-blocks of 256)
//
// The functions below are ggml-quants.c's quantize_row_{q4_0,q4_1,q8_0,q4_K,q6_K}_ref with their
// helpers make_qkx2_quants / make_qx_quants (llama.cpp, MIT licence), kept statement for statement
// (the helpers transposed to run the sub-blocks side by side) so that the bytes are llama.cpp's: every
// sum in element order, float32 throughout, no fused multiply-adds
// (llama.cpp builds this file for the baseline CPU, which has none; contraction is turned off here
// whatever -march says). quant/formats.py holds the vectorized torch port of the same code, the
// fallback when no compiler is found; tests/test_formats.py checks that both give the same bytes.
// Threads: torch's intra-op pool (at::parallel_for over super-blocks).

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int QK_K = 256;
constexpr float GROUP_MAX_EPS = 1e-15f;
enum : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

struct BQ4_0 { uint16_t d; uint8_t qs[16]; };                                    // 18 bytes / 32
struct BQ4_1 { uint16_t d, m; uint8_t qs[16]; };                                 // 20 bytes / 32
struct BQ8_0 { uint16_t d; int8_t qs[32]; };                                     // 34 bytes / 32
struct BQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; };        // 144 bytes / 256
struct BQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; }; // 210 bytes / 256
static_assert(sizeof(BQ4_0) == 18 && sizeof(BQ4_1) == 20 && sizeof(BQ8_0) == 34 && sizeof(BQ4_K) == 144 &&
              sizeof(BQ6_K) == 210, "block layouts");

inline uint16_t to_fp16(float f) { return c10::Half(f).x; }  // IEEE round to nearest even
inline float from_fp16(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

inline int nearest_int(float fval) {
  float val = fval + 12582912.f;
  int i;
  std::memcpy(&i, &val, sizeof(int));
  return (i & 0x007fffff) - 0x00400000;
}

template <class T> inline T mx(T a, T b) { return a > b ? a : b; }
template <class T> inline T mn(T a, T b) { return a < b ? a : b; }

// The searches run on 8 sub-blocks at once, one SIMD lane per sub-block (GCC/Clang vector extensions,
// lowered to AVX2, AVX-512, NEON or scalar code as the target allows): every lane does exactly the statements of llama.cpp's loop over one sub-block's elements, in their order, and
// where llama.cpp branches a lane selects. No sum is reordered: each lane's sum stays sequential.
// xs[i]: element i of every sub-block.

typedef float F __attribute__((vector_size(32)));   // 8 lanes of float32
typedef int32_t I __attribute__((vector_size(32))); // 8 lanes of int32

inline I nearest_v(F v) {  // nearest_int, lane by lane
  F t = v + 12582912.f;
  I i;
  std::memcpy(&i, &t, sizeof(I));
  return (i & 0x007fffff) - 0x00400000;
}

inline I clamp_v(I l, int lo, int hi) {
  l = l < hi ? l : hi;
  return l > lo ? l : lo;
}

// make_qx_quants(16, 32, x, L, rmse_type=1, qw=NULL) for 8 of the 16 sub-blocks of a Q6_K super-block;
// L holds the levels + nmax
void make_qx_quants_8(const float (&xin)[16][8], int32_t (&Lout)[16][8], float (&scale_out)[8]) {
  constexpr int n = 16, nmax = 32;
  F xs[n];
  I L[n], Laux[n];
  std::memcpy(xs, xin, sizeof(xs));
  F max = {}, amax = {};
  for (int i = 0; i < n; ++i) {
    F ax = xs[i] < 0 ? -xs[i] : xs[i];
    auto more = ax > amax;
    amax = more ? ax : amax;
    max = more ? xs[i] : max;
  }
  F zero_f = {};
  F sumlx, suml2;
  // levels at iscale into out (+ nmax), and their weighted sums sum(w x l), sum(w l^2), w = x^2
  auto levels = [&](F iscale, I (&out)[n]) {
    sumlx = suml2 = zero_f;
    for (int i = 0; i < n; ++i) {
      I l = clamp_v(nearest_v(iscale * xs[i]), -nmax, nmax - 1);
      out[i] = l + nmax;
      F w = xs[i] * xs[i];
      F lf = __builtin_convertvector(l, F);
      sumlx += w * xs[i] * lf;
      suml2 += w * lf * lf;
    }
  };
  levels(-nmax / max, L);
  F scale = suml2 != 0 ? sumlx / suml2 : zero_f;
  F best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    levels(-(nmax + 0.1f * is) / max, Laux);
    auto better = (suml2 > 0) & (sumlx * sumlx > best * suml2);
    F s = sumlx / suml2;
    scale = better ? s : scale;
    best = better ? s * sumlx : best;
    for (int i = 0; i < n; ++i) L[i] = better ? Laux[i] : L[i];
  }
  auto zero = amax < GROUP_MAX_EPS;
  scale = zero ? zero_f : scale;
  I zero_i = {};
  for (int i = 0; i < n; ++i) L[i] = zero ? zero_i : L[i];
  std::memcpy(scale_out, &scale, sizeof(scale));
  std::memcpy(Lout, L, sizeof(L));
}

// make_qkx2_quants(32, 15, x, weights, L, &the_min, Laux, -1, 0.1, 20, use_mad=false) for the 8
// sub-blocks of a Q4_K super-block
void make_qkx2_quants_8(const float (&xin)[32][8], const float (&win)[32][8], int32_t (&Lout)[32][8],
                        float (&scale_out)[8], float (&min_out)[8]) {
  constexpr int n = 32, nmax = 15, nstep = 20;
  constexpr float rmin = -1.f, rdelta = 0.1f;
  F xs[n], ws[n];
  I L[n], Laux[n];
  std::memcpy(xs, xin, sizeof(xs));
  std::memcpy(ws, win, sizeof(ws));
  F min = xs[0], max = xs[0];
  F sum_w = ws[0];
  F sum_x = sum_w * xs[0];
  for (int i = 1; i < n; ++i) {
    min = xs[i] < min ? xs[i] : min;
    max = xs[i] > max ? xs[i] : max;
    sum_w += ws[i];
    sum_x += ws[i] * xs[i];
  }
  F zero_f = {};
  min = min > 0 ? zero_f : min;
  const F min0 = min;
  auto flat = max == min;  // llama.cpp returns here: levels 0, scale 0, the min as it is
  F iscale = nmax / (max - min);
  F scale = 1 / iscale;
  F best_error = {};
  for (int i = 0; i < n; ++i) {
    L[i] = clamp_v(nearest_v(iscale * (xs[i] - min)), 0, nmax);
    F diff = scale * __builtin_convertvector(L[i], F) + min - xs[i];
    diff = diff * diff;
    best_error += ws[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    F sum_l = {}, sum_l2 = {}, sum_xl = {};
    for (int i = 0; i < n; ++i) {
      I l = clamp_v(nearest_v(iscale * (xs[i] - min)), 0, nmax);
      Laux[i] = l;
      F lf = __builtin_convertvector(l, F);
      sum_l += ws[i] * lf;
      sum_l2 += ws[i] * lf * lf;
      sum_xl += ws[i] * lf * xs[i];
    }
    F D = sum_w * sum_l2 - sum_l * sum_l;
    F this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    auto clip = this_min > 0;
    this_min = clip ? zero_f : this_min;
    this_scale = clip ? sum_xl / sum_l2 : this_scale;
    F cur_error = {};
    for (int i = 0; i < n; ++i) {
      F diff = this_scale * __builtin_convertvector(Laux[i], F) + this_min - xs[i];
      diff = diff * diff;
      cur_error += ws[i] * diff;
    }
    auto better = (D > 0) & (cur_error < best_error);
    best_error = better ? cur_error : best_error;
    scale = better ? this_scale : scale;
    min = better ? this_min : min;
    for (int i = 0; i < n; ++i) L[i] = better ? Laux[i] : L[i];
  }
  scale = flat ? zero_f : scale;
  min = flat ? min0 : min;
  I zero_i = {};
  for (int i = 0; i < n; ++i) L[i] = flat ? zero_i : L[i];
  F neg = -min;
  std::memcpy(scale_out, &scale, sizeof(scale));
  std::memcpy(min_out, &neg, sizeof(neg));
  std::memcpy(Lout, L, sizeof(L));
}

void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

void quantize_block_q4_k(const float* x, BQ4_K* y) {
  uint8_t L[QK_K];
  int32_t Lt[32][8];
  float xs[32][8], ws[32][8], mins[QK_K / 32], scales[QK_K / 32];
  std::memset(y, 0, sizeof(BQ4_K));
  for (int j = 0; j < QK_K / 32; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) {
      xs[l][j] = x[32 * j + l];
      ws[l][j] = av_x + std::fabs(x[32 * j + l]);
    }
  }
  make_qkx2_quants_8(xs, ws, Lt, scales, mins);
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < QK_K / 32; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
    for (int l = 0; l < 32; ++l) L[32 * j + l] = Lt[l][j];
  }
  float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t ls = nearest_int(inv_scale * scales[j]);
    uint8_t lm = nearest_int(inv_min * mins[j]);
    ls = mn<uint8_t>(63, ls);
    lm = mn<uint8_t>(63, lm);
    if (j < 4) {
      y->scales[j] = ls;
      y->scales[j + 4] = lm;
    } else {
      y->scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
      y->scales[j - 4] |= ((ls >> 4) << 6);
      y->scales[j - 0] |= ((lm >> 4) << 6);
    }
  }
  y->d = to_fp16(max_scale / 63.f);
  y->dmin = to_fp16(max_min / 63.f);
  uint8_t sc, m;
  for (int j = 0; j < QK_K / 32; ++j) {
    get_scale_min_k4(j, y->scales, &sc, &m);
    const float d = from_fp16(y->d) * sc;
    if (!d) continue;
    const float dm = from_fp16(y->dmin) * m;
    for (int ii = 0; ii < 32; ++ii) {
      int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = mx(0, mn(15, l));
    }
  }
  uint8_t* q = y->qs;
  for (int j = 0; j < QK_K; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
    q += 32;
  }
}

void quantize_block_q6_k(const float* x, BQ6_K* y) {
  int8_t L[QK_K];
  int32_t Lt[2][16][8];
  float xs[2][16][8], scales[QK_K / 16];
  for (int ib = 0; ib < QK_K / 16; ++ib)
    for (int i = 0; i < 16; ++i) xs[ib / 8][i][ib % 8] = x[16 * ib + i];
  for (int h = 0; h < 2; ++h) make_qx_quants_8(xs[h], Lt[h], *reinterpret_cast<float(*)[8]>(scales + 8 * h));
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < QK_K / 16; ++ib) {
    for (int i = 0; i < 16; ++i) L[16 * ib + i] = Lt[ib / 8][i][ib % 8];
    const float scale = scales[ib];
    const float abs_scale = std::fabs(scale);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scale;
    }
  }
  std::memset(y, 0, sizeof(BQ6_K));
  if (max_abs_scale < GROUP_MAX_EPS) {
    y->d = to_fp16(0.f);
    return;
  }
  float iscale = -128.f / max_scale;
  y->d = to_fp16(1 / iscale);
  for (int ib = 0; ib < QK_K / 16; ++ib) y->scales[ib] = mn(127, nearest_int(iscale * scales[ib]));
  for (int j = 0; j < QK_K / 16; ++j) {
    float d = from_fp16(y->d) * y->scales[j];
    if (!d) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / d);
      L[16 * j + ii] = mx(-32, mn(31, l)) + 32;
    }
  }
  uint8_t* ql = y->ql;
  uint8_t* qh = y->qh;
  for (int j = 0; j < QK_K; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
      const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
      ql[l + 0] = q1 | (q3 << 4);
      ql[l + 32] = q2 | (q4 << 4);
      qh[l] = (L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
              ((L[j + l + 96] >> 4) << 6);
    }
    ql += 64;
    qh += 32;
  }
}

void quantize_block_q4_0(const float* x, BQ4_0* y) {
  float amax = 0, max = 0;
  for (int j = 0; j < 32; j++) {
    const float v = x[j];
    if (amax < std::fabs(v)) {
      amax = std::fabs(v);
      max = v;
    }
  }
  const float d = max / -8;
  const float id = d ? 1.0f / d : 0.0f;
  y->d = to_fp16(d);
  for (int j = 0; j < 16; ++j) {
    const uint8_t xi0 = mn<int8_t>(15, (int8_t)(x[j] * id + 8.5f));
    const uint8_t xi1 = mn<int8_t>(15, (int8_t)(x[16 + j] * id + 8.5f));
    y->qs[j] = xi0 | (xi1 << 4);
  }
}

void quantize_block_q4_1(const float* x, BQ4_1* y) {
  float min = 3.402823466e+38f, max = -3.402823466e+38f;
  for (int j = 0; j < 32; j++) {
    const float v = x[j];
    if (v < min) min = v;
    if (v > max) max = v;
  }
  const float d = (max - min) / ((1 << 4) - 1);
  const float id = d ? 1.0f / d : 0.0f;
  y->d = to_fp16(d);
  y->m = to_fp16(min);
  for (int j = 0; j < 16; ++j) {
    const uint8_t xi0 = mn<int8_t>(15, (int8_t)((x[j] - min) * id + 0.5f));
    const uint8_t xi1 = mn<int8_t>(15, (int8_t)((x[16 + j] - min) * id + 0.5f));
    y->qs[j] = xi0 | (xi1 << 4);
  }
}

void quantize_block_q8_0(const float* x, BQ8_0* y) {
  float amax = 0;
  for (int j = 0; j < 32; j++) amax = mx(amax, std::fabs(x[j]));
  const float d = amax / ((1 << 7) - 1);
  const float id = d ? 1.0f / d : 0.0f;
  y->d = to_fp16(d);
  for (int j = 0; j < 32; ++j) y->qs[j] = (int8_t)std::round(x[j] * id);
}

template <class B, void (*F)(const float*, B*)>
at::Tensor quantize_blocks(const at::Tensor& x, int64_t grain) {
  const int64_t nb = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({nb, (int64_t)sizeof(B)}, x.options().dtype(at::kByte));
  const float* src = x.data_ptr<float>();
  B* dst = reinterpret_cast<B*>(out.data_ptr<uint8_t>());
  at::parallel_for(0, nb, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) F(src + i * n, dst + i);
  });
  return out;
}

at::Tensor ggml_quantize(const at::Tensor& x_in, int64_t type) {
  const int64_t block = (type == Q4_K || type == Q6_K) ? QK_K : 32;
  TORCH_CHECK(type == Q4_0 || type == Q4_1 || type == Q8_0 || type == Q4_K || type == Q6_K,
              "ggml_quantize: Q4_0, Q4_1, Q8_0, Q4_K or Q6_K, got type ", type);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == block, "ggml_quantize: x must be (blocks, ", block, ")");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  switch (type) {
    case Q4_0: return quantize_blocks<BQ4_0, quantize_block_q4_0>(x, 2048);
    case Q4_1: return quantize_blocks<BQ4_1, quantize_block_q4_1>(x, 2048);
    case Q8_0: return quantize_blocks<BQ8_0, quantize_block_q8_0>(x, 2048);
    case Q4_K: return quantize_blocks<BQ4_K, quantize_block_q4_k>(x, 64);
    default: return quantize_blocks<BQ6_K, quantize_block_q6_k>(x, 64);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mamba_cli, m) {
  m.def("ggml_quantize(Tensor x, int type) -> Tensor");
}

TORCH_LIBRARY_IMPL(mamba_cli, CPU, m) {
  m.impl("ggml_quantize", &ggml_quantize);
}

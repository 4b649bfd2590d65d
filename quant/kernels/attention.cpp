// Decode attention: one query token per sequence against a KV cache, in float32 (a torch custom op).
//
//   attn_decode(q, k, v, mask=None)   q (B, H, 1, D), k and v (B, Hk, S, D) with H a multiple of Hk
//                                     (query head h reads kv head h / (H / Hk), as SDPA's enable_gqa);
//                                     mask: None or bool with S (shared) or B*S (per sequence) entries,
//                                     true = attended -> (B, H, 1, D), softmax(q k^T / sqrt(D)) v
//
// Why: torch's CPU SDPA spends ~70-90 us per call on a decode step's tiny problem (9 heads x 170
// positions: 2 ms of a 135M model's 17 ms step), mostly setting up its blocked flash kernel. Here the
// H / Hk queries sharing a kv head are handled together (each key and value row is read once), and long
// caches are split into chunks of positions across torch's threads (flash-decoding: each chunk keeps its
// own max, sum and weighted values; the chunks are merged at the end). Short caches run on the calling
// thread: a parallel region costs more than the work.
//
// k and v may be views with any strides except the last (a cache's first S positions). Sums are float32 in
// the order written here, so results equal SDPA's to float32 rounding, not bitwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MC_AVX2 1
#endif

namespace {

#ifdef MC_AVX2
// The 8 horizontal sums of a[0..7], as one vector.
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// e^x for 8 floats (Cephes' expf, as in avx_mathfun): ~1 ulp; -inf and x < -88.4 give 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

constexpr int64_t kChunk = 256;                // positions per work item when a cache is split
constexpr int64_t kSerialWork = int64_t(1) << 14;  // below this many K elements (B*Hk*S*D): one thread

// One chunk of positions [j0, j1) of one kv head: for each of its G queries (pre-scaled, G x D), the
// chunk's max score, sum of exp(score - max) and the exp-weighted sum of values (D), into part
// (G x (D + 2): the D sums, then max, then sum).
void chunk(const float* qs, int64_t g_count, int64_t d, const float* kp, int64_t ks, const float* vp, int64_t vs,
           const bool* mask, int64_t j0, int64_t j1, float* part, std::vector<float>& scores) {
  const int64_t n = j1 - j0;
  scores.resize((size_t)(g_count * n));
  float* sc = scores.data();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t j_start = 0;
#ifdef MC_AVX2
  if (d % 8 == 0) {  // 8 keys at a time: 8 accumulators, one horizontal-sum tree per query
    for (; j_start + 8 <= n; j_start += 8) {
      const float* kr = kp + (j0 + j_start) * ks;
      for (int64_t g = 0; g < g_count; ++g) {
        const float* qg = qs + g * d;
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
          const __m256 qv = _mm256_loadu_ps(qg + i);
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr + r * ks + i), acc[r]);
        }
        _mm256_storeu_ps(sc + g * n + j_start, hsum8(acc));
      }
      if (mask) {
        for (int r = 0; r < 8; ++r)
          if (!mask[j0 + j_start + r])
            for (int64_t g = 0; g < g_count; ++g) sc[g * n + j_start + r] = kNegInf;
      }
    }
  }
#endif
  for (int64_t j = j_start; j < n; ++j) {
    if (mask && !mask[j0 + j]) {
      for (int64_t g = 0; g < g_count; ++g) sc[g * n + j] = kNegInf;
      continue;
    }
    const float* kr = kp + (j0 + j) * ks;
    for (int64_t g = 0; g < g_count; ++g) {
      const float* qg = qs + g * d;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t i = 0; i < d; ++i) a += qg[i] * kr[i];
      sc[g * n + j] = a;
    }
  }
  for (int64_t g = 0; g < g_count; ++g) {
    float* s = sc + g * n;
    float* out = part + g * (d + 2);
    float m = kNegInf;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    float l = 0.f;
    if (m != kNegInf) {
      int64_t j = 0;
#ifdef MC_AVX2
      __m256 lv = _mm256_setzero_ps();
      const __m256 mv = _mm256_set1_ps(m);
      for (; j + 8 <= n; j += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        lv = _mm256_add_ps(lv, p);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, lv);
      for (float x : lanes) l += x;
#endif
      for (; j < n; ++j) {
        s[j] = std::exp(s[j] - m);  // exp(-inf) = 0 for masked positions
        l += s[j];
      }
    }
    std::fill(out, out + d, 0.f);
    out[d] = m;
    out[d + 1] = l;
  }
  int64_t i_done = 0;
#ifdef MC_AVX2
  // each query's weighted sum of values in registers, 64 dims at a time (the chunk's values stay in L2)
  for (; i_done + 64 <= d; i_done += 64) {
    for (int64_t g = 0; g < g_count; ++g) {
      const float* p = sc + g * n;
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m256 pv = _mm256_set1_ps(p[j]);
        const float* vr = vp + (j0 + j) * vs + i_done;
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(vr + 8 * r), acc[r]);
      }
      float* out = part + g * (d + 2) + i_done;
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + 8 * r, acc[r]);
    }
  }
#endif
  if (i_done == d) return;
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = vp + (j0 + j) * vs;
    for (int64_t g = 0; g < g_count; ++g) {
      const float p = sc[g * n + j];
      if (p == 0.f) continue;  // masked (or underflowed: adds nothing)
      float* out = part + g * (d + 2);
#pragma omp simd
      for (int64_t i = i_done; i < d; ++i) out[i] += p * vr[i];
    }
  }
}

at::Tensor attn_decode(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q_in.size(2) == 1,
              "mamba_cli.attn_decode: q must be (B, H, 1, D), k and v (B, Hk, S, D)");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "mamba_cli.attn_decode: float32 only");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q_in.size(0) && k.size(3) == q_in.size(3),
              "mamba_cli.attn_decode: k and v must be (B, Hk, S, D) for q (B, H, 1, D)");
  const int64_t b_count = q_in.size(0), h = q_in.size(1), d = q_in.size(3), hk = k.size(1), s_len = k.size(2);
  TORCH_CHECK(hk > 0 && h % hk == 0, "mamba_cli.attn_decode: query heads must be a multiple of kv heads");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "mamba_cli.attn_decode: k and v rows must be contiguous");
  const at::Tensor q = q_in.contiguous();
  at::Tensor mask;
  int64_t mask_row = 0;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool, "mamba_cli.attn_decode: the mask must be bool");
    TORCH_CHECK(mask.numel() == s_len || mask.numel() == b_count * s_len,
                "mamba_cli.attn_decode: the mask must have S or B*S entries");
    mask_row = mask.numel() == s_len ? 0 : s_len;
  }
  at::Tensor out = at::empty({b_count, h, 1, d}, q.options());
  if (out.numel() == 0) return out;
  const int64_t g_count = h / hk;
  const float scale = 1.f / std::sqrt((float)d);
  const int64_t work = b_count * hk * s_len * d, threads = at::get_num_threads();
  const bool parallel = threads > 1 && work >= kSerialWork && !at::in_parallel_region();
  // parallel: chunks of at most kChunk positions, and at least two work items per thread
  int64_t chunks = 1;
  if (parallel) {
    chunks = std::max((s_len + kChunk - 1) / kChunk, (2 * threads + b_count * hk - 1) / (b_count * hk));
    chunks = std::max<int64_t>(1, std::min(chunks, s_len / 16));
  }
  const int64_t span = (s_len + chunks - 1) / chunks;
  const int64_t items = b_count * hk * chunks, part_size = g_count * (d + 2);
  std::vector<float> parts((size_t)(items * part_size));
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qs((size_t)(g_count * d));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t c = it % chunks, g = (it / chunks) % hk, b = it / (chunks * hk);
      const float* qh = qp + (b * h + g * g_count) * d;
      for (int64_t i = 0; i < g_count * d; ++i) qs[(size_t)i] = qh[i] * scale;
      const int64_t j0 = std::min(s_len, c * span), j1 = std::min(s_len, j0 + span);
      chunk(qs.data(), g_count, d, kp + b * k.stride(0) + g * k.stride(1), k.stride(2),
            vp + b * v.stride(0) + g * v.stride(1), v.stride(2), mp ? mp + b * mask_row : nullptr, j0, j1,
            parts.data() + it * part_size, scores);
    }
  };
  if (!parallel || items == 1) {
    run(0, items);
  } else {
    at::parallel_for(0, items, 1, run);
  }
  // merge each kv head's chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c
  float* op = out.data_ptr<float>();
  for (int64_t bg = 0; bg < b_count * hk; ++bg) {
    for (int64_t g = 0; g < g_count; ++g) {
      const float* first = parts.data() + (bg * chunks) * part_size + g * (d + 2);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, first[c * part_size + d]);
      float* o = op + (bg * g_count + g) * d;  // (b, h = kv head * G + g): bg * G + g
      std::fill(o, o + d, 0.f);
      if (m == -std::numeric_limits<float>::infinity()) continue;  // nothing attended: zeros
      float l = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* pc = first + c * part_size;
        if (pc[d + 1] == 0.f) continue;
        const float w = std::exp(pc[d] - m);
        l += w * pc[d + 1];
        for (int64_t i = 0; i < d; ++i) o[i] += w * pc[i];
      }
      const float inv = 1.f / l;
      for (int64_t i = 0; i < d; ++i) o[i] *= inv;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mamba_cli, m) {
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, Tensor? mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mamba_cli, CPU, m) {
  m.impl("attn_decode", &attn_decode);
}

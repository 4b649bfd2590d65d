// The native kernels' row dot products without torch, for a SIMD path this machine cannot load into torch
// (NEON, built with a cross compiler and run under qemu-user by tests/test_native_simd.py) and for the
// paths it can. For every type, block count, and RW weight rows x R activation rows the kernels take at once,
// random weight blocks (scales: zero, subnormal, normal, large) against activations quantized by the kernels'
// own quantize_row: each result is checked against the same sum in double (fp32 rounding allowed), and
// printed as a hex float, so that two builds (a SIMD path and the plain one) can be compared bit for bit.
//
//   g++ -O2 -std=c++17 -I. tests/native/simd_check.cpp -o simd_check && ./simd_check
//   -> "simd <path>", one line per case, then "ok" (exit 0) or "FAIL ..." lines (exit 1)
#define MC_CORE_ONLY 1
#include "../../quant/kernels/ggml_cpu.cpp"

#include <cinttypes>
#include <cstdio>
#include <random>

namespace {

std::mt19937 rng(1234);

uint16_t random_scale(int kind) {  // fp16 bits: 0 zero, 1 subnormal, 2 normal, 3 large
  std::uniform_int_distribution<int> man(1, 0x3FF), sign(0, 1);
  const uint16_t s = (uint16_t)(sign(rng) << 15);
  switch (kind) {
    case 0: return s;
    case 1: return (uint16_t)(s | man(rng));
    case 3: return (uint16_t)(s | (std::uniform_int_distribution<int>(20, 29)(rng) << 10) | man(rng));
    default: return (uint16_t)(s | (std::uniform_int_distribution<int>(8, 15)(rng) << 10) | man(rng));
  }
}

// nb random blocks of `type`: random bytes, then the fp16 scales set (K types: d, dmin; Q6_K: d at the end)
std::vector<uint8_t> random_row(int64_t type, int64_t nb, int row) {
  const TypeInfo ti = type_info(type);
  std::vector<uint8_t> w((size_t)(nb * ti.bytes));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : w) b = (uint8_t)byte(rng);
  for (int64_t i = 0; i < nb; ++i) {
    uint8_t* b = w.data() + i * ti.bytes;
    const int kind = (int)((row + i) % 7 == 0 ? 0 : (row + i) % 5 == 0 ? 1 : (row + i) % 11 == 0 ? 3 : 2);
    uint16_t d = random_scale(kind), m = random_scale(2);
    if (type == Q6_K) {
      std::memcpy(b + 208, &d, 2);
    } else {
      std::memcpy(b, &d, 2);
      if (type == Q4_1 || type == Q5_1 || type == Q4_K) std::memcpy(b + 2, &m, 2);
    }
  }
  return w;
}

struct Act {  // one activation row quantized as the op does, with each 32-block's d and s as float
  std::vector<uint8_t> q;
  std::vector<float> dx, sx;
  std::vector<double> value;  // the dequantized activations
};

Act quantize(int64_t type, const std::vector<float>& x) {  // as mm_parts does, then the values
  const TypeInfo ti = type_info(type);
  const int64_t k = (int64_t)x.size(), nb = k / ti.block;
  Act a;
  a.q.resize((size_t)(nb * ti.act_bytes));
  a.dx.resize((size_t)nb);
  a.sx.resize((size_t)nb);
  quantize_act(type, x.data(), a.q.data(), k, a.dx.data(), a.sx.data());
  a.value.resize((size_t)k);
  const int f = act_format(ti);
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = a.q.data() + i * ti.act_bytes;
    if (f == 2) {
      const BQ8_K& y = *(const BQ8_K*)b;
      for (int j = 0; j < QK_K; ++j) a.value[(size_t)(i * QK_K + j)] = (double)y.d * y.qs[j];
      continue;
    }
    const int8_t* qs = (const int8_t*)(b + (f == 1 ? 4 : 2));
    for (int j = 0; j < QK; ++j) a.value[(size_t)(i * QK + j)] = (double)a.dx[(size_t)i] * qs[j];
  }
  return a;
}

// The 32-block types' sum in double from the plain decoder's quants: d_w dx sum(q_w q_x) a block, plus
// m sx for the types with a min (sx: Q8_1's s, d times the quants' sum rounded to fp16, as llama.cpp uses it)
template <class D>
double ref32(const uint8_t* w, const Act& a, int64_t nb, double* mag) {
  const auto* b = (const typename D::B*)w;
  double ref = 0.0;
  for (int64_t i = 0; i < nb; ++i) {
    const int8_t* qx = (const int8_t*)(a.q.data() + i * (D::kMin ? sizeof(BQ8_1) : sizeof(BQ8_0)) +
                                       (D::kMin ? 4 : 2));
    int64_t sum = 0, abs_sum = 0;
    for (int j = 0; j < QK; ++j) sum += D::q(b[i], j) * qx[j], abs_sum += std::abs(D::q(b[i], j) * qx[j]);
    const double scale = (double)h2f(b[i].d) * a.dx[(size_t)i];
    ref += scale * (double)sum;
    *mag += std::fabs(scale) * (double)abs_sum;
    if constexpr (D::kMin) {
      ref += (double)h2f(b[i].m) * a.sx[(size_t)i];
      *mag += std::fabs((double)h2f(b[i].m) * a.sx[(size_t)i]);
    }
  }
  return ref;
}

int failures = 0;

template <int RW, int R>
void check(int64_t type, int64_t nb) {
  const TypeInfo ti = type_info(type);
  const int64_t k = nb * ti.block;
  std::vector<std::vector<uint8_t>> rows;
  for (int c = 0; c < RW; ++c) rows.push_back(random_row(type, nb, c));
  std::vector<Act> acts;
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int r = 0; r < R; ++r) {
    std::vector<float> x((size_t)k);
    for (int64_t j = 0; j < k; ++j) x[(size_t)j] = normal(rng) * (r == 1 ? 1e-3f : r == 2 ? 300.f : 1.f);
    if (r == 3) std::fill(x.begin(), x.begin() + ti.block, 0.f);  // an all-zero activation block
    acts.push_back(quantize(type, x));
  }
  const uint8_t* w[RW];
  for (int c = 0; c < RW; ++c) w[c] = rows[(size_t)c].data();
  const uint8_t* q8[R];
  const float *dx[R], *sx[R];
  for (int r = 0; r < R; ++r) q8[r] = acts[(size_t)r].q.data(), dx[r] = acts[(size_t)r].dx.data(), sx[r] = acts[(size_t)r].sx.data();
  float out[RW * R];
  dot_rows<RW, R>(type, nb, w, q8, dx, sx, out, 0);
  std::printf("type %" PRId64 " nb %" PRId64 " rw %d r %d:", type, nb, RW, R);
  for (int c = 0; c < RW; ++c) {
    std::vector<float> wv((size_t)k);
    dequant_row(type, w[c], wv.data(), k);
    for (int r = 0; r < R; ++r) {
      double ref = 0.0, mag = 0.0;
      const Act& a = acts[(size_t)r];
      switch (type) {
        case Q4_0: ref = ref32<DQ4_0>(w[c], a, nb, &mag); break;
        case Q4_1: ref = ref32<DQ4_1>(w[c], a, nb, &mag); break;
        case Q5_0: ref = ref32<DQ5_0>(w[c], a, nb, &mag); break;
        case Q5_1: ref = ref32<DQ5_1>(w[c], a, nb, &mag); break;
        case Q8_0: ref = ref32<DQ8_0>(w[c], a, nb, &mag); break;
        default:  // the K types: their dequantized weights (d sc q - dmin mn, in float) times the activations
          for (int64_t j = 0; j < k; ++j) {
            ref += (double)wv[(size_t)j] * a.value[(size_t)j];
            mag += std::fabs((double)wv[(size_t)j] * a.value[(size_t)j]);
          }
      }
      const float got = out[c * R + r];
      std::printf(" %a", (double)got);
      // the kernels scale integer sums: fp32 rounding of a few operations a block, relative to sum |w x|
      if (!(std::fabs((double)got - ref) <= 2e-6 * (double)nb * mag + 1e-30)) {
        std::printf("\nFAIL type %" PRId64 " nb %" PRId64 " RW %d R %d row %d act %d: %.9g vs %.9g (|w x| %.3g)\n",
                    type, nb, RW, R, c, r, (double)got, ref, mag);
        ++failures;
      }
    }
  }
  std::printf("\n");
}

template <int RW>
void check_rows(int64_t type, int64_t nb) {
  check<RW, 1>(type, nb);
  check<RW, 2>(type, nb);
  check<RW, 4>(type, nb);
}

}  // namespace

int main() {
  std::printf("simd %s\n", simd().c_str());
  for (int64_t type : {Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K})
    for (int64_t nb : {1, 2, 3, 8, 17}) {
      check_rows<1>(type, nb);
      check_rows<2>(type, nb);
      check_rows<4>(type, nb);
    }
  if (failures) {
    std::printf("FAIL: %d results\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}

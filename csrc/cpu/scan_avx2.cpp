// AVX2 + FMA micro-kernels.  Register budget (16 ymm): float32 takes 6
// queries x 1 panel (two ymm halves) = 12 accumulators; bf16 widens each
// pair word into two float32 vectors per half and takes 3 queries at a time.
#include <immintrin.h>

#include <algorithm>

#include "microkernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 6;
constexpr int kMaxQBf16 = 3;

template <int NQ>
void dot_f32_block(const float* q, int nq, const float* panel, int dim, float* out,
                   size_t ldo) {
  __m256 acc[NQ][2];
  for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_load_ps(panel + d * kLanes);
    const __m256 b1 = _mm256_load_ps(panel + d * kLanes + 8);
    const float* qd = q + d * nq;
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const __m256 a = _mm256_broadcast_ss(qd + i);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < NQ; ++i) {
    _mm256_storeu_ps(out + i * ldo, acc[i][0]);
    _mm256_storeu_ps(out + i * ldo + 8, acc[i][1]);
  }
}

// A bf16 pair word holds dimension 2j in its low half and 2j+1 in its high
// half: shifting left by 16 widens the low one, masking keeps the high one.
// `q` points at this sub-block's first query inside a [pairs][nq][2] pack.
template <int NQ>
void dot_bf16_block(const float* q, int nq, const uint16_t* panel, int pairs, float* out,
                    size_t ldo) {
  __m256 acc[NQ][2];
  for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int j = 0; j < pairs; ++j) {
    const uint16_t* row = panel + static_cast<size_t>(j) * 2 * kLanes;
    const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + 16));
    const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
    const __m256 hi0 = _mm256_castsi256_ps(_mm256_and_si256(w0, hi_mask));
    const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
    const __m256 hi1 = _mm256_castsi256_ps(_mm256_and_si256(w1, hi_mask));
    const float* qj = q + static_cast<size_t>(j) * nq * 2;
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i) {
      const __m256 a_lo = _mm256_broadcast_ss(qj + 2 * i);
      const __m256 a_hi = _mm256_broadcast_ss(qj + 2 * i + 1);
      acc[i][0] = _mm256_fmadd_ps(a_lo, lo0, acc[i][0]);
      acc[i][0] = _mm256_fmadd_ps(a_hi, hi0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a_lo, lo1, acc[i][1]);
      acc[i][1] = _mm256_fmadd_ps(a_hi, hi1, acc[i][1]);
    }
  }
  for (int i = 0; i < NQ; ++i) {
    _mm256_storeu_ps(out + i * ldo, acc[i][0]);
    _mm256_storeu_ps(out + i * ldo + 8, acc[i][1]);
  }
}

void dot_f32(const float* q, int nq, const float* panels, int npanels, int dim, float* out,
             size_t ldo, Prefetch& /*prefetch*/) {
  for (int p = 0; p < npanels; ++p)
    with_query_count<kMaxQ>(nq, [&](auto n) {
      dot_f32_block<decltype(n)::value>(q, nq, panels + static_cast<size_t>(p) * kLanes * dim,
                                        dim, out + p * kLanes, ldo);
    });
}

void dot_bf16(const void* qv, int nq, const uint16_t* panels, int npanels, int padded_dim,
              float* out, size_t ldo, Prefetch& /*prefetch*/) {
  const float* q = static_cast<const float*>(qv);
  for (int p = 0; p < npanels; ++p) {
    const uint16_t* panel = panels + static_cast<size_t>(p) * kLanes * padded_dim;
    for (int i0 = 0; i0 < nq; i0 += kMaxQBf16) {
      const int nb = std::min(kMaxQBf16, nq - i0);
      with_query_count<kMaxQBf16>(nb, [&](auto n) {
        dot_bf16_block<decltype(n)::value>(q + 2 * i0, nq, panel, padded_dim / 2,
                                           out + i0 * ldo + p * kLanes, ldo);
      });
    }
  }
}

double read_sum(const float* data, int64_t n) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_add_ps(acc[u], _mm256_loadu_ps(data + i + 8 * u));
  double s = 0.0;
  for (; i < n; ++i) s += data[i];
  alignas(32) float lanes[8];
  for (auto& a : acc) {
    _mm256_store_ps(lanes, a);
    for (float v : lanes) s += v;
  }
  return s;
}

const MicroKernels kAvx2 = {"avx2", kMaxQ, kWidened, dot_f32, dot_bf16, read_sum};

}  // namespace

const MicroKernels* avx2_kernels() { return &kAvx2; }

}  // namespace protoserve

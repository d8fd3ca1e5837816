// AVX2 + FMA micro-kernels.  Register budget (16 ymm): 6 queries x 1 panel
// (two ymm halves) = 12 accumulators, 2 panel vectors and 1 broadcast.
#include <immintrin.h>

#include <type_traits>

#include "microkernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 6;

template <int NQ>
void dot_f32_block(const float* q, size_t ldq, const float* panel, int dim,
                   float* out, size_t ldo) {
  __m256 acc[NQ][2];
  for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_load_ps(panel + d * kLanes);
    const __m256 b1 = _mm256_load_ps(panel + d * kLanes + 8);
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const __m256 a = _mm256_broadcast_ss(q + i * ldq + d);
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
template <int NQ>
void dot_bf16_block(const uint32_t* q, size_t ldq, const uint16_t* panel, int pairs,
                    float* out, size_t ldo) {
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
#pragma GCC unroll 8
    for (int i = 0; i < NQ; ++i) {
      const uint32_t pair = q[i * ldq + j];
      const __m256 a_lo = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(pair << 16)));
      const __m256 a_hi =
          _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(pair & 0xFFFF0000u)));
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

template <typename Fn>
void by_query_count(int nq, Fn&& fn) {
  switch (nq) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    default: fn(std::integral_constant<int, 6>{}); break;
  }
}

void dot_f32(const float* q, size_t ldq, int nq, const float* panels, int npanels,
             int dim, float* out, size_t ldo) {
  for (int p = 0; p < npanels; ++p) {
    by_query_count(nq, [&](auto n) {
      dot_f32_block<decltype(n)::value>(q, ldq, panels + static_cast<size_t>(p) * kLanes * dim,
                                        dim, out + p * kLanes, ldo);
    });
  }
}

void dot_bf16(const uint32_t* q, size_t ldq, int nq, const uint16_t* panels,
              int npanels, int padded_dim, float* out, size_t ldo) {
  for (int p = 0; p < npanels; ++p) {
    by_query_count(nq, [&](auto n) {
      dot_bf16_block<decltype(n)::value>(
          q, ldq, panels + static_cast<size_t>(p) * kLanes * padded_dim, padded_dim / 2,
          out + p * kLanes, ldo);
    });
  }
}

const MicroKernels kAvx2 = {"avx2", kMaxQ, 1, dot_f32, dot_bf16};

}  // namespace

const MicroKernels* avx2_kernels() { return &kAvx2; }

}  // namespace protoserve

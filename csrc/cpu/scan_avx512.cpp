// AVX-512 micro-kernels, compiled twice: with PS_AVX512_BF16 (the
// "avx512_bf16" level) and without it (the "avx512" level, for AVX-512 CPUs
// without the BF16 extension).  Register budget (32 zmm): up to 12 queries x 2
// panels = 24 accumulators plus 2 panel vectors; the query value comes from
// memory as an embedded broadcast.  The bf16 path uses VDPBF16PS, which
// multiplies pairs of bf16 values and accumulates both products into one
// float32 lane: twice the work of an FMA per instruction and half the bytes.
#include <immintrin.h>

#include <type_traits>

#include "microkernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 12;

#if defined(PS_AVX512_BF16)
#define PS_BF16_VEC __m512bh
#define PS_LEVEL_NAME "avx512_bf16"
#define PS_ENTRY avx512_bf16_kernels
#else
#define PS_BF16_VEC __m512i
#define PS_LEVEL_NAME "avx512"
#define PS_ENTRY avx512_kernels
#endif

template <int NQ, int NP>
void dot_f32_block(const float* q, size_t ldq, const float* panels, int dim,
                   float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * dim;
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    __m512 b[NP];
    for (int p = 0; p < NP; ++p) b[p] = _mm512_load_ps(panels + p * pstride + d * kLanes);
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const __m512 a = _mm512_set1_ps(q[i * ldq + d]);
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_fmadd_ps(a, b[p], acc[i][p]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + i * ldo + p * kLanes, acc[i][p]);
}

template <int NQ, int NP>
void dot_bf16_block(const uint32_t* q, size_t ldq, const uint16_t* panels,
                    int padded_dim, float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * padded_dim;
  const int pairs = padded_dim / 2;
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int j = 0; j < pairs; ++j) {
    PS_BF16_VEC b[NP];
    for (int p = 0; p < NP; ++p)
      b[p] = (PS_BF16_VEC)_mm512_load_si512(panels + p * pstride + static_cast<size_t>(j) * 2 * kLanes);
#if defined(PS_AVX512_BF16)
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i * ldq + j]));
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], a, b[p]);
    }
#else
    // No BF16 instructions: widen each half of the pair word to float32.
    __m512 lo[NP], hi[NP];
    for (int p = 0; p < NP; ++p) {
      lo[p] = _mm512_castsi512_ps(_mm512_slli_epi32(b[p], 16));
      hi[p] = _mm512_castsi512_ps(_mm512_and_si512(b[p], _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const uint32_t pair = q[i * ldq + j];
      const __m512 a_lo = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair << 16)));
      const __m512 a_hi = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(pair & 0xFFFF0000u)));
      for (int p = 0; p < NP; ++p) {
        acc[i][p] = _mm512_fmadd_ps(a_lo, lo[p], acc[i][p]);
        acc[i][p] = _mm512_fmadd_ps(a_hi, hi[p], acc[i][p]);
      }
    }
#endif
  }
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + i * ldo + p * kLanes, acc[i][p]);
}

template <int NP, typename Fn>
void by_query_count(int nq, Fn&& fn) {
  switch (nq) {
#define PS_CASE(n) case n: fn(std::integral_constant<int, n>{}); break;
    PS_CASE(1) PS_CASE(2) PS_CASE(3) PS_CASE(4) PS_CASE(5) PS_CASE(6)
    PS_CASE(7) PS_CASE(8) PS_CASE(9) PS_CASE(10) PS_CASE(11)
#undef PS_CASE
    default: fn(std::integral_constant<int, 12>{}); break;
  }
}

void dot_f32(const float* q, size_t ldq, int nq, const float* panels, int npanels,
             int dim, float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * dim;
  int p = 0;
  for (; p + 2 <= npanels; p += 2)
    by_query_count<2>(nq, [&](auto n) {
      dot_f32_block<decltype(n)::value, 2>(q, ldq, panels + p * pstride, dim, out + p * kLanes, ldo);
    });
  if (p < npanels)
    by_query_count<1>(nq, [&](auto n) {
      dot_f32_block<decltype(n)::value, 1>(q, ldq, panels + p * pstride, dim, out + p * kLanes, ldo);
    });
}

void dot_bf16(const uint32_t* q, size_t ldq, int nq, const uint16_t* panels,
              int npanels, int padded_dim, float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * padded_dim;
  int p = 0;
  for (; p + 2 <= npanels; p += 2)
    by_query_count<2>(nq, [&](auto n) {
      dot_bf16_block<decltype(n)::value, 2>(q, ldq, panels + p * pstride, padded_dim,
                                            out + p * kLanes, ldo);
    });
  if (p < npanels)
    by_query_count<1>(nq, [&](auto n) {
      dot_bf16_block<decltype(n)::value, 1>(q, ldq, panels + p * pstride, padded_dim,
                                            out + p * kLanes, ldo);
    });
}

const MicroKernels kAvx512 = {PS_LEVEL_NAME, kMaxQ, 2, dot_f32, dot_bf16};

}  // namespace

const MicroKernels* PS_ENTRY() { return &kAvx512; }

}  // namespace protoserve

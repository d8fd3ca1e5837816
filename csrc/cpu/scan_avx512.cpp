// AVX-512 micro-kernels, compiled twice: with PS_AVX512_BF16 (the
// "avx512_bf16" level, whose bf16 scan uses VDPBF16PS on packed bf16 query
// pairs) and without it (the "avx512" level, which widens bf16 panels to
// float32 and uses FMAs).  Register budget (32 zmm): up to 12 queries x 2
// panels = 24 accumulators; query values are broadcasts from the packed
// query block in L1.
#include <immintrin.h>

#include <chrono>

#include "microkernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 12;

template <int NQ, int NP>
void dot_f32_block(const float* q, const float* panels, size_t pstride, int dim, float* out,
                   size_t ldo, Prefetch& pf) {
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int d = 0; d < dim; ++d) {
    if (pf.next < pf.end) {
      _mm_prefetch(pf.next, _MM_HINT_T1);
      pf.next += 64;
    }
    __m512 b[NP];
    for (int p = 0; p < NP; ++p) b[p] = _mm512_load_ps(panels + p * pstride + d * kLanes);
    const float* qd = q + d * NQ;
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const __m512 a = _mm512_set1_ps(qd[i]);
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_fmadd_ps(a, b[p], acc[i][p]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + i * ldo + p * kLanes, acc[i][p]);
}

// A bf16 scan of one or two queries is bound by memory, and each VDPBF16PS
// step covers fewer bytes per cycle than an FMA step, so the out-of-order
// window alone keeps too few lines in flight: every panel stream is also
// prefetched kStreamAhead lines ahead of its loads.
constexpr int kStreamAhead = 24;

template <int NQ, int NP>
inline void prefetch_streams(const uint16_t* panels, size_t pstride, int j) {
  if constexpr (NQ <= 2) {
    for (int p = 0; p < NP; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(
                       panels + p * pstride + static_cast<size_t>(j + kStreamAhead) * 2 * kLanes),
                   _MM_HINT_T0);
  }
}

#if defined(PS_AVX512_BF16)
constexpr int kBf16Format = kBf16Pairs;
template <int NQ, int NP>
void dot_bf16_block(const void* qv, const uint16_t* panels, size_t pstride, int pairs,
                    float* out, size_t ldo, Prefetch& pf) {
  const uint32_t* q = static_cast<const uint32_t*>(qv);
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  for (int j = 0; j < pairs; ++j) {
    if (pf.next < pf.end) {
      _mm_prefetch(pf.next, _MM_HINT_T1);
      pf.next += 64;
    }
    prefetch_streams<NQ, NP>(panels, pstride, j);
    __m512bh b[NP];
    for (int p = 0; p < NP; ++p)
      b[p] = (__m512bh)_mm512_load_si512(panels + p * pstride + static_cast<size_t>(j) * 2 * kLanes);
    const uint32_t* qj = q + j * NQ;
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(qj[i]));
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], a, b[p]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + i * ldo + p * kLanes, acc[i][p]);
}
#else
constexpr int kBf16Format = kWidened;
// A pair word holds dimension 2j in its low half and 2j+1 in its high half:
// shifting left by 16 widens the low one, masking keeps the high one.
template <int NQ, int NP>
void dot_bf16_block(const void* qv, const uint16_t* panels, size_t pstride, int pairs,
                    float* out, size_t ldo, Prefetch& pf) {
  const float* q = static_cast<const float*>(qv);
  __m512 acc[NQ][NP];
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int j = 0; j < pairs; ++j) {
    if (pf.next < pf.end) {
      _mm_prefetch(pf.next, _MM_HINT_T1);
      pf.next += 64;
    }
    prefetch_streams<NQ, NP>(panels, pstride, j);
    __m512 lo[NP], hi[NP];
    for (int p = 0; p < NP; ++p) {
      const __m512i w =
          _mm512_load_si512(panels + p * pstride + static_cast<size_t>(j) * 2 * kLanes);
      lo[p] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      hi[p] = _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask));
    }
    const float* qj = q + static_cast<size_t>(j) * NQ * 2;
#pragma GCC unroll 12
    for (int i = 0; i < NQ; ++i) {
      const __m512 a_lo = _mm512_set1_ps(qj[2 * i]);
      const __m512 a_hi = _mm512_set1_ps(qj[2 * i + 1]);
      for (int p = 0; p < NP; ++p) {
        acc[i][p] = _mm512_fmadd_ps(a_lo, lo[p], acc[i][p]);
        acc[i][p] = _mm512_fmadd_ps(a_hi, hi[p], acc[i][p]);
      }
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(out + i * ldo + p * kLanes, acc[i][p]);
}
#endif

void dot_f32(const float* q, int nq, const float* panels, int npanels, int dim, float* out,
             size_t ldo, Prefetch& pf) {
  const size_t pstride = static_cast<size_t>(kLanes) * dim;
  with_query_count<kMaxQ>(nq, [&](auto n) {
    constexpr int NQ = decltype(n)::value;
    // Few queries: more panels per pass, so enough independent accumulators
    // (and memory streams) hide the FMA latency in the bandwidth-bound case.
    constexpr int NP = NQ <= 2 ? 8 : NQ <= 5 ? 4 : 2;
    int p = 0;
    for (; p + NP <= npanels; p += NP)
      dot_f32_block<NQ, NP>(q, panels + p * pstride, pstride, dim, out + p * kLanes, ldo, pf);
    for (; p < npanels; ++p)
      dot_f32_block<NQ, 1>(q, panels + p * pstride, pstride, dim, out + p * kLanes, ldo, pf);
  });
}

void dot_bf16(const void* q, int nq, const uint16_t* panels, int npanels, int padded_dim,
              float* out, size_t ldo, Prefetch& pf) {
  const size_t pstride = static_cast<size_t>(kLanes) * padded_dim;
  with_query_count<kMaxQ>(nq, [&](auto n) {
    constexpr int NQ = decltype(n)::value;
    // Few queries: more panels per pass, so enough independent accumulators
    // (and memory streams) hide the FMA latency in the bandwidth-bound case.
    constexpr int NP = NQ == 1 ? 8 : NQ <= 5 ? 4 : 2;  // widening needs 2 regs a panel
    int p = 0;
    for (; p + NP <= npanels; p += NP)
      dot_bf16_block<NQ, NP>(q, panels + p * pstride, pstride, padded_dim / 2, out + p * kLanes, ldo, pf);
    for (; p < npanels; ++p)
      dot_bf16_block<NQ, 1>(q, panels + p * pstride, pstride, padded_dim / 2, out + p * kLanes, ldo, pf);
  });
}

double read_sum(const float* data, int64_t n) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128)
    for (int u = 0; u < 8; ++u) acc[u] = _mm512_add_ps(acc[u], _mm512_loadu_ps(data + i + 16 * u));
  double s = 0.0;
  for (; i < n; ++i) s += data[i];
  for (auto& a : acc) s += _mm512_reduce_add_ps(a);
  return s;
}

#if defined(PS_AVX512_BF16)
#define PS_LEVEL_NAME "avx512_bf16"
#else
#define PS_LEVEL_NAME "avx512"
#endif
const MicroKernels kTable = {PS_LEVEL_NAME, kMaxQ, kBf16Format, dot_f32, dot_bf16, read_sum};

}  // namespace

#if defined(PS_AVX512_BF16)
const MicroKernels* avx512_bf16_kernels() { return &kTable; }

// Register-resident throughput loops: 24 independent accumulators, so they
// measure issue rate, not latency.  ~2 ms each.
constexpr long kCalibrationIters = 100000;

template <typename T>
double elapsed_ns(T t0) {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
}

double fma_macs_per_ns() {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-7f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < kCalibrationIters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
  }
  const double ns = elapsed_ns(t0);
  float sink = 0.0f;
  for (auto& v : acc) sink += _mm512_reduce_add_ps(v);
  __asm__ volatile("" : : "x"(sink));
  return kCalibrationIters * 24.0 * 16 / ns;
}

double dpbf16_macs_per_ns() {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3F803F80);
  const __m512bh b = (__m512bh)_mm512_set1_epi32(0x33D633D6);
  const auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < kCalibrationIters; ++n) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  const double ns = elapsed_ns(t0);
  float sink = 0.0f;
  for (auto& v : acc) sink += _mm512_reduce_add_ps(v);
  __asm__ volatile("" : : "x"(sink));
  return kCalibrationIters * 24.0 * 32 / ns;
}
#else
const MicroKernels* avx512_kernels() { return &kTable; }
#endif

}  // namespace protoserve

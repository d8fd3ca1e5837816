// The per-ISA inner loops of the CPU scan, behind one table of pointers.
//
// A micro-kernel computes raw dot products of a block of `nq` queries (at
// most `max_queries`) with `npanels` consecutive prototype panels over the
// whole dimension, and writes them to out[q * ldo + panel * kLanes + lane].
//
// Queries arrive packed per block, as in a GEMM's A-panel, so one pointer
// walks them and every query value is a broadcast from L1:
//   float32 scan:            float    [dim][nq]
//   bf16 scan, kWidened:     float    [pairs][nq][2]  (bf16-rounded values)
//   bf16 scan, kBf16Pairs:   uint32_t [pairs][nq]     (two bf16 per word)
// The panel layout lives in prototype_store.h.  Each ISA file (portable,
// AVX2+FMA, AVX-512, AVX-512 BF16) implements the same contract.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace protoserve {

enum Bf16QueryFormat : int { kWidened = 0, kBf16Pairs = 1 };

struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
};

struct MicroKernels {
  const char* name;
  int max_queries;  // query rows per call
  int bf16_query_format;
  // `prefetch` asks for the lines [pf.next, pf.end) to be pulled into L2,
  // one per inner step, so the next tile streams in while this one
  // computes from cache (levels without it ignore the hint).
  void (*dot_f32)(const float* qpack, int nq, const float* panels, int npanels, int dim,
                  float* out, size_t ldo, struct Prefetch& prefetch);
  void (*dot_bf16)(const void* qpack, int nq, const uint16_t* panels, int npanels,
                   int padded_dim, float* out, size_t ldo, struct Prefetch& prefetch);
  // Sums n floats with this ISA's widest loads: the read-bandwidth ceiling.
  double (*read_sum)(const float* data, int64_t n);
};

// Calls fn(std::integral_constant<int, nq>) for 1 <= nq <= Max, so SIMD
// files can keep a block's accumulators in registers with a fixed count.
template <int Max, typename Fn>
inline void with_query_count(int nq, Fn&& fn) {
  if constexpr (Max == 1) {
    fn(std::integral_constant<int, 1>{});
  } else {
    if (nq >= Max) fn(std::integral_constant<int, Max>{});
    else with_query_count<Max - 1>(nq, fn);
  }
}

const MicroKernels& portable_kernels();
const MicroKernels* avx2_kernels();
const MicroKernels* avx512_kernels();
const MicroKernels* avx512_bf16_kernels();

// Multiply-accumulates per nanosecond on one core for a register-resident
// loop of FMAs (float32) and of VDPBF16PS (bf16 pairs): the compute
// ceilings of the two AVX-512 bf16 strategies.  0 when not compiled in.
double fma_macs_per_ns();
double dpbf16_macs_per_ns();

// Run-time choice: the best level this CPU supports, or the one forced by
// set_simd_level / PROTOSERVE_SIMD (never above what the CPU supports).
const MicroKernels& active_kernels();
const char* simd_level();
bool set_simd_level(const char* name);  // false if unknown or unsupported
const char* best_simd_level();

}  // namespace protoserve

// The per-ISA inner loops of the CPU scan, behind one table of pointers.
//
// A micro-kernel computes raw dot products of a block of at most `max_queries`
// queries with `npanels` (at most `max_panels`) consecutive panels over the
// whole dimension, and writes them to out[q * ldo + panel * kLanes + lane].
// One source of truth for the layout lives in prototype_store.h; each ISA
// file (portable, AVX2+FMA, AVX-512 with BF16) implements the same contract.
#pragma once

#include <cstddef>
#include <cstdint>

namespace protoserve {

struct MicroKernels {
  const char* name;
  int max_queries;  // query rows per call
  int max_panels;   // panels per call
  // float32 panels; queries float32 [nq, ldq].
  void (*dot_f32)(const float* q, size_t ldq, int nq, const float* panels,
                  int npanels, int dim, float* out, size_t ldo);
  // bfloat16 panels; queries as bf16 pairs packed in uint32 [nq, ldq],
  // ldq >= padded_dim / 2.
  void (*dot_bf16)(const uint32_t* q, size_t ldq, int nq, const uint16_t* panels,
                   int npanels, int padded_dim, float* out, size_t ldo);
};

const MicroKernels& portable_kernels();
const MicroKernels* avx2_kernels();    // nullptr when not compiled in
const MicroKernels* avx512_kernels();  // nullptr when not compiled in
const MicroKernels* avx512_bf16_kernels();

// Run-time choice: the best level this CPU supports, or the one forced by
// set_simd_level / PROTOSERVE_SIMD (never above what the CPU supports).
const MicroKernels& active_kernels();
const char* simd_level();
bool set_simd_level(const char* name);  // false if unknown or unsupported
const char* best_simd_level();

}  // namespace protoserve

// Shared per-element maths for the prototype kernels.
//
// Everything here is compiled three ways: by the portable CPU translation
// unit, by the SIMD CPU units (for their scalar tails and top-k upkeep) and by
// nvcc for the CUDA kernels.  Keeping one copy means the CPU tests check the
// arithmetic the GPU runs: bf16 rounding, the metric transform applied to a
// raw dot product, the tie-breaking order and the bounded top-k heap.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define PS_HD __host__ __device__ __forceinline__
#else
#define PS_HD inline
#endif

namespace protoserve {

// Metric codes shared by Python, C++ and CUDA.
enum Metric : int { kInnerProduct = 0, kCosine = 1, kL2 = 2 };

// ---------------------------------------------------------------- bfloat16

// float -> bfloat16 with round-to-nearest-even (inputs are finite: the Python
// layer rejects NaN and infinity before anything reaches a kernel).
PS_HD uint16_t float_to_bf16(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  const uint32_t lsb = (v.u >> 16) & 1u;
  return static_cast<uint16_t>((v.u + 0x7FFFu + lsb) >> 16);
}

PS_HD float bf16_to_float(uint16_t h) {
  union { uint32_t u; float f; } v;
  v.u = static_cast<uint32_t>(h) << 16;
  return v.f;
}

// A query value as the bf16 scan sees it: rounded to bf16, widened back.
PS_HD float round_to_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// ---------------------------------------------------------------- scores

// The score of one (query, prototype) pair from its raw dot product.
// Larger is always better: for l2 it is the negative squared distance,
// |q|^2 + |p|^2 - 2 q.p, negated.  Cosine rows and queries arrive
// normalised, so cosine and inner product share the plain dot.
PS_HD float finalize_score(int metric, float dot, float query_norm2,
                           float proto_norm2) {
  if (metric == kL2) return 2.0f * dot - proto_norm2 - query_norm2;
  return dot;
}

// The score from raw sums, for kernels that see unnormalised data (the CUDA
// path reads caller-owned tensors as they are): cosine divides by both
// norms, and a zero vector scores 0 against everything.  With unit norms
// this equals finalize_score, which the CPU scan uses on normalised rows.
PS_HD float score_from_raw(int metric, float dot, float query_norm2,
                           float proto_norm2) {
  if (metric == kCosine) {
    if (query_norm2 <= 0.0f || proto_norm2 <= 0.0f) return 0.0f;
    return dot / (sqrtf(query_norm2) * sqrtf(proto_norm2));
  }
  return finalize_score(metric, dot, query_norm2, proto_norm2);
}

// Strict "a ranks before b": higher score first, ties to the lower index.
PS_HD bool ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// ---------------------------------------------------------------- top-k heap
//
// A bounded heap whose root is the WORST kept candidate, so a new candidate
// is compared with the root once and usually rejected.  `n` is the number of
// kept entries, `cap` the capacity (k).

PS_HD void heap_sift_down(float* s, int64_t* id, int n, int pos) {
  for (;;) {
    int worst = pos;
    const int l = 2 * pos + 1, r = l + 1;
    if (l < n && ranks_before(s[worst], id[worst], s[l], id[l])) worst = l;
    if (r < n && ranks_before(s[worst], id[worst], s[r], id[r])) worst = r;
    if (worst == pos) return;
    const float ts = s[pos]; s[pos] = s[worst]; s[worst] = ts;
    const int64_t ti = id[pos]; id[pos] = id[worst]; id[worst] = ti;
    pos = worst;
  }
}

PS_HD void heap_sift_up(float* s, int64_t* id, int pos) {
  while (pos > 0) {
    const int parent = (pos - 1) / 2;
    // The parent must rank no better than the child (root = worst).
    if (!ranks_before(s[parent], id[parent], s[pos], id[pos])) return;
    const float ts = s[pos]; s[pos] = s[parent]; s[parent] = ts;
    const int64_t ti = id[pos]; id[pos] = id[parent]; id[parent] = ti;
    pos = parent;
  }
}

// Offers (score, index) to the heap; returns true when it was kept.
PS_HD bool heap_offer(float* s, int64_t* id, int* n, int cap, float score,
                      int64_t index) {
  if (*n < cap) {
    s[*n] = score;
    id[*n] = index;
    heap_sift_up(s, id, *n);
    *n += 1;
    return true;
  }
  if (cap == 0 || !ranks_before(score, index, s[0], id[0])) return false;
  s[0] = score;
  id[0] = index;
  heap_sift_down(s, id, *n, 0);
  return true;
}

// Sorts the heap in place into best-first order (heap sort: repeatedly move
// the worst entry to the end of the live range).
PS_HD void heap_sort_best_first(float* s, int64_t* id, int n) {
  for (int end = n - 1; end > 0; --end) {
    const float ts = s[0]; s[0] = s[end]; s[end] = ts;
    const int64_t ti = id[0]; id[0] = id[end]; id[end] = ti;
    heap_sift_down(s, id, end, 0);
  }
}

// The threshold a fresh score must beat to enter a full heap.
PS_HD bool heap_would_accept(const float* s, const int64_t* id, int n, int cap,
                             float score, int64_t index) {
  return n < cap || (cap > 0 && ranks_before(score, index, s[0], id[0]));
}

}  // namespace protoserve

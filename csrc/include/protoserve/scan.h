// The CPU operations over a PrototypeStore: fused similarity + top-k, and
// the full score matrix.  Both take float32 queries [nq, dim], release
// nothing themselves (the binding drops the GIL) and hold the store's shared
// lock for the duration of the scan.
#pragma once

#include <cstdint>

#include "protoserve/prototype_store.h"

namespace protoserve {

// Best-first top-k per query.  Writes [nq, k_eff] with k_eff = min(k, size).
// For a bfloat16 store the scan keeps `rerank` candidates per query
// (at least k) and re-scores them exactly in float32 before the final cut.
void topk(const PrototypeStore& store, const float* queries, int64_t nq, int k,
          int rerank, float* out_scores, int64_t* out_index);

// Every score, [nq, size].  A bfloat16 store is scored as the scan reads it
// (bf16 prototypes and bf16-rounded queries, float32 accumulation).
void all_scores(const PrototypeStore& store, const float* queries, int64_t nq,
                float* out);

// Reads `n` floats with the scan's threads and returns their sum: the
// memory-bandwidth ceiling the benchmark compares the scan against.
double read_sum(const float* data, int64_t n);

void set_num_threads(int n);
int num_threads();
// Calls below this many multiply-adds (queries x prototypes x dim) run in
// the calling thread instead of the pool.
void set_min_parallel_macs(int64_t macs);
int64_t min_parallel_macs();

}  // namespace protoserve

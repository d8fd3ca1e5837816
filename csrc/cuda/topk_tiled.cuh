// The tiled CUDA kernels for many queries: a block computes a tile of kTQ
// queries x kTC prototypes at a time as a small register-blocked matrix
// product (each prototype row is read once per query tile instead of once per
// query), then either writes the scores (scores) or offers them to per-query
// bounded heaps in shared memory (fused top-k).  The per-element maths
// (bf16 widening, score_from_raw, the tie order, the heap) is the shared
// header's, as in the per-query kernels.  Included by topk.cu only.
#pragma once

#include "topk_device.cuh"

namespace protoserve {
namespace cuda {
namespace {

// kTQ (queries) and kTC (prototypes) per tile: topk_device.cuh.
constexpr int kBK = 32;  // depth of one shared-memory slab
// Thread (ty, tx) of a 16 x 16 grid owns rows ty + 16 i (i < 4) and columns
// tx + 16 j (j < 8) of the tile: 32 accumulators.
constexpr int kRowsPerThread = kTQ / 16;
constexpr int kColsPerThread = kTC / 16;

static_assert(kThreads == 256, "the tile layout assumes 256 threads");

// Shared memory of the tile product: the two slabs (padded against bank
// conflicts), reused as the [kTQ][kTC + 1] score tile once a tile is done,
// then the partial squared norms.
constexpr int kSlabA = kBK * (kTQ + 1);
constexpr int kSlabB = kBK * (kTC + 1);
constexpr int kScoreTile = kTQ * (kTC + 1);
constexpr int kTileFloats = (kSlabA + kSlabB > kScoreTile ? kSlabA + kSlabB : kScoreTile);
constexpr int kNormFloats = 4 * kTQ + 2 * kTC;  // 4 partial sums per query, 2 per prototype
// Bytes of the tile, the partial norms and the norms ([kTQ + kTC]).
constexpr int64_t kTileSmemBytes = int64_t(kTileFloats + kNormFloats + kTQ + kTC) * 4;

// Per-query heaps of the tiled top-k: kTQ heaps of capacity kc (indices
// first, 8-byte aligned) and their sizes.
__host__ __device__ constexpr int64_t tiled_heap_bytes(int64_t kc) {
  return (kTQ * kc * int64_t(sizeof(int64_t) + sizeof(float)) + kTQ * 4 + 15) / 16 * 16;
}

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(uint16_t x) { return bf16_to_float(x); }

// Raw sums of one tile: acc[i][j] = q(row i) . p(col j) over the full depth,
// and the squared norms of the tile's queries and prototypes, left in
// `norms` (qn at [0, kTQ), pn at [kTQ, kTQ + kTC)).  Rows and columns past
// the data read as zeros.  Starts and ends with a barrier; `tile` is free
// for the caller afterwards.
template <typename PT>
__device__ void tile_product(const float* __restrict__ queries, const PT* __restrict__ protos,
                             int64_t q0, int64_t nq, int64_t c0, int64_t c1, int d,
                             float* tile, float* norms,
                             float (&acc)[kRowsPerThread][kColsPerThread]) {
  float* as = tile;           // [kBK][kTQ + 1]
  float* bs = tile + kSlabA;  // [kBK][kTC + 1]
  const int t = threadIdx.x, ty = t >> 4, tx = t & 15;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = 0.0f;
  // Partial squared norms: thread t sums query row t % kTQ over a quarter of
  // each slab and prototype column t % kTC over half of it.
  const int qrow = t % kTQ, qpart = t / kTQ, pcol = t % kTC, ppart = t / kTC;
  float qn = 0.0f, pn = 0.0f;
  for (int k0 = 0; k0 < d; k0 += kBK) {
    __syncthreads();  // the previous slab (or score tile) is no longer read
    for (int e = t; e < kTQ * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t q = q0 + r;
      const int col = k0 + kk;
      as[kk * (kTQ + 1) + r] = (q < nq && col < d) ? __ldg(queries + q * d + col) : 0.0f;
    }
    for (int e = t; e < kTC * kBK; e += kThreads) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t c = c0 + r;
      const int col = k0 + kk;
      bs[kk * (kTC + 1) + r] = (c < c1 && col < d) ? widen(protos[c * d + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = qpart * (kBK / 4); kk < (qpart + 1) * (kBK / 4); ++kk) {
      const float v = as[kk * (kTQ + 1) + qrow];
      qn = fmaf(v, v, qn);
    }
#pragma unroll
    for (int kk = ppart * (kBK / 2); kk < (ppart + 1) * (kBK / 2); ++kk) {
      const float v = bs[kk * (kTC + 1) + pcol];
      pn = fmaf(v, v, pn);
    }
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      float a[kRowsPerThread], b[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = as[kk * (kTQ + 1) + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) b[j] = bs[kk * (kTC + 1) + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  float* qparts = tile + kTileFloats;  // [4][kTQ]
  float* pparts = qparts + 4 * kTQ;    // [2][kTC]
  qparts[qpart * kTQ + qrow] = qn;
  pparts[ppart * kTC + pcol] = pn;
  __syncthreads();
  if (t < kTQ) {
    norms[t] = ((qparts[t] + qparts[kTQ + t]) + qparts[2 * kTQ + t]) + qparts[3 * kTQ + t];
  } else if (t < kTQ + kTC) {
    const int c = t - kTQ;
    norms[t] = pparts[c] + pparts[kTC + c];
  }
  __syncthreads();
}

// Marks non-finite squared norms (a NaN or infinity in the row, or an
// overflow) in flags[0] (queries) / flags[1] (prototypes).  The host then
// looks for the exact bad row.
__device__ __forceinline__ void flag_norms(const float* norms, int64_t q0, int64_t nq,
                                           int64_t c0, int64_t c1, int* flags) {
  const int t = threadIdx.x;
  if (t < kTQ) {
    if (q0 + t < nq && !isfinite(norms[t])) flags[0] = 1;
  } else if (t < kTQ + kTC) {
    if (c0 + (t - kTQ) < c1 && !isfinite(norms[t])) flags[1] = 1;
  }
}

// scores: block (prototype tile blockIdx.x, query tiles blockIdx.y,
// blockIdx.y + gridDim.y, ...).
template <typename PT>
__global__ void __launch_bounds__(kThreads)
    scores_tiled_kernel(const float* __restrict__ queries, const PT* __restrict__ protos,
                        int64_t nq, int64_t nc, int d, int metric, float* __restrict__ out,
                        int* flags) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* tile = reinterpret_cast<float*>(smem);
  float* norms = tile + kTileFloats + kNormFloats;  // [kTQ + kTC]
  const int64_t c0 = int64_t(blockIdx.x) * kTC;
  const int64_t c1 = (nc - c0 < kTC) ? nc : c0 + kTC;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  for (int64_t q0 = int64_t(blockIdx.y) * kTQ; q0 < nq; q0 += int64_t(gridDim.y) * kTQ) {
    float acc[kRowsPerThread][kColsPerThread];
    tile_product<PT>(queries, protos, q0, nq, c0, c1, d, tile, norms, acc);
    flag_norms(norms, q0, nq, c0, c1, flags);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + 16 * i;
      if (q0 + r >= nq) continue;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int c = tx + 16 * j;
        if (c0 + c < c1)
          out[(q0 + r) * nc + c0 + c] =
              score_from_raw(metric, acc[i][j], norms[r], norms[kTQ + c]);
      }
    }
  }
}

// Fused top-k: block (query tile blockIdx.x, chunk blockIdx.y) runs over the
// chunk's prototype tiles, offering each score to its query's heap, and
// writes one best-first list of kc candidates per query (padded with
// (-inf, -1)) at out + (query * gridDim.y + chunk) * kc.
template <typename PT>
__global__ void __launch_bounds__(kThreads)
    topk_tiled_kernel(const float* __restrict__ queries, const PT* __restrict__ protos,
                      int64_t nq, int64_t nc, int d, int metric, int kc, int64_t chunk_len,
                      float* __restrict__ out_s, int64_t* __restrict__ out_i, int* flags) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* heap_i = reinterpret_cast<int64_t*>(smem);  // [kTQ][kc]
  float* heap_s = reinterpret_cast<float*>(heap_i + kTQ * kc);
  int* counts = reinterpret_cast<int*>(heap_s + kTQ * kc);
  float* tile = reinterpret_cast<float*>(smem + tiled_heap_bytes(kc));
  float* norms = tile + kTileFloats + kNormFloats;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
  const int64_t q0 = int64_t(blockIdx.x) * kTQ;
  const int64_t chunk_start = int64_t(blockIdx.y) * chunk_len;
  const int64_t chunk_end = (nc - chunk_start < chunk_len) ? nc : chunk_start + chunk_len;
  if (threadIdx.x < kTQ) counts[threadIdx.x] = 0;  // ordered by tile_product's barrier

  for (int64_t c0 = chunk_start; c0 < chunk_end; c0 += kTC) {
    const int64_t c1 = (chunk_end - c0 < kTC) ? chunk_end : c0 + kTC;
    float acc[kRowsPerThread][kColsPerThread];
    tile_product<PT>(queries, protos, q0, nq, c0, c1, d, tile, norms, acc);
    flag_norms(norms, q0, nq, c0, c1, flags);
    float* st = tile;  // [kTQ][kTC + 1] scores
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + 16 * i;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int c = tx + 16 * j;
        st[r * (kTC + 1) + c] =
            sanitize(score_from_raw(metric, acc[i][j], norms[r], norms[kTQ + c]));
      }
    }
    __syncthreads();
    // Warp w offers the scores of rows w, w + 8, ...: the lanes test 32
    // columns against the heap's threshold at once; lane 0 offers the
    // candidates (heap_offer re-checks, so a stale threshold is harmless).
    const int width = static_cast<int>(c1 - c0);
    for (int r = warp; r < kTQ; r += kWarps) {
      if (q0 + r >= nq) break;
      float* hs = heap_s + r * kc;
      int64_t* hi = heap_i + r * kc;
      int n = counts[r];
      for (int j0 = 0; j0 < width; j0 += 32) {
        const int c = j0 + lane;
        const float s = c < width ? st[r * (kTC + 1) + c] : -INFINITY;
        const bool cand = c < width && heap_would_accept(hs, hi, n, kc, s, c0 + c);
        unsigned mask = __ballot_sync(kFullMask, cand);
        if (lane == 0) {
          while (mask) {
            const int l = __ffs(mask) - 1;
            mask &= mask - 1;
            heap_offer(hs, hi, &n, kc, st[r * (kTC + 1) + j0 + l], c0 + j0 + l);
          }
        }
        n = __shfl_sync(kFullMask, n, 0);
        __syncwarp();
      }
      if (lane == 0) counts[r] = n;
    }
  }
  // Each warp sorts and writes its own rows.
  __syncwarp();
  for (int r = warp; r < kTQ; r += kWarps) {
    if (q0 + r >= nq) break;
    float* hs = heap_s + r * kc;
    int64_t* hi = heap_i + r * kc;
    const int n = counts[r];
    if (lane == 0) heap_sort_best_first(hs, hi, n);
    __syncwarp();
    const int64_t base = ((q0 + r) * gridDim.y + blockIdx.y) * kc;
    for (int e = lane; e < kc; e += 32) {
      out_s[base + e] = e < n ? hs[e] : -INFINITY;
      out_i[base + e] = e < n ? hi[e] : -1;
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace protoserve

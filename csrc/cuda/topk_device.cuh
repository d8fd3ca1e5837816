// Layout constants and device helpers of the CUDA prototype kernels: the
// warp dot product, query staging, and the rank merge of sorted candidate
// lists.  Included by topk.cu only (its kernels and host launch code).
#pragma once

#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <cstdlib>
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "protoserve/kernels.h"
#include "topk.cuh"


namespace protoserve {
namespace cuda {
namespace {


constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Stage 1 splits C into chunks until there are about this many blocks...
constexpr int64_t kTargetBlocks = 1024;
// ...but keeps at least this many prototypes (and 4 k') per chunk.
constexpr int64_t kMinChunk = 64;
// Rows a warp of the per-query kernels reads at once.
constexpr int kRowsInFlight = 4;
// The tiled kernels (topk_tiled.cuh) take kTQ queries x kTC prototypes per
// tile; they run from kTiledMinQ queries, top-k for k' up to kTiledMaxK,
// splitting C into chunks of whole tiles until about kTiledTargetBlocks blocks.
constexpr int kTQ = 64;
constexpr int kTC = 128;
constexpr int64_t kTiledMinQ = 16;
// ...and only when the tiles (query tiles x prototype tiles) are at least this
// many; fewer tiles leave most of the GPU idle, and the per-query kernel
// spreads the same work over more blocks.  Measured on an H200 (D = 512,
// docs/kernels/cuda-h200-crossover.json): per-query 1.5-2x faster at 8 and 32
// tiles, a tie at 79, tiled 1.6-4.7x faster from 316.
constexpr int64_t kTiledMinTiles = 64;
constexpr int64_t kTiledMaxK = 64;
constexpr int64_t kTiledTargetBlocks = 528;
// The first bytes of every workspace: two int flags (non-finite queries,
// non-finite prototypes), padded so what follows stays 256-byte aligned.
constexpr int64_t kFlagBytes = 256;
// Prototypes per block in the scores kernel (at least).
constexpr int64_t kScoresChunk = 256;
constexpr int64_t kMaxGridY = 65535;
// The query row is staged in shared memory while the block's dynamic shared
// memory stays within this (and the device's opt-in limit); beyond it the
// warps read the row from global memory (L1/L2 cached).
constexpr int64_t kStageLimitBytes = 64 * 1024;
// Dynamic shared memory a kernel may use without opting in.
constexpr int64_t kDefaultSmemBytes = 48 * 1024;

// ---------------------------------------------------------------- errors

[[noreturn]] void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

#define PS_CUDA_CHECK(expr)                          \
  do {                                               \
    const cudaError_t ps_err_ = (expr);              \
    if (ps_err_ != cudaSuccess) throw_cuda(ps_err_, #expr); \
  } while (0)

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(err, kernel);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sets `device` as current for the scope and restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PS_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) PS_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// Device memory freed at scope exit (after the stream was synchronised).
class DeviceBuffer {
 public:
  explicit DeviceBuffer(int64_t bytes) {
    if (bytes > 0) PS_CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

// ---------------------------------------------------------------- kernel choice

// PROTOSERVE_CUDA_TILED=always|never overrides the choice between the tiled
// and the per-query kernels (for benchmarks and tests; unset or auto: the
// rule below).  Read on every call.
enum class TiledMode { kAuto, kAlways, kNever };

inline TiledMode tiled_mode() {
  const char* v = std::getenv("PROTOSERVE_CUDA_TILED");
  if (v == nullptr) return TiledMode::kAuto;
  const std::string s(v);
  if (s == "always") return TiledMode::kAlways;
  if (s == "never") return TiledMode::kNever;
  return TiledMode::kAuto;
}

// Whether nq queries against nc prototypes (k' = kc, or 0 for `scores`)
// take the tiled kernels.
inline bool use_tiled(int64_t nq, int64_t nc, int64_t kc) {
  if (kc > kTiledMaxK) return false;  // the tiled top-k keeps kTQ heaps of kc in shared memory
  switch (tiled_mode()) {
    case TiledMode::kAlways: return nq > 0;
    case TiledMode::kNever: return false;
    case TiledMode::kAuto: break;
  }
  return nq >= kTiledMinQ && ceil_div(nq, kTQ) * ceil_div(nc, kTC) >= kTiledMinTiles;
}

// ---------------------------------------------------------------- layout

// Shared bytes of kWarps heaps of capacity kc: int64 indices first (8-byte
// aligned), then float scores; rounded up to 16 so a staged query row that
// follows is float4-aligned.
__host__ __device__ constexpr int64_t heap_bytes(int64_t kc) {
  return (kWarps * kc * (int64_t(sizeof(int64_t)) + int64_t(sizeof(float))) + 15) / 16 * 16;
}

struct TopkPlan {
  int64_t kc;         // columns returned: min(k, nc)
  bool tiled;         // the tiled kernel (many queries, small k')
  int64_t chunks;     // stage-1 chunks per query
  int64_t chunk_len;  // prototypes per chunk (the last may be shorter)
  // Workspace: the flags at 0, then the stage-1 candidates when chunks > 1.
  int64_t ws_scores_offset, ws_index_offset, ws_bytes;
};

TopkPlan plan_topk(int64_t nq, int64_t nc, int64_t k) {
  TopkPlan p{};
  p.kc = std::min(k, nc);
  if (nq <= 0 || p.kc <= 0) return p;
  p.tiled = use_tiled(nq, nc, p.kc);
  int64_t chunks;
  if (p.tiled) {
    const int64_t tiles = ceil_div(nc, kTC);
    chunks = std::min({ceil_div(kTiledTargetBlocks, ceil_div(nq, kTQ)), tiles, kMaxGridY});
    chunks = std::max<int64_t>(chunks, 1);
    p.chunk_len = ceil_div(tiles, chunks) * kTC;
  } else {
    const int64_t want = ceil_div(kTargetBlocks, nq);
    const int64_t min_len = std::max(kMinChunk, 4 * p.kc);
    chunks = std::min({want, ceil_div(nc, min_len), kMaxGridY});
    chunks = std::max<int64_t>(chunks, 1);
    p.chunk_len = ceil_div(nc, chunks);
  }
  p.chunks = ceil_div(nc, p.chunk_len);  // no empty chunk
  p.ws_bytes = kFlagBytes;
  if (p.chunks > 1) {
    const int64_t n = nq * p.chunks * p.kc;
    p.ws_scores_offset = kFlagBytes;
    p.ws_index_offset = kFlagBytes + (n * int64_t(sizeof(float)) + 255) / 256 * 256;
    p.ws_bytes = p.ws_index_offset + n * int64_t(sizeof(int64_t));
  }
  return p;
}

// ---------------------------------------------------------------- device helpers

__device__ __forceinline__ float load_proto(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_proto(const uint16_t* p) {
  return bf16_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

__device__ __forceinline__ void accumulate(float x, float p, float& dot, float& pn) {
  dot = fmaf(x, p, dot);
  pn = fmaf(p, p, pn);
}

// q.p and |p|^2 of R rows at once, by a whole warp (R independent sums keep
// more loads in flight).  Lane j reads elements j, j+32... (VEC == 4:
// float4 / four-bf16 groups), so loads are coalesced.  The results are valid
// in lane 0 (other lanes hold differently ordered sums).
template <typename PT, int VEC, int R>
__device__ __forceinline__ void warp_dot(const float* q, const PT* const (&rows)[R], int d,
                                         int lane, float (&dot)[R], float (&pn)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) dot[r] = pn[r] = 0.0f;
  if constexpr (VEC == 4) {
    const int nv = d >> 2;
    const float4* q4 = reinterpret_cast<const float4*>(q);
#pragma unroll 2
    for (int j = lane; j < nv; j += 32) {
      const float4 a = q4[j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (std::is_same<PT, float>::value) {
          const float4 b = __ldg(reinterpret_cast<const float4*>(rows[r]) + j);
          accumulate(a.x, b.x, dot[r], pn[r]);
          accumulate(a.y, b.y, dot[r], pn[r]);
          accumulate(a.z, b.z, dot[r], pn[r]);
          accumulate(a.w, b.w, dot[r], pn[r]);
        } else {
          // four bf16, element 0 in the low half of .x
          const uint2 b = __ldg(reinterpret_cast<const uint2*>(rows[r]) + j);
          accumulate(a.x, bf16_to_float(static_cast<uint16_t>(b.x & 0xFFFFu)), dot[r], pn[r]);
          accumulate(a.y, bf16_to_float(static_cast<uint16_t>(b.x >> 16)), dot[r], pn[r]);
          accumulate(a.z, bf16_to_float(static_cast<uint16_t>(b.y & 0xFFFFu)), dot[r], pn[r]);
          accumulate(a.w, bf16_to_float(static_cast<uint16_t>(b.y >> 16)), dot[r], pn[r]);
        }
      }
    }
  } else {
#pragma unroll 2
    for (int j = lane; j < d; j += 32) {
      const float a = q[j];
#pragma unroll
      for (int r = 0; r < R; ++r) accumulate(a, load_proto(rows[r] + j), dot[r], pn[r]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      dot[r] += __shfl_xor_sync(kFullMask, dot[r], off);
      pn[r] += __shfl_xor_sync(kFullMask, pn[r], off);
    }
  }
}

// Block-wide: copies the query row into `qs` (when non-null) and returns
// |q|^2, the same value in every thread (and in every block of this query).
// Ends with a barrier, so `qs` is ready for all warps.
__device__ float stage_query(const float* __restrict__ q, int d, float* qs, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float s = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = q[j];
    if (qs != nullptr) qs[j] = v;
    s = fmaf(v, v, s);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

__device__ __forceinline__ float sanitize(float s) { return isnan(s) ? -INFINITY : s; }

// Merges the kWarps best-first lists in shared memory (list w: hs/hi + w*kc,
// counts[w] entries) into out[0, kc): an entry's output position is its rank
// in the union - its position in its own list plus, per other list, how many
// entries rank before it (binary search).  Ranks are distinct because the
// order is total and indices are distinct.  Positions past the union's size
// get the padding (-inf, -1).  Starts with a barrier.
__device__ void merge_lists(const float* hs, const int64_t* hi, const int* counts, int kc,
                            float* __restrict__ out_s, int64_t* __restrict__ out_i) {
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += counts[w];
  const int outn = total < kc ? total : kc;
  for (int e = threadIdx.x; e < kWarps * kc; e += blockDim.x) {
    const int w = e / kc, t = e - w * kc;
    if (t >= counts[w]) continue;
    const float s = hs[e];
    const int64_t id = hi[e];
    int rank = t;
    for (int v = 0; v < kWarps && rank < kc; ++v) {
      if (v == w) continue;
      const float* vs = hs + v * kc;
      const int64_t* vi = hi + v * kc;
      int lo = 0, up = counts[v];
      while (lo < up) {
        const int mid = (lo + up) >> 1;
        if (ranks_before(vs[mid], vi[mid], s, id)) {
          lo = mid + 1;
        } else {
          up = mid;
        }
      }
      rank += lo;
    }
    if (rank < kc) {
      out_s[rank] = s;
      out_i[rank] = id;
    }
  }
  for (int e = outn + threadIdx.x; e < kc; e += blockDim.x) {
    out_s[e] = -INFINITY;
    out_i[e] = -1;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace protoserve

// CUDA prototype kernels: fused similarity + top-k, and all scores.
//
// The per-element maths (bf16 widening, score_from_raw, the tie order and
// the bounded heap) comes from protoserve/kernels.h, the same code the CPU
// scan runs and its tests check.
//
// topk, two passes, never materialising [Q, C]:
//   1. grid (Q, chunks): one block of kWarps warps per (query, chunk of
//      prototypes).  The query row is staged in shared memory and its squared
//      norm reduced once.  Each warp takes one prototype at a time: the lanes
//      read the row with coalesced (vector where aligned) loads, accumulate
//      q.p and |p|^2, reduce with shuffles, and lane 0 offers the score to the
//      warp's bounded heap in shared memory.  The block then sorts its warps'
//      heaps and merges them by rank into a best-first list of k' candidates,
//      written to a scratch buffer - or straight to the output when C is a
//      single chunk.
//   2. grid (Q): one block per query merges the chunk lists (each sorted, so a
//      list is abandoned at its first rejected entry) and writes the final
//      best-first k' columns.
// Scores are totally ordered by (score desc, index asc) - NaN is mapped to
// -inf before it reaches a heap - so the rank merges are exact.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "topk.cuh"
#include "topk_device.cuh"
#include "topk_tiled.cuh"

namespace protoserve {
namespace cuda {
namespace {

// ---------------------------------------------------------------- kernels

// Marks a non-finite squared norm (a NaN or infinity in the row, or an
// overflow): flag[0] for queries, flag[1] for prototypes.  The host then
// looks for the exact bad row.
__device__ __forceinline__ void flag_if_bad(float norm2, int* flag) {
  if (!isfinite(norm2)) *flag = 1;
}

// The block's warps take rows [c0, c1) kRowsInFlight at a time; lane 0 gets
// emit(row, q.p, |p|^2) for each row (in order within a warp) after its
// squared norm was checked.
template <typename PT, int VEC, typename Emit>
__device__ __forceinline__ void scan_rows(const float* q, const PT* __restrict__ protos,
                                          int64_t c0, int64_t c1, int d, int* flags,
                                          Emit&& emit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int R = kRowsInFlight;
  for (int64_t c = c0 + warp * R; c < c1; c += kWarps * R) {
    const PT* rows[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rows[r] = protos + (c + r < c1 ? c + r : c) * d;
    float dot[R], pn[R];
    warp_dot<PT, VEC, R>(q, rows, d, lane, dot, pn);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (c + r >= c1) break;
        flag_if_bad(pn[r], flags + 1);
        emit(c + r, dot[r], pn[r]);
      }
    }
  }
}

// Stage 1: block (query blockIdx.x, chunk blockIdx.y) -> best-first list of
// kc candidates at out + (query * gridDim.y + chunk) * kc.
template <typename PT, int VEC>
__global__ void __launch_bounds__(kThreads)
    topk_chunk_kernel(const float* __restrict__ queries, const PT* __restrict__ protos,
                      int64_t nc, int d, int metric, int kc, int64_t chunk_len, int stage,
                      float* __restrict__ out_s, int64_t* __restrict__ out_i, int* flags) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[kWarps];
  __shared__ int counts[kWarps];
  int64_t* heap_i = reinterpret_cast<int64_t*>(smem);
  float* heap_s = reinterpret_cast<float*>(heap_i + kWarps * kc);
  float* qs = stage ? reinterpret_cast<float*>(smem + heap_bytes(kc)) : nullptr;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t qi = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const float* qrow = queries + qi * d;
  const float qn = stage_query(qrow, d, qs, red);
  if (threadIdx.x == 0 && chunk == 0) flag_if_bad(qn, flags);
  const float* qsrc = stage ? qs : qrow;

  const int64_t c0 = chunk * chunk_len;
  const int64_t c1 = (nc - c0 < chunk_len) ? nc : c0 + chunk_len;
  float* hs = heap_s + warp * kc;
  int64_t* hi = heap_i + warp * kc;
  int n = 0;  // lane 0's heap size
  scan_rows<PT, VEC>(qsrc, protos, c0, c1, d, flags, [&](int64_t c, float dot, float pn) {
    heap_offer(hs, hi, &n, kc, sanitize(score_from_raw(metric, dot, qn, pn)), c);
  });
  if (lane == 0) {
    heap_sort_best_first(hs, hi, n);
    counts[warp] = n;
  }
  const int64_t base = (qi * gridDim.y + chunk) * kc;
  merge_lists(heap_s, heap_i, counts, kc, out_s + base, out_i + base);
}

// Stage 2: block blockIdx.x merges its query's `nchunks` lists of kc entries
// (best first, padded with index -1) into the final kc columns.
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(const float* __restrict__ cand_s, const int64_t* __restrict__ cand_i,
                      int nchunks, int kc, float* __restrict__ out_s,
                      int64_t* __restrict__ out_i) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int counts[kWarps];
  int64_t* heap_i = reinterpret_cast<int64_t*>(smem);
  float* heap_s = reinterpret_cast<float*>(heap_i + kWarps * kc);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t qi = blockIdx.x;
  float* hs = heap_s + warp * kc;
  int64_t* hi = heap_i + warp * kc;
  int n = 0;  // lane 0's heap size
  for (int j = warp; j < nchunks; j += kWarps) {
    const int64_t list = (qi * nchunks + j) * kc;
    bool stop = false;
    for (int t0 = 0; t0 < kc && !stop; t0 += 32) {
      // The warp loads 32 entries at once; lane 0 offers them in order and
      // stops the list at its end (-1) or at the first rejection (the list
      // is sorted, so nothing after it can enter either).
      const int t = t0 + lane;
      float s = -INFINITY;
      long long id = -1;
      if (t < kc) {
        s = cand_s[list + t];
        id = cand_i[list + t];
      }
      const int m = (kc - t0 < 32) ? kc - t0 : 32;
      for (int l = 0; l < m; ++l) {
        const float sl = __shfl_sync(kFullMask, s, l);
        const long long il = __shfl_sync(kFullMask, id, l);
        int keep = 0;
        if (lane == 0 && il >= 0) keep = heap_offer(hs, hi, &n, kc, sl, il) ? 1 : 0;
        if (!__shfl_sync(kFullMask, keep, 0)) {
          stop = true;
          break;
        }
      }
    }
  }
  if (lane == 0) {
    heap_sort_best_first(hs, hi, n);
    counts[warp] = n;
  }
  merge_lists(heap_s, heap_i, counts, kc, out_s + qi * kc, out_i + qi * kc);
}

// out[query, c] for c in the block's chunk.
template <typename PT, int VEC>
__global__ void __launch_bounds__(kThreads)
    scores_kernel(const float* __restrict__ queries, const PT* __restrict__ protos, int64_t nc,
                  int d, int metric, int64_t chunk_len, int stage, float* __restrict__ out,
                  int* flags) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[kWarps];
  float* qs = stage ? reinterpret_cast<float*>(smem) : nullptr;

  const int64_t qi = blockIdx.x;
  const float* qrow = queries + qi * d;
  const float qn = stage_query(qrow, d, qs, red);
  if (threadIdx.x == 0 && blockIdx.y == 0) flag_if_bad(qn, flags);
  const float* qsrc = stage ? qs : qrow;

  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t c1 = (nc - c0 < chunk_len) ? nc : c0 + chunk_len;
  float* orow = out + qi * nc;
  scan_rows<PT, VEC>(qsrc, protos, c0, c1, d, flags, [&](int64_t c, float dot, float pn) {
    orow[c] = score_from_raw(metric, dot, qn, pn);
  });
}

// ---------------------------------------------------------------- host side

void check_sizes(int64_t nq, int64_t nc, int64_t d, int metric) {
  if (nq < 0 || nc < 0 || d < 0) throw std::invalid_argument("negative size");
  if (d > INT_MAX) throw std::invalid_argument("dimension too large for the CUDA kernels");
  if (nq > INT_MAX) throw std::invalid_argument("too many queries for one CUDA call (max 2^31-1)");
  if (metric < kInnerProduct || metric > kL2)
    throw std::invalid_argument("metric code must be 0 (ip), 1 (cosine) or 2 (l2), got " +
                                std::to_string(metric));
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// float4 / four-bf16 loads need d % 4 == 0 and aligned bases.
template <typename PT>
bool can_vectorize(const float* q, const void* p, int64_t d) {
  return d % 4 == 0 && aligned(q, 16) && aligned(p, 4 * sizeof(PT));
}

int max_dynamic_smem() {
  int dev = 0, optin = 0;
  PS_CUDA_CHECK(cudaGetDevice(&dev));
  PS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // Leave room for the kernels' static shared memory (under 100 bytes).
  return std::max(optin - 1024, 0);
}

template <typename Kernel>
void allow_smem(Kernel* kernel, int64_t bytes) {
  if (bytes > kDefaultSmemBytes)
    PS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

template <typename PT, int VEC>
void launch_chunk(const float* q, const PT* p, int64_t nq, int64_t nc, int d, int metric,
                  const TopkPlan& plan, bool stage, int64_t smem, float* out_s,
                  int64_t* out_i, int* flags, cudaStream_t st) {
  auto* kernel = &topk_chunk_kernel<PT, VEC>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(nq), static_cast<unsigned>(plan.chunks));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), st>>>(
      q, p, nc, d, metric, static_cast<int>(plan.kc), plan.chunk_len, stage ? 1 : 0, out_s,
      out_i, flags);
  check_launch("topk_chunk_kernel launch");
}

template <typename PT>
void launch_tiled(const float* q, const PT* p, int64_t nq, int64_t nc, int d, int metric,
                  const TopkPlan& plan, float* out_s, int64_t* out_i, int* flags,
                  cudaStream_t st) {
  auto* kernel = &topk_tiled_kernel<PT>;
  const int64_t smem = tiled_heap_bytes(plan.kc) + kTileSmemBytes;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(nq, kTQ)), static_cast<unsigned>(plan.chunks));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), st>>>(
      q, p, nq, nc, d, metric, static_cast<int>(plan.kc), plan.chunk_len, out_s, out_i, flags);
  check_launch("topk_tiled_kernel launch");
}

template <typename PT>
void run_topk(const float* q, const void* pv, int64_t nq, int64_t nc, int64_t d, int metric,
              const TopkPlan& plan, float* out_s, int64_t* out_i, float* cand_s,
              int64_t* cand_i, int* flags, cudaStream_t st) {
  const PT* p = static_cast<const PT*>(pv);
  float* s1 = plan.chunks > 1 ? cand_s : out_s;
  int64_t* i1 = plan.chunks > 1 ? cand_i : out_i;
  const int di = static_cast<int>(d);
  const int64_t hb = heap_bytes(plan.kc);
  if (plan.tiled) {
    launch_tiled<PT>(q, p, nq, nc, di, metric, plan, s1, i1, flags, st);
  } else {
    const int64_t limit = std::min<int64_t>(kStageLimitBytes, max_dynamic_smem());
    const bool stage = hb + 4 * d <= limit;
    const int64_t smem = stage ? hb + 4 * d : hb;
    if (can_vectorize<PT>(q, p, d)) {
      launch_chunk<PT, 4>(q, p, nq, nc, di, metric, plan, stage, smem, s1, i1, flags, st);
    } else {
      launch_chunk<PT, 1>(q, p, nq, nc, di, metric, plan, stage, smem, s1, i1, flags, st);
    }
  }
  if (plan.chunks > 1) {
    allow_smem(&topk_merge_kernel, hb);
    topk_merge_kernel<<<static_cast<unsigned>(nq), kThreads, static_cast<size_t>(hb),
                        st>>>(cand_s, cand_i, static_cast<int>(plan.chunks),
                                            static_cast<int>(plan.kc), out_s, out_i);
    check_launch("topk_merge_kernel launch");
  }
}

template <typename PT, int VEC>
void launch_scores(const float* q, const PT* p, int64_t nq, int64_t nc, int d, int metric,
                   int64_t chunks, int64_t chunk_len, bool stage, int64_t smem, float* out,
                   int* flags, cudaStream_t st) {
  auto* kernel = &scores_kernel<PT, VEC>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>(nq), static_cast<unsigned>(chunks));
  kernel<<<grid, kThreads, static_cast<size_t>(smem), st>>>(
      q, p, nc, d, metric, chunk_len, stage ? 1 : 0, out, flags);
  check_launch("scores_kernel launch");
}

template <typename PT>
void run_scores(const float* q, const void* pv, int64_t nq, int64_t nc, int64_t d, int metric,
                float* out, int* flags, cudaStream_t st) {
  const PT* p = static_cast<const PT*>(pv);
  if (use_tiled(nq, nc, 0)) {
    auto* kernel = &scores_tiled_kernel<PT>;
    allow_smem(kernel, kTileSmemBytes);
    const dim3 grid(static_cast<unsigned>(ceil_div(nc, kTC)),
                    static_cast<unsigned>(std::min(ceil_div(nq, kTQ), kMaxGridY)));
    kernel<<<grid, kThreads, static_cast<size_t>(kTileSmemBytes), st>>>(
        q, p, nq, nc, static_cast<int>(d), metric, out, flags);
    check_launch("scores_tiled_kernel launch");
    return;
  }
  const int64_t chunk_len = std::max(kScoresChunk, ceil_div(nc, kMaxGridY));
  const int64_t chunks = ceil_div(nc, chunk_len);
  const int64_t limit = std::min<int64_t>(kStageLimitBytes, max_dynamic_smem());
  const bool stage = 4 * d <= limit;
  const int64_t smem = stage ? 4 * d : 0;
  if (can_vectorize<PT>(q, p, d)) {
    launch_scores<PT, 4>(q, p, nq, nc, static_cast<int>(d), metric, chunks, chunk_len, stage,
                         smem, out, flags, st);
  } else {
    launch_scores<PT, 1>(q, p, nq, nc, static_cast<int>(d), metric, chunks, chunk_len, stage,
                         smem, out, flags, st);
  }
}

// The workspace the caller gave, when usable, else one of our own (freed
// at scope exit, after the stream was synchronised).
class Workspace {
 public:
  Workspace(void* given, int64_t given_bytes, int64_t need)
      : own_(need > 0 && !(given != nullptr && given_bytes >= need && aligned(given, 256))
                 ? need
                 : 0) {
    ptr_ = own_.get() != nullptr ? own_.get() : given;
  }
  char* get() const { return static_cast<char*>(ptr_); }
  int* flags() const { return reinterpret_cast<int*>(ptr_); }

 private:
  DeviceBuffer own_;
  void* ptr_ = nullptr;
};

// Clears the flags before the kernels; after them, waits for the stream
// (the copy is synchronous) and reports what the kernels saw.
void clear_flags(int* flags, cudaStream_t st) {
  PS_CUDA_CHECK(cudaMemsetAsync(flags, 0, 2 * sizeof(int), st));
}

Health read_flags(const int* flags, cudaStream_t st) {
  int h[2] = {0, 0};
  PS_CUDA_CHECK(cudaMemcpyAsync(h, flags, sizeof(h), cudaMemcpyDeviceToHost, st));
  PS_CUDA_CHECK(cudaStreamSynchronize(st));
  return Health{h[0] != 0, h[1] != 0};
}

}  // namespace

// ---------------------------------------------------------------- public API

int device_count() noexcept {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: no driver / no device is not an error here
    return 0;
  }
  return n;
}

int64_t topk_workspace_bytes(int64_t nq, int64_t nc, int64_t k) {
  if (nq < 0 || nc < 0) throw std::invalid_argument("negative size");
  if (k <= 0) throw std::invalid_argument("k must be positive");
  return plan_topk(nq, nc, k).ws_bytes;
}

int64_t scores_workspace_bytes() { return kFlagBytes; }

Health topk(int device, const float* queries, const void* prototypes, ProtoType ptype,
            int64_t nq, int64_t nc, int64_t d, int metric, int64_t k, float* out_scores,
            int64_t* out_index, void* workspace, int64_t workspace_bytes, uintptr_t stream) {
  check_sizes(nq, nc, d, metric);
  if (k <= 0) throw std::invalid_argument("k must be positive");
  const TopkPlan plan = plan_topk(nq, nc, k);
  if (plan.kc > kMaxFusedK)
    throw std::invalid_argument("min(k, C) = " + std::to_string(plan.kc) +
                                " exceeds the fused kernel's limit of " +
                                std::to_string(kMaxFusedK));
  if (nq == 0 || plan.kc == 0) return Health{};

  DeviceGuard guard(device);
  cudaGetLastError();  // start from a clean slate
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Workspace ws(workspace, workspace_bytes, plan.ws_bytes);
  float* cand_s = nullptr;
  int64_t* cand_i = nullptr;
  if (plan.chunks > 1) {
    cand_s = reinterpret_cast<float*>(ws.get() + plan.ws_scores_offset);
    cand_i = reinterpret_cast<int64_t*>(ws.get() + plan.ws_index_offset);
  }
  clear_flags(ws.flags(), st);
  if (ptype == ProtoType::kFloat32) {
    run_topk<float>(queries, prototypes, nq, nc, d, metric, plan, out_scores, out_index, cand_s,
                    cand_i, ws.flags(), st);
  } else {
    run_topk<uint16_t>(queries, prototypes, nq, nc, d, metric, plan, out_scores, out_index,
                       cand_s, cand_i, ws.flags(), st);
  }
  return read_flags(ws.flags(), st);
}

Health scores(int device, const float* queries, const void* prototypes, ProtoType ptype,
              int64_t nq, int64_t nc, int64_t d, int metric, float* out, void* workspace,
              int64_t workspace_bytes, uintptr_t stream) {
  check_sizes(nq, nc, d, metric);
  if (nq == 0 || nc == 0) return Health{};
  DeviceGuard guard(device);
  cudaGetLastError();
  const cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const Workspace ws(workspace, workspace_bytes, kFlagBytes);
  clear_flags(ws.flags(), st);
  if (ptype == ProtoType::kFloat32) {
    run_scores<float>(queries, prototypes, nq, nc, d, metric, out, ws.flags(), st);
  } else {
    run_scores<uint16_t>(queries, prototypes, nq, nc, d, metric, out, ws.flags(), st);
  }
  return read_flags(ws.flags(), st);
}

}  // namespace cuda
}  // namespace protoserve

// Host entry points of the CUDA prototype kernels (csrc/cuda/topk.cu).
//
// Plain C++: bind_cuda.cpp includes this without the CUDA headers.  All
// pointers are device pointers on `device`; every function sets that device
// for its duration (restoring the caller's), runs on `stream` (a
// cudaStream_t of that device as an integer; 0 is the legacy default
// stream) and synchronises it before returning, so results are ready.
// CUDA failures throw std::runtime_error carrying the CUDA error string;
// bad arguments throw std::invalid_argument.
#pragma once

#include <stdint.h>

namespace protoserve {
namespace cuda {

// Largest k' = min(k, C) the fused top-k kernel supports.
constexpr int64_t kMaxFusedK = 256;

// Visible CUDA devices; 0 (never an exception) when there is no driver or
// no device.
int device_count() noexcept;

// Workspace bytes `topk` needs for these sizes (0 when there is nothing to
// compute): two flags, and the first pass's candidates when C is split.
// k' = min(k, nc).
int64_t topk_workspace_bytes(int64_t nq, int64_t nc, int64_t k);

// Workspace bytes `scores` needs (the two flags).
int64_t scores_workspace_bytes();

// What the kernels saw: a non-finite squared norm in some query / some
// prototype row - a NaN or infinity in it, or a sum of squares past float32's
// range.  The caller decides (server/_cuda.py looks for the exact row).
struct Health {
  bool queries_nonfinite = false;
  bool prototypes_nonfinite = false;
};

// Prototype element type.
enum class ProtoType { kFloat32, kBFloat16 };

// Fused similarity + top-k.  queries fp32 [nq, d], prototypes [nc, d]
// (fp32, or bf16 bit patterns as uint16), both row-major and compact.
// Writes k' = min(k, nc) columns per query, best first, ties to the lower
// index: out_scores fp32 [nq, k'], out_index int64 [nq, k'].  k' must be
// at most kMaxFusedK.  `workspace` (may be null) holds `workspace_bytes`
// bytes, 256-byte aligned; when it is null or too small the function
// allocates its own.
Health topk(int device, const float* queries, const void* prototypes, ProtoType ptype,
            int64_t nq, int64_t nc, int64_t d, int metric, int64_t k, float* out_scores,
            int64_t* out_index, void* workspace, int64_t workspace_bytes, uintptr_t stream);

// Every score: out fp32 [nq, nc] (row-major), score_from_raw per pair.
// `workspace` as for topk, scores_workspace_bytes() of it.
Health scores(int device, const float* queries, const void* prototypes, ProtoType ptype,
              int64_t nq, int64_t nc, int64_t d, int metric, float* out, void* workspace,
              int64_t workspace_bytes, uintptr_t stream);

}  // namespace cuda
}  // namespace protoserve

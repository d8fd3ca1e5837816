// Portable micro-kernels: plain C++ over the panel layout, built with the
// baseline flags (the compiler vectorises the lane loops with SSE2).  The
// bf16 path widens through the shared helpers in kernels.h, the same ones
// the CUDA kernels call.
#include "microkernels.h"
#include "protoserve/kernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 4;

void dot_f32(const float* q, size_t ldq, int nq, const float* panels, int npanels,
             int dim, float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * dim;
  for (int p = 0; p < npanels; ++p) {
    const float* panel = panels + p * pstride;
    float acc[kMaxQ][kLanes] = {};
    for (int d = 0; d < dim; ++d) {
      const float* row = panel + static_cast<size_t>(d) * kLanes;
      for (int i = 0; i < nq; ++i) {
        const float a = q[i * ldq + d];
        for (int l = 0; l < kLanes; ++l) acc[i][l] += a * row[l];
      }
    }
    for (int i = 0; i < nq; ++i)
      for (int l = 0; l < kLanes; ++l) out[i * ldo + p * kLanes + l] = acc[i][l];
  }
}

void dot_bf16(const uint32_t* q, size_t ldq, int nq, const uint16_t* panels,
              int npanels, int padded_dim, float* out, size_t ldo) {
  const size_t pstride = static_cast<size_t>(kLanes) * padded_dim;
  const int pairs = padded_dim / 2;
  for (int p = 0; p < npanels; ++p) {
    const uint16_t* panel = panels + p * pstride;
    float acc[kMaxQ][kLanes] = {};
    for (int j = 0; j < pairs; ++j) {
      const uint16_t* row = panel + static_cast<size_t>(j) * 2 * kLanes;
      for (int i = 0; i < nq; ++i) {
        const uint32_t pair = q[i * ldq + j];
        const float lo = bf16_to_float(static_cast<uint16_t>(pair & 0xFFFFu));
        const float hi = bf16_to_float(static_cast<uint16_t>(pair >> 16));
        for (int l = 0; l < kLanes; ++l)
          acc[i][l] += lo * bf16_to_float(row[2 * l]) + hi * bf16_to_float(row[2 * l + 1]);
      }
    }
    for (int i = 0; i < nq; ++i)
      for (int l = 0; l < kLanes; ++l) out[i * ldo + p * kLanes + l] = acc[i][l];
  }
}

const MicroKernels kPortable = {"portable", kMaxQ, 1, dot_f32, dot_bf16};

}  // namespace

const MicroKernels& portable_kernels() { return kPortable; }

}  // namespace protoserve

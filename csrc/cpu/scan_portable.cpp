// Portable micro-kernels: plain C++ over the panel layout, built with the
// baseline flags (the compiler vectorises the lane loops).  The bf16 path
// widens through the shared helpers in kernels.h, the ones the CUDA
// kernels call.
#include "microkernels.h"
#include "protoserve/kernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {
namespace {

constexpr int kMaxQ = 4;

void dot_f32(const float* q, int nq, const float* panels, int npanels, int dim, float* out,
             size_t ldo, Prefetch& /*prefetch*/) {
  const size_t pstride = static_cast<size_t>(kLanes) * dim;
  for (int p = 0; p < npanels; ++p) {
    const float* panel = panels + p * pstride;
    float acc[kMaxQ][kLanes] = {};
    for (int d = 0; d < dim; ++d) {
      const float* row = panel + static_cast<size_t>(d) * kLanes;
      for (int i = 0; i < nq; ++i) {
        const float a = q[d * nq + i];
        for (int l = 0; l < kLanes; ++l) acc[i][l] += a * row[l];
      }
    }
    for (int i = 0; i < nq; ++i)
      for (int l = 0; l < kLanes; ++l) out[i * ldo + p * kLanes + l] = acc[i][l];
  }
}

void dot_bf16(const void* qv, int nq, const uint16_t* panels, int npanels, int padded_dim,
              float* out, size_t ldo, Prefetch& /*prefetch*/) {
  const float* q = static_cast<const float*>(qv);  // kWidened
  const size_t pstride = static_cast<size_t>(kLanes) * padded_dim;
  const int pairs = padded_dim / 2;
  for (int p = 0; p < npanels; ++p) {
    const uint16_t* panel = panels + p * pstride;
    float acc[kMaxQ][kLanes] = {};
    for (int j = 0; j < pairs; ++j) {
      const uint16_t* row = panel + static_cast<size_t>(j) * 2 * kLanes;
      float lo[kLanes], hi[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        lo[l] = bf16_to_float(row[2 * l]);
        hi[l] = bf16_to_float(row[2 * l + 1]);
      }
      for (int i = 0; i < nq; ++i) {
        const float a = q[(j * nq + i) * 2], b = q[(j * nq + i) * 2 + 1];
        for (int l = 0; l < kLanes; ++l) acc[i][l] += a * lo[l] + b * hi[l];
      }
    }
    for (int i = 0; i < nq; ++i)
      for (int l = 0; l < kLanes; ++l) out[i * ldo + p * kLanes + l] = acc[i][l];
  }
}

double read_sum(const float* data, int64_t n) {
  float acc[64] = {};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int l = 0; l < 64; ++l) acc[l] += data[i + l];
  double s = 0.0;
  for (; i < n; ++i) s += data[i];
  for (float v : acc) s += v;
  return s;
}

const MicroKernels kPortable = {"portable", kMaxQ, kWidened, dot_f32, dot_bf16, read_sum};

}  // namespace

const MicroKernels& portable_kernels() { return kPortable; }

}  // namespace protoserve

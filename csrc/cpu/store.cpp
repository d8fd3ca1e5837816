#include <cmath>
#include <mutex>
#include <vector>

#include "protoserve/kernels.h"
#include "protoserve/prototype_store.h"

namespace protoserve {

float prepare_row(const float* in, float* out, int dim, int metric) {
  double n2 = 0.0;
  for (int d = 0; d < dim; ++d) n2 += static_cast<double>(in[d]) * in[d];
  if (metric == kCosine && n2 > 0.0) {
    const double inv = 1.0 / std::sqrt(n2);
    double m2 = 0.0;
    for (int d = 0; d < dim; ++d) {
      out[d] = static_cast<float>(in[d] * inv);
      m2 += static_cast<double>(out[d]) * out[d];
    }
    return static_cast<float>(m2);
  }
  if (out != in) std::memcpy(out, in, sizeof(float) * dim);
  return static_cast<float>(n2);
}

PrototypeStore::PrototypeStore(int dim, Dtype dtype, int metric)
    : dim_(dim), dim_padded_(dim + (dim & 1)), dtype_(dtype), metric_(metric) {
  if (dim <= 0) throw std::invalid_argument("dim must be positive");
  if (metric < kInnerProduct || metric > kL2)
    throw std::invalid_argument("unknown metric code");
}

void PrototypeStore::ensure_rows(int64_t n) {
  const int64_t panels = (n + kLanes - 1) / kLanes;
  if (dtype_ == Dtype::kFloat32) {
    packed_f32_.resize(static_cast<size_t>(panels) * kLanes * dim_);
  } else {
    packed_bf16_.resize(static_cast<size_t>(panels) * kLanes * dim_padded_);
    rows_f32_.resize(static_cast<size_t>(n) * dim_);
  }
  norms2_.resize(static_cast<size_t>(panels) * kLanes);
}

void PrototypeStore::write_row(int64_t i, const float* row) {
  const int64_t p = i / kLanes;
  const int lane = static_cast<int>(i % kLanes);
  double n2 = 0.0;
  for (int d = 0; d < dim_; ++d) n2 += static_cast<double>(row[d]) * row[d];
  norms2_.data()[i] = static_cast<float>(n2);
  if (dtype_ == Dtype::kFloat32) {
    float* panel = packed_f32_.data() + static_cast<size_t>(p) * kLanes * dim_;
    for (int d = 0; d < dim_; ++d) panel[static_cast<size_t>(d) * kLanes + lane] = row[d];
  } else {
    uint16_t* panel =
        packed_bf16_.data() + static_cast<size_t>(p) * kLanes * dim_padded_;
    for (int d = 0; d < dim_padded_; ++d) {
      const float v = d < dim_ ? row[d] : 0.0f;
      panel[static_cast<size_t>(d / 2) * 2 * kLanes + 2 * lane + (d & 1)] =
          float_to_bf16(v);
    }
    std::memcpy(rows_f32_.data() + static_cast<size_t>(i) * dim_, row,
                sizeof(float) * dim_);
  }
}

void PrototypeStore::append(const float* rows, int64_t n) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  std::vector<float> tmp(dim_);
  ensure_rows(rows_ + n);
  for (int64_t r = 0; r < n; ++r) {
    prepare_row(rows + r * dim_, tmp.data(), dim_, metric_);
    write_row(rows_ + r, tmp.data());
  }
  rows_ += n;
}

void PrototypeStore::update(int64_t i, const float* row) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (i < 0 || i >= rows_) throw std::out_of_range("row index out of range");
  std::vector<float> tmp(dim_);
  prepare_row(row, tmp.data(), dim_, metric_);
  write_row(i, tmp.data());
}

int64_t PrototypeStore::remove(int64_t i) {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  if (i < 0 || i >= rows_) throw std::out_of_range("row index out of range");
  const int64_t last = rows_ - 1;
  std::vector<float> tmp(dim_);
  int64_t moved = -1;
  if (i != last) {
    // Stored rows are already prepared: copy without renormalising (which
    // would change values by rounding).
    get_row(last, tmp.data());
    write_row(i, tmp.data());
    moved = last;
  }
  std::fill(tmp.begin(), tmp.end(), 0.0f);
  write_row(last, tmp.data());  // zero the freed lane: the scan masks it anyway
  rows_ = last;
  return moved;
}

void PrototypeStore::clear() {
  std::unique_lock<std::shared_mutex> lock(mutex_);
  rows_ = 0;
}

void PrototypeStore::get_row(int64_t i, float* out) const {
  const int64_t p = i / kLanes;
  const int lane = static_cast<int>(i % kLanes);
  if (dtype_ == Dtype::kFloat32) {
    const float* panel = packed_f32_.data() + static_cast<size_t>(p) * kLanes * dim_;
    for (int d = 0; d < dim_; ++d) out[d] = panel[static_cast<size_t>(d) * kLanes + lane];
  } else {
    std::memcpy(out, rows_f32_.data() + static_cast<size_t>(i) * dim_,
                sizeof(float) * dim_);
  }
}

size_t PrototypeStore::bytes_scanned() const {
  const size_t elems = static_cast<size_t>(rows_) * dim_;
  return dtype_ == Dtype::kFloat32 ? elems * 4 : elems * 2;
}

size_t PrototypeStore::bytes_held() const {
  return packed_f32_.capacity() * 4 + packed_bf16_.capacity() * 2 +
         rows_f32_.capacity() * 4 + norms2_.capacity() * 4;
}

}  // namespace protoserve

// Prototype storage in the panel layout the CPU scan reads.
//
// Rows are grouped into panels of kLanes rows.  A float32 panel stores, for
// each dimension d, the kLanes values of its rows side by side
// (panel[d * kLanes + lane]), so the scan multiplies one broadcast query value
// by a whole vector of prototypes with no horizontal reductions.  A bfloat16
// panel interleaves pairs of dimensions (panel[(d/2) * 2*kLanes + 2*lane +
// d%2]) to feed the AVX-512 BF16 pair-dot instruction directly; its dimension
// is padded to an even count with zeros.
//
// A bfloat16 store also keeps every row in float32, row-major, for the exact
// re-ranking of the bf16 scan's candidates: 6 bytes per element instead of 4,
// while the scan itself reads 2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <shared_mutex>
#include <stdexcept>
#include <utility>

namespace protoserve {

constexpr int kLanes = 16;

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1 };

// A 64-byte aligned, growable array of trivially copyable T.  Growth doubles
// capacity, so appending n rows costs amortised O(n) copies.
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t capacity() const { return cap_; }

  // Resizes to n elements; new elements are zero.
  void resize(size_t n) {
    if (n > cap_) {
      size_t cap = cap_ ? cap_ : 1024;
      while (cap < n) cap *= 2;
      const size_t bytes = ((cap * sizeof(T) + 63) / 64) * 64;
      T* fresh = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!fresh) throw std::bad_alloc();
      if (size_) std::memcpy(fresh, data_, size_ * sizeof(T));
      std::free(data_);
      data_ = fresh;
      cap_ = cap;
    }
    if (n > size_) std::memset(data_ + size_, 0, (n - size_) * sizeof(T));
    size_ = n;
  }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
  size_t cap_ = 0;
};

class PrototypeStore {
 public:
  PrototypeStore(int dim, Dtype dtype, int metric);

  int dim() const { return dim_; }
  // Dimension as stored in a bf16 panel (rounded up to even).
  int padded_dim() const { return dim_padded_; }
  Dtype dtype() const { return dtype_; }
  int metric() const { return metric_; }
  int64_t size() const { return rows_; }
  int64_t panels() const { return (rows_ + kLanes - 1) / kLanes; }

  // Row-level edits.  Rows are given in float32; cosine rows are normalised
  // on the way in (a zero row stays zero).
  void append(const float* rows, int64_t n);
  void update(int64_t i, const float* row);
  // Swap-remove: the last row moves into slot i.  Returns the old index of
  // the row that moved (size()-1 before the call), or -1 if i was last.
  int64_t remove(int64_t i);
  void clear();

  // Copies row i (as stored: normalised for cosine, bf16-rounded never).
  void get_row(int64_t i, float* out) const;

  // Storage read by the scan.
  const float* panels_f32() const { return packed_f32_.data(); }
  const uint16_t* panels_bf16() const { return packed_bf16_.data(); }
  const float* rows_f32() const { return rows_f32_.data(); }
  const float* norms2() const { return norms2_.data(); }
  size_t bytes_scanned() const;
  size_t bytes_held() const;

  // Readers (scans) share, writers (edits) exclude.
  std::shared_mutex& mutex() const { return mutex_; }

 private:
  void write_row(int64_t i, const float* row);  // row already prepared
  void ensure_rows(int64_t n);

  int dim_;
  int dim_padded_;
  Dtype dtype_;
  int metric_;
  int64_t rows_ = 0;
  AlignedBuffer<float> packed_f32_;     // float32 store: the panels
  AlignedBuffer<uint16_t> packed_bf16_; // bf16 store: the panels
  AlignedBuffer<float> rows_f32_;       // bf16 store: exact rows for re-rank
  AlignedBuffer<float> norms2_;         // |row|^2 in float32 (l2)
  mutable std::shared_mutex mutex_;
};

// Scratch used to prepare one row: cosine normalisation.  Returns |row|^2 of
// the prepared row.
float prepare_row(const float* in, float* out, int dim, int metric);

}  // namespace protoserve

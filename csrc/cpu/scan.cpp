// The scan driver: prepares queries, splits (queries x prototype panels)
// into tasks for the thread pool, tiles each task so a group of panels stays
// in L2 while every query block passes over it, and hands the micro-kernel's
// raw dot products to a sink (bounded top-k heaps, or the score matrix).
#include <algorithm>
#include <cmath>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "microkernels.h"
#include "protoserve/kernels.h"
#include "protoserve/scan.h"
#include "thread_pool.h"

namespace protoserve {
namespace {

constexpr size_t kTileBytes = 1u << 20;  // panels kept hot in L2 per tile
constexpr int64_t kMinPanelsPerChunk = 32;

struct PreparedQueries {
  int64_t nq = 0;
  std::vector<float> f32;      // [nq, dim], normalised for cosine
  std::vector<uint32_t> bf16;  // [nq, padded/2] bf16 pairs (bf16 stores)
  std::vector<float> norm2;    // |q|^2 as prepared
  size_t ld = 0;
};

PreparedQueries prepare(const PrototypeStore& store, const float* q, int64_t nq) {
  PreparedQueries p;
  const int dim = store.dim();
  p.nq = nq;
  p.f32.resize(static_cast<size_t>(nq) * dim);
  p.norm2.resize(nq);
  for (int64_t i = 0; i < nq; ++i)
    p.norm2[i] = prepare_row(q + i * dim, p.f32.data() + i * dim, dim, store.metric());
  p.ld = dim;
  if (store.dtype() == Dtype::kBFloat16) {
    const int pairs = store.padded_dim() / 2;
    p.bf16.assign(static_cast<size_t>(nq) * pairs, 0u);
    for (int64_t i = 0; i < nq; ++i)
      for (int d = 0; d < dim; ++d) {
        const uint32_t h = float_to_bf16(p.f32[i * dim + d]);
        p.bf16[i * pairs + d / 2] |= (d & 1) ? (h << 16) : h;
      }
    p.ld = pairs;
  }
  return p;
}

struct Task {
  int64_t q0, q1, p0, p1;
};

// Splits the work so every thread has a share: over prototype panels first
// (one pass over memory, as for a single query), then over queries.
std::vector<Task> make_tasks(int64_t nq, int64_t panels, int threads, int* n_c) {
  int64_t c_chunks = std::max<int64_t>(1, std::min<int64_t>(threads, panels / kMinPanelsPerChunk));
  if (panels > 0 && c_chunks == 1 && nq < threads) c_chunks = std::min<int64_t>(threads, panels);
  const int64_t q_chunks = std::max<int64_t>(1, std::min<int64_t>(nq, threads / c_chunks));
  std::vector<Task> tasks;
  for (int64_t qc = 0; qc < q_chunks; ++qc)
    for (int64_t cc = 0; cc < c_chunks; ++cc)
      tasks.push_back({nq * qc / q_chunks, nq * (qc + 1) / q_chunks, panels * cc / c_chunks,
                       panels * (cc + 1) / c_chunks});
  *n_c = static_cast<int>(c_chunks);
  return tasks;
}

// Runs the micro-kernels over one task and calls sink(query, base_row,
// dots, ldo, valid_lanes) for each block of raw dot products.
template <typename Sink>
void scan_task(const PrototypeStore& store, const PreparedQueries& pq, const Task& t,
               Sink&& sink) {
  const MicroKernels& mk = active_kernels();
  const bool bf16 = store.dtype() == Dtype::kBFloat16;
  const int dim = store.dim();
  const int pdim = bf16 ? store.padded_dim() : dim;
  const size_t panel_elems = static_cast<size_t>(kLanes) * pdim;
  const size_t panel_bytes = panel_elems * (bf16 ? 2 : 4);
  const int64_t tile = std::max<int64_t>(mk.max_panels, kTileBytes / panel_bytes);
  const size_t ldo = static_cast<size_t>(tile) * kLanes;
  std::vector<float> out(static_cast<size_t>(mk.max_queries) * ldo);
  const int64_t rows = store.size();

  for (int64_t p = t.p0; p < t.p1; p += tile) {
    const int np = static_cast<int>(std::min<int64_t>(tile, t.p1 - p));
    for (int64_t q = t.q0; q < t.q1; q += mk.max_queries) {
      const int nb = static_cast<int>(std::min<int64_t>(mk.max_queries, t.q1 - q));
      if (bf16)
        mk.dot_bf16(pq.bf16.data() + q * pq.ld, pq.ld, nb, store.panels_bf16() + p * panel_elems,
                    np, pdim, out.data(), ldo);
      else
        mk.dot_f32(pq.f32.data() + q * pq.ld, pq.ld, nb, store.panels_f32() + p * panel_elems, np,
                   pdim, out.data(), ldo);
      const int64_t base = p * kLanes;
      const int valid = static_cast<int>(std::min<int64_t>(np * kLanes, rows - base));
      for (int i = 0; i < nb; ++i) sink(q + i, base, out.data() + i * ldo, valid);
    }
  }
}

double exact_dot(const float* a, const float* b, int dim) {
  double s = 0.0;
  for (int d = 0; d < dim; ++d) s += static_cast<double>(a[d]) * b[d];
  return s;
}

}  // namespace

void topk(const PrototypeStore& store, const float* queries, int64_t nq, int k, int rerank,
          float* out_scores, int64_t* out_index) {
  std::shared_lock<std::shared_mutex> lock(store.mutex());
  const int64_t rows = store.size();
  const int k_eff = static_cast<int>(std::min<int64_t>(k, rows));
  if (nq == 0 || k_eff == 0) return;
  const bool bf16 = store.dtype() == Dtype::kBFloat16;
  const int cand = bf16 ? static_cast<int>(std::min<int64_t>(rows, std::max(k, rerank))) : k_eff;
  const PreparedQueries pq = prepare(store, queries, nq);
  const float* pn2 = store.norms2();
  const int metric = store.metric();

  int n_c = 1;
  const std::vector<Task> tasks =
      make_tasks(nq, store.panels(), ThreadPool::instance().num_threads(), &n_c);
  // Heaps: for query q and chunk c, slot (q * n_c + c) * cand.
  const size_t slots = static_cast<size_t>(nq) * n_c;
  std::vector<float> hs(slots * cand);
  std::vector<int64_t> hi(slots * cand);
  std::vector<int> hn(slots, 0);

  ThreadPool::instance().run(static_cast<int>(tasks.size()), [&](int ti) {
    const Task& t = tasks[ti];
    const int chunk = ti % n_c;
    scan_task(store, pq, t, [&](int64_t q, int64_t base, const float* dots, int valid) {
      const size_t slot = static_cast<size_t>(q) * n_c + chunk;
      float* s = hs.data() + slot * cand;
      int64_t* id = hi.data() + slot * cand;
      int& n = hn[slot];
      const float qn2 = pq.norm2[q];
      for (int l = 0; l < valid; ++l) {
        const float score = finalize_score(metric, dots[l], qn2, pn2[base + l]);
        // Rows arrive in increasing order within a chunk, so a tie never
        // displaces a kept row: a strict comparison with the root suffices.
        if (n == cand && !(score > s[0])) continue;
        heap_offer(s, id, &n, cand, score, base + l);
      }
    });
  });

  // Merge chunks per query; for bf16, re-score candidates exactly first.
  std::vector<float> row(store.dim());
  const int dim = store.dim();
  for (int64_t q = 0; q < nq; ++q) {
    float* os = out_scores + q * k_eff;
    int64_t* oi = out_index + q * k_eff;
    int n = 0;
    for (int c = 0; c < n_c; ++c) {
      const size_t slot = static_cast<size_t>(q) * n_c + c;
      for (int j = 0; j < hn[slot]; ++j) {
        const int64_t r = hi[slot * cand + j];
        float score = hs[slot * cand + j];
        if (bf16) {
          const double dot = exact_dot(pq.f32.data() + q * dim, store.rows_f32() + r * dim, dim);
          score = finalize_score(metric, static_cast<float>(dot), pq.norm2[q], pn2[r]);
        }
        heap_offer(os, oi, &n, k_eff, score, r);
      }
    }
    heap_sort_best_first(os, oi, n);
  }
}

void all_scores(const PrototypeStore& store, const float* queries, int64_t nq, float* out) {
  std::shared_lock<std::shared_mutex> lock(store.mutex());
  const int64_t rows = store.size();
  if (nq == 0 || rows == 0) return;
  const PreparedQueries pq = prepare(store, queries, nq);
  const float* pn2 = store.norms2();
  const int metric = store.metric();
  int n_c = 1;
  const std::vector<Task> tasks =
      make_tasks(nq, store.panels(), ThreadPool::instance().num_threads(), &n_c);
  ThreadPool::instance().run(static_cast<int>(tasks.size()), [&](int ti) {
    scan_task(store, pq, tasks[ti], [&](int64_t q, int64_t base, const float* dots, int valid) {
      float* o = out + q * rows + base;
      const float qn2 = pq.norm2[q];
      for (int l = 0; l < valid; ++l) o[l] = finalize_score(metric, dots[l], qn2, pn2[base + l]);
    });
  });
}

double read_sum(const float* data, int64_t n) {
  const int threads = ThreadPool::instance().num_threads();
  std::vector<double> partial(threads, 0.0);
  ThreadPool::instance().run(threads, [&](int t) {
    const int64_t a = n * t / threads, b = n * (t + 1) / threads;
    float acc[16] = {};
    int64_t i = a;
    for (; i + 16 <= b; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += data[i + l];
    double s = 0.0;
    for (; i < b; ++i) s += data[i];
    for (float v : acc) s += v;
    partial[t] = s;
  });
  double s = 0.0;
  for (double v : partial) s += v;
  return s;
}

void set_num_threads(int n) { ThreadPool::instance().set_num_threads(n); }
int num_threads() { return ThreadPool::instance().num_threads(); }

}  // namespace protoserve

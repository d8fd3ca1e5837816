// The scan driver: prepares queries, splits (queries x prototype panels)
// into tasks for the thread pool, tiles each task so a group of panels stays
// in L2 while every query block passes over it, and hands the micro-kernel's
// raw dot products to a sink (bounded top-k heaps, or the score matrix).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "microkernels.h"
#include "protoserve/kernels.h"
#include "protoserve/scan.h"
#include "thread_pool.h"

namespace protoserve {
namespace {

constexpr size_t kTileBytes = 512u << 10;  // panels kept hot in L2 per tile
constexpr int64_t kMinPanelsPerChunk = 32;
// Below this many multiply-adds (default 2^19, about 30 us on one core) a
// call runs in the calling thread: waking the pool would cost more than it
// saves, and many small concurrent calls (one per served request) would
// contend for it.
std::atomic<int64_t> g_min_parallel_macs{int64_t(1) << 19};

// Queries as the scan reads them: normalised rows (kept for the exact
// bf16 re-rank), their squared norms, and a copy packed per block of at most
// max_queries rows in the micro-kernels' format (see microkernels.h).
// Blocks are balanced (64 queries at 12 per block -> 11,11,11,11,10,10).
struct PreparedQueries {
  int64_t nq = 0;
  std::vector<float> f32;        // [nq, dim]
  std::vector<float> norm2;      // [nq]
  std::vector<int64_t> starts;   // block b holds rows [starts[b], starts[b+1])
  std::vector<float> pack;       // 4-byte units; block b at starts[b] * units
  size_t units = 0;              // 4-byte units per packed query row
  int64_t blocks() const { return static_cast<int64_t>(starts.size()) - 1; }
  const float* block(int64_t b) const { return pack.data() + starts[b] * units; }
};

PreparedQueries prepare(const PrototypeStore& store, const MicroKernels& mk, const float* q,
                        int64_t nq) {
  PreparedQueries p;
  const int dim = store.dim();
  const bool bf16 = store.dtype() == Dtype::kBFloat16;
  const int pairs = store.padded_dim() / 2;
  p.nq = nq;
  p.f32.resize(static_cast<size_t>(nq) * dim);
  p.norm2.resize(nq);
  for (int64_t i = 0; i < nq; ++i)
    p.norm2[i] = prepare_row(q + i * dim, p.f32.data() + i * dim, dim, store.metric());

  const int64_t nblocks = (nq + mk.max_queries - 1) / mk.max_queries;
  for (int64_t b = 0; b <= nblocks; ++b) p.starts.push_back(nblocks ? nq * b / nblocks : 0);
  if (!bf16) p.units = dim;
  else if (mk.bf16_query_format == kWidened) p.units = 2 * pairs;
  else p.units = pairs;
  p.pack.assign(static_cast<size_t>(nq) * p.units, 0.0f);

  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t r0 = p.starts[b];
    const int nb = static_cast<int>(p.starts[b + 1] - r0);
    float* out = p.pack.data() + r0 * p.units;
    for (int i = 0; i < nb; ++i) {
      const float* x = p.f32.data() + (r0 + i) * dim;
      if (!bf16) {
        for (int d = 0; d < dim; ++d) out[d * nb + i] = x[d];
        continue;
      }
      for (int j = 0; j < pairs; ++j) {
        const float lo = x[2 * j], hi = 2 * j + 1 < dim ? x[2 * j + 1] : 0.0f;
        if (mk.bf16_query_format == kWidened) {
          out[(j * nb + i) * 2] = round_to_bf16(lo);
          out[(j * nb + i) * 2 + 1] = round_to_bf16(hi);
        } else {
          const uint32_t w = static_cast<uint32_t>(float_to_bf16(lo)) |
                             (static_cast<uint32_t>(float_to_bf16(hi)) << 16);
          std::memcpy(out + j * nb + i, &w, sizeof w);
        }
      }
    }
  }
  return p;
}

struct Task {
  int64_t b0, b1, p0, p1;  // query blocks [b0, b1), panels [p0, p1)
};

// Threads worth using for nq queries against rows prototypes of dim floats.
int threads_for(int64_t nq, int64_t rows, int64_t dim) {
  if (nq * rows * dim < g_min_parallel_macs.load(std::memory_order_relaxed)) return 1;
  return ThreadPool::instance().num_threads();
}

// Splits the work so every thread has a share: over prototype panels first
// (one pass over memory, as for a single query), then over query blocks.
std::vector<Task> make_tasks(int64_t blocks, int64_t panels, int threads, int* n_c) {
  int64_t c_chunks = std::max<int64_t>(1, std::min<int64_t>(threads, panels / kMinPanelsPerChunk));
  if (panels > 0 && c_chunks == 1 && blocks < threads)
    c_chunks = std::min<int64_t>(threads, panels);
  const int64_t q_chunks = std::max<int64_t>(1, std::min<int64_t>(blocks, threads / c_chunks));
  std::vector<Task> tasks;
  for (int64_t qc = 0; qc < q_chunks; ++qc)
    for (int64_t cc = 0; cc < c_chunks; ++cc)
      tasks.push_back({blocks * qc / q_chunks, blocks * (qc + 1) / q_chunks,
                       panels * cc / c_chunks, panels * (cc + 1) / c_chunks});
  *n_c = static_cast<int>(c_chunks);
  return tasks;
}

// Runs the micro-kernels over one task and calls sink(query, base_row,
// dots, valid_lanes) for each query's run of raw dot products.
template <typename Sink>
void scan_task(const PrototypeStore& store, const MicroKernels& mk, const PreparedQueries& pq,
               const Task& t, Sink&& sink) {
  const bool bf16 = store.dtype() == Dtype::kBFloat16;
  const int pdim = bf16 ? store.padded_dim() : store.dim();
  const size_t panel_elems = static_cast<size_t>(kLanes) * pdim;
  const size_t panel_bytes = panel_elems * (bf16 ? 2 : 4);
  const int64_t tile = std::max<int64_t>(2, kTileBytes / panel_bytes);
  const size_t ldo = static_cast<size_t>(tile) * kLanes;
  std::vector<float> out(static_cast<size_t>(mk.max_queries) * ldo);
  const int64_t rows = store.size();

  const char* storage = bf16 ? reinterpret_cast<const char*>(store.panels_bf16())
                             : reinterpret_cast<const char*>(store.panels_f32());
  for (int64_t p = t.p0; p < t.p1; p += tile) {
    const int np = static_cast<int>(std::min<int64_t>(tile, t.p1 - p));
    const int64_t base = p * kLanes;
    const int valid = static_cast<int>(std::min<int64_t>(np * kLanes, rows - base));
    // The first query block streams this tile from memory; the later ones
    // read it from L2 and, one line per inner step, pull the next tile in.
    const int64_t next_np = std::min<int64_t>(tile, t.p1 - p - np);
    Prefetch pf;
    for (int64_t b = t.b0; b < t.b1; ++b) {
      const int nb = static_cast<int>(pq.starts[b + 1] - pq.starts[b]);
      if (b == t.b0 + 1 && next_np > 0) {
        pf.next = storage + (p + np) * panel_bytes;
        pf.end = pf.next + next_np * panel_bytes;
      }
      if (bf16)
        mk.dot_bf16(pq.block(b), nb, store.panels_bf16() + p * panel_elems, np, pdim, out.data(),
                    ldo, pf);
      else
        mk.dot_f32(pq.block(b), nb, store.panels_f32() + p * panel_elems, np, pdim, out.data(),
                   ldo, pf);
      for (int i = 0; i < nb; ++i) sink(pq.starts[b] + i, base, out.data() + i * ldo, valid);
    }
  }
}

// Exact re-rank dot product: float64 accumulation in 8 independent lanes
// (which the compiler vectorises without reassociating a single sum).
double exact_dot(const float* a, const float* b, int dim) {
  double acc[8] = {};
  int d = 0;
  for (; d + 8 <= dim; d += 8)
    for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(a[d + l]) * b[d + l];
  double s = 0.0;
  for (; d < dim; ++d) s += static_cast<double>(a[d]) * b[d];
  for (double v : acc) s += v;
  return s;
}

// The largest score in a run before the query term: dot for ip/cosine,
// 2*dot - |p|^2 for l2 (finalize_score subtracts |q|^2 last, and rounding
// is monotonic, so max-then-subtract equals subtract-then-max).
float run_max(int metric, const float* dots, const float* pn2, int n) {
  float m[kLanes];
  for (float& v : m) v = -std::numeric_limits<float>::infinity();
  int l = 0;
  if (metric == kL2) {
    for (; l + kLanes <= n; l += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float v = 2.0f * dots[l + j] - pn2[l + j];
        m[j] = m[j] < v ? v : m[j];
      }
    for (; l < n; ++l) m[0] = std::max(m[0], 2.0f * dots[l] - pn2[l]);
  } else {
    for (; l + kLanes <= n; l += kLanes)
      for (int j = 0; j < kLanes; ++j) m[j] = m[j] < dots[l + j] ? dots[l + j] : m[j];
    for (; l < n; ++l) m[0] = std::max(m[0], dots[l]);
  }
  float best = m[0];
  for (float v : m) best = std::max(best, v);
  return best;
}

float qn2_if_l2(int metric, float qn2) { return metric == kL2 ? qn2 : 0.0f; }

}  // namespace

void topk(const PrototypeStore& store, const float* queries, int64_t nq, int k, int rerank,
          float* out_scores, int64_t* out_index) {
  std::shared_lock<std::shared_mutex> lock(store.mutex());
  const int64_t rows = store.size();
  const int k_eff = static_cast<int>(std::min<int64_t>(k, rows));
  if (nq == 0 || k_eff == 0) return;
  const bool bf16 = store.dtype() == Dtype::kBFloat16;
  const int cand = bf16 ? static_cast<int>(std::min<int64_t>(rows, std::max(k, rerank))) : k_eff;
  const MicroKernels& mk = active_kernels();
  const PreparedQueries pq = prepare(store, mk, queries, nq);
  const float* pn2 = store.norms2();
  const int metric = store.metric();

  int n_c = 1;
  const std::vector<Task> tasks =
      make_tasks(pq.blocks(), store.panels(), threads_for(nq, rows, store.dim()), &n_c);
  // Heaps: for chunk c and query q, slot (c * nq + q) * cand: chunk-major,
  // so threads scanning different chunks never share a cache line.
  const size_t slots = static_cast<size_t>(nq) * n_c;
  std::vector<float> hs(slots * cand);
  std::vector<int64_t> hi(slots * cand);
  std::vector<int> hn(slots, 0);

  ThreadPool::instance().run(static_cast<int>(tasks.size()), [&](int ti) {
    const Task& t = tasks[ti];
    const int chunk = ti % n_c;
    scan_task(store, mk, pq, t, [&](int64_t q, int64_t base, const float* dots, int valid) {
      const size_t slot = static_cast<size_t>(chunk) * nq + q;
      float* s = hs.data() + slot * cand;
      int64_t* id = hi.data() + slot * cand;
      int n = hn[slot];
      const float qn2 = pq.norm2[q];
      // Rows arrive in increasing order within a chunk, so a tie never
      // displaces a kept row: a strict comparison with the root suffices,
      // and the common case is one compare per score.
      constexpr float kNone = -std::numeric_limits<float>::infinity();
      float bar = n == cand ? s[0] : kNone;
      // Once the heap is full, most runs hold nothing better than its worst:
      // one vectorised max over the run (16 independent lanes) skips them.
      if (n == cand && run_max(metric, dots, pn2 + base, valid) - qn2_if_l2(metric, qn2) <= bar)
        return;
      for (int l = 0; l < valid; ++l) {
        const float score = finalize_score(metric, dots[l], qn2, pn2[base + l]);
        if (score > bar || n < cand) {
          heap_offer(s, id, &n, cand, score, base + l);
          bar = n == cand ? s[0] : kNone;
        }
      }
      hn[slot] = n;
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
      const size_t slot = static_cast<size_t>(c) * nq + q;
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
  const MicroKernels& mk = active_kernels();
  const PreparedQueries pq = prepare(store, mk, queries, nq);
  const float* pn2 = store.norms2();
  const int metric = store.metric();
  int n_c = 1;
  const std::vector<Task> tasks =
      make_tasks(pq.blocks(), store.panels(), threads_for(nq, rows, store.dim()), &n_c);
  ThreadPool::instance().run(static_cast<int>(tasks.size()), [&](int ti) {
    scan_task(store, mk, pq, tasks[ti], [&](int64_t q, int64_t base, const float* dots, int valid) {
      float* o = out + q * rows + base;
      const float qn2 = pq.norm2[q];
      for (int l = 0; l < valid; ++l) o[l] = finalize_score(metric, dots[l], qn2, pn2[base + l]);
    });
  });
}

double read_sum(const float* data, int64_t n) {
  const MicroKernels& mk = active_kernels();
  const int threads = ThreadPool::instance().num_threads();
  std::vector<double> partial(threads, 0.0);
  ThreadPool::instance().run(threads, [&](int t) {
    const int64_t a = n * t / threads, b = n * (t + 1) / threads;
    partial[t] = mk.read_sum(data + a, b - a);
  });
  double s = 0.0;
  for (double v : partial) s += v;
  return s;
}

void set_num_threads(int n) { ThreadPool::instance().set_num_threads(n); }
void set_min_parallel_macs(int64_t macs) { g_min_parallel_macs.store(macs); }
int64_t min_parallel_macs() { return g_min_parallel_macs.load(); }
int num_threads() { return ThreadPool::instance().num_threads(); }

}  // namespace protoserve

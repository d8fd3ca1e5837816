// Run-time choice of the micro-kernel table (FAISS-style SIMD levels):
// portable < avx2 < avx512 < avx512_bf16.  PROTOSERVE_SIMD in the
// environment, or set_simd_level(), picks a level at or below the best this
// CPU supports, for tests and benchmarks that compare the paths.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "microkernels.h"

namespace protoserve {

#if !defined(PS_HAVE_AVX512_BF16_TU)
double fma_macs_per_ns() { return 0.0; }
double dpbf16_macs_per_ns() { return 0.0; }
#endif

namespace {

enum Level { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* const kNames[] = {"portable", "avx2", "avx512", "avx512_bf16"};

const MicroKernels* table(int level) {
  switch (level) {
#if defined(PS_HAVE_AVX512_BF16_TU)
    case kAvx512Bf16: return avx512_bf16_kernels();
#endif
#if defined(PS_HAVE_AVX512_TU)
    case kAvx512: return avx512_kernels();
#endif
#if defined(PS_HAVE_AVX2_TU)
    case kAvx2: return avx2_kernels();
#endif
    default: return &portable_kernels();
  }
}

int detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  int level = bf16 ? kAvx512Bf16 : avx512 ? kAvx512 : avx2 ? kAvx2 : kPortable;
  // Never pick a level whose translation unit was not built.
  while (level > kPortable && table(level) == &portable_kernels()) --level;
  return level;
#else
  return kPortable;
#endif
}

// VDPBF16PS does twice the multiply-adds of an FMA per instruction, but some
// cores issue it at half the rate (measured: 1 per 2 cycles against 2 FMAs
// per cycle on a virtualised Sapphire Rapids).  Prefer it for the bf16 scan
// only where it measurably beats widening to float32 + FMA.
int preferred(int best) {
  if (best == kAvx512Bf16 && dpbf16_macs_per_ns() < 1.2 * fma_macs_per_ns()) return kAvx512;
  return best;
}

int parse(const char* name) {
  if (!name) return -1;
  for (int i = 0; i < 4; ++i)
    if (std::strcmp(name, kNames[i]) == 0) return i;
  return -1;
}

const int kBest = detect();

int initial_level() {
  const int forced = parse(std::getenv("PROTOSERVE_SIMD"));
  return (forced >= 0 && forced <= kBest) ? forced : preferred(kBest);
}

std::atomic<int> g_level{initial_level()};

}  // namespace

const MicroKernels& active_kernels() { return *table(g_level.load(std::memory_order_relaxed)); }
const char* simd_level() { return kNames[g_level.load()]; }
const char* best_simd_level() { return kNames[kBest]; }

bool set_simd_level(const char* name) {
  const int level = parse(name);
  if (level < 0 || level > kBest) return false;
  g_level.store(level);
  return true;
}

}  // namespace protoserve

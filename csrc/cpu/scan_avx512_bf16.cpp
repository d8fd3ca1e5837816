// The "avx512_bf16" level: the AVX-512 micro-kernels with VDPBF16PS.
#define PS_AVX512_BF16 1
#include "scan_avx512.cpp"

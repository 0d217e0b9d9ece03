// What the CPU kernels include for their x86 builds: GPT2FAST_X86 where GCC or Clang builds for x86-64, with
// the intrinsics, so that a file can compile AVX-512 (and AMX) code in #pragma GCC target regions and pick it at
// run time with __builtin_cpu_supports.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#define GPT2FAST_X86 1
#include <immintrin.h>
// GCC 12's AVX-512 intrinsics trip its own uninitialized-use warnings (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

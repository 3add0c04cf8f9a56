// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// "avx512vl-vnni": the avx2-int16 kernel (256-bit vectors) with AVX512-VNNI's vpdpwssd on ymm registers
// (EVEX-encoded, AVX512-VL): for CPUs with AVX512-VNNI but no AVX-VNNI, where 512-bit instructions run as
// two 256-bit halves (AMD Zen 4), so the 256-bit loop reads more bytes per cycle than the 512-bit one. The
// same int32 sums as avx2-int16 and avx2-vnni, so the same bits (tests/test_cpu_kernel.py checks it).
// kernel_avx2.cpp again, under its own target.

#define QMV_EVEX_VNNI 1
#include "kernel_avx2.cpp"

// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// "avx2-vnni": the avx2-int16 kernel with AVX-VNNI (Intel Alder Lake and later, some without AVX-512): its
// int16 dot products use vpdpwssd, one instruction where vpmaddwd and an add were two. The same int32 sums,
// so the same bits as avx2-int16 (tests/test_cpu_kernel.py checks it). Float problems (8-bit weights, groups
// of 32) take the float AVX2 loop as avx2-int16 does. kernel_avx2.cpp again, under its own target.

#define QMV_AVX_VNNI 1
#include "kernel_avx2.cpp"

// Copyright © 2026 pixtral-mlx authors. Apache-2.0.
//
// The prefill product from 4-bit codes with AVX512-VNNI's vpdpwssd on 256-bit vectors and AVX-512VL's 32
// registers (4 rows of x a tile): gemm_int16.cpp again, under its own target.

#define QMV_GEMM_EVEX 1
#include "gemm_int16.cpp"

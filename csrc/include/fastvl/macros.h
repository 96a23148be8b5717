// Portability macros shared by CPU (C++) and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTVL_HD __host__ __device__
#define FASTVL_DEVICE __device__
#else
#define FASTVL_HD
#define FASTVL_DEVICE
#endif

#if defined(__GNUC__) && !defined(__CUDACC__)
#define FASTVL_RESTRICT __restrict__
#else
#define FASTVL_RESTRICT
#endif

/* gpff C++ inference core: what the SIMD evaluation kernels (sgdml.cpp, mff.cpp) share, for the
 * core's own sources only.
 *
 * GPFF_INLINE forces inlining of the small helpers of the kernels; v2d, v4d and v8d are SIMD
 * vectors of 2, 4 and 8 doubles (GCC/Clang vector extension), instantiated per ISA: v2d for
 * baseline x86-64 (SSE2), v4d for AVX2, v8d for AVX-512.
 */
#ifndef GPFF_SIMD_H
#define GPFF_SIMD_H

#if defined(__GNUC__)
#define GPFF_INLINE inline __attribute__((always_inline))
// vector arguments of the always-inline helpers never cross an ABI boundary
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define GPFF_INLINE inline
#endif

namespace gpff {

typedef double v8d __attribute__((vector_size(64), may_alias));
typedef double v4d __attribute__((vector_size(32), may_alias));
typedef double v2d __attribute__((vector_size(16), may_alias));

}    // namespace gpff

#endif

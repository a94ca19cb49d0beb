// What llmkit's kernel sources share (lowbit.cpp: the quantised products; decode_block.cpp: one decoder
// block as one call): the weight as the kernels read it, the product, and small helpers.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace llmkit_lowbit {

constexpr int64_t BLOCK = 32;  // columns per step: 16 bytes of int4 codes; every group is whole blocks

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

__attribute__((target("avx2,fma"))) inline float sum_avx2(__m256 t) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// One vector width's operations, for the kernels written once and compiled per width (one_row.inc,
// attend_vec.inc): each namespace is compiled under its own `#pragma GCC target`, and a kernel file is
// included inside a region of the same target and namespace, where these inline into it (GCC will not
// inline one width's intrinsics into a template shared by both). Vec: LANES floats; IVec: LANES int32.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace avx512 {
using Vec = __m512;
using IVec = __m512i;
constexpr int64_t LANES = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline __m128 vsum4(Vec a, Vec b, Vec c, Vec d) {  // the four vectors' sums, in order
  // each vector's upper 8 lanes onto its lower 8, two vectors side by side, then as AVX2's
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const auto upper = [](__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); };
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(_mm512_castps512_ps256(ab), upper(ab)),
                                  _mm256_hadd_ps(_mm512_castps512_ps256(cd), upper(cd)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {  // bf16 widened to fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline IVec widen_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec codes_s8(const uint8_t* p) {  // LANES int8 codes as floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec low_nibbles(IVec b) { return _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))); }
inline Vec high_nibbles(IVec b) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)); }
// One block of 32 int4 codes (16 bytes: column 2j in byte j's low nibble, 2j+1 in its high one) as the
// dequantised weights code·scale + minimum, each product and sum rounded (no FMA), in column order.
inline void expand_block(const uint8_t* c, Vec s, Vec minimum, float* out) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), low4 = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  const __m128i part[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // columns 0-15, 16-31
  for (int i = 0; i < 2; ++i)
    vstore(out + 16 * i, vadd(vmul(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part[i])), s), minimum));
}
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = __m256;
using IVec = __m256i;
constexpr int64_t LANES = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return sum_avx2(v); }
inline __m128 vsum4(Vec a, Vec b, Vec c, Vec d) {  // the four vectors' sums, in order
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline IVec widen_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline Vec codes_s8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec low_nibbles(IVec b) { return _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))); }
inline Vec high_nibbles(IVec b) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)); }
inline void expand_block(const uint8_t* c, Vec s, Vec minimum, float* out) {  // as avx512's
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), low4 = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
  const __m128i part[4] = {first, _mm_unpackhi_epi64(first, first), second, _mm_unpackhi_epi64(second, second)};
  for (int i = 0; i < 4; ++i)
    vstore(out + 8 * i, vadd(vmul(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[i])), s), minimum));
}
}  // namespace avx2
#pragma GCC pop_options

// One quantised weight as the kernels read it (int4: packed nibbles and an offset; int8: codes).
struct Weight {
  bool int4;
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* offsets;
  const float* bias;  // or null
  int64_t N, K, G, group;
};

inline const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// w's codes, scales, offset (int4) and bias as the kernels read them, after checking that they fit together
Weight weight_of(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t group,
                 const std::optional<at::Tensor>& bias);

// out (M, N) = x (M, K) times w's weight, plus its bias; isa: 2 AVX-512, 1 AVX2, 0 portable C++
void product(const Weight& w, const float* x, int64_t M, float* out, int64_t isa);

// decode_block.cpp: a pre-norm LLaMA-style block for one new position of each row (see there)
at::Tensor decode_block(const at::Tensor& x, at::TensorList weights, at::IntArrayRef groups,
                        const c10::List<std::optional<at::Tensor>>& biases,
                        const c10::List<std::optional<at::Tensor>>& act_scales, at::TensorList norms,
                        at::ArrayRef<double> eps, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& keys, const at::Tensor& values, int64_t pos,
                        const std::optional<at::Tensor>& visible, at::IntArrayRef heads, double scale, int64_t isa);

}  // namespace llmkit_lowbit

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
                        const c10::List<std::optional<at::Tensor>>& biases, at::TensorList norms,
                        at::ArrayRef<double> eps, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& keys, const at::Tensor& values, int64_t pos,
                        const std::optional<at::Tensor>& visible, at::IntArrayRef heads, double scale, int64_t isa);

}  // namespace llmkit_lowbit

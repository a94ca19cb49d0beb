// One pre-norm LLaMA-style decoder block for one new position of each row of a batch, as one call
// (llmkit/quant/kernels/block.py says when it runs): RMSNorm, the quantised q/k/v projection (lowbit.cpp's
// product), RoPE, the KV cache, attention over it, the output projection, RMSNorm, the SwiGLU MLP.

#include "lowbit.h"

namespace llmkit_lowbit {
namespace {

// exp without a library call, so the loops around it vectorise (the softmax's and SiLU's: std::exp
// cost SmolLM2 ~7 ms of CPU per decode step of 16 rows): 2^n · e^r with |r| ≤ ln2/2 and a degree-6
// polynomial (relative error < 2e-7, about fp32's own rounding), for x clamped to [−87, 88] (outside
// it the result under- or overflows fp32's normal range anyway).
inline float exp_clamped(float x) {
  x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
  const float n = __builtin_floorf(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// SiLU(gate)·up for the MLP of `rows` rows of (gate F | up F), into act (rows, F)
inline __attribute__((always_inline)) void swiglu_rows(const float* gate_up, int64_t rows, int64_t F, float* act) {
  for (int64_t b = 0; b < rows; ++b) {
    const float* g = gate_up + b * 2 * F;
    float* a = act + b * F;
#pragma omp simd
    for (int64_t i = 0; i < F; ++i) a[i] = g[i] / (1.f + exp_clamped(-g[i])) * g[F + i];
  }
}
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void swiglu_avx512(const float* gu, int64_t rows, int64_t F,
                                                                            float* act) {
  swiglu_rows(gu, rows, F, act);
}
__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* gu, int64_t rows, int64_t F, float* act) {
  swiglu_rows(gu, rows, F, act);
}
void swiglu_portable(const float* gu, int64_t rows, int64_t F, float* act) { swiglu_rows(gu, rows, F, act); }
void swiglu(const float* gu, int64_t rows, int64_t F, float* act, int64_t isa) {
  (isa >= 2 ? swiglu_avx512 : isa == 1 ? swiglu_avx2 : swiglu_portable)(gu, rows, F, act);
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }  // a bf16 cache

template <typename T>  // float, or uint16_t for bf16
struct Attention {
  const float* q;  // row b's (H, D) queries after RoPE at q + b·q_stride
  const T* keys;   // row b, head h, position t, dim d at b·batch_stride + h·head_stride + t·time_stride + d
  const T* values;
  const bool* visible;  // (B, length): which keys row b sees (its padding hidden), or null: all of them
  int64_t q_stride, batch_stride, head_stride, time_stride;
  int64_t H, Hkv, D, length;  // length: cached positions, the new one included
  float scale;
  float* scores;  // (B·H, length) scratch
  float* out;     // (B·H, D)
};

// scores[t] ← exp(scores[t] − max), 0 where the key is hidden; returns their sum (the softmax's divisor)
__attribute__((always_inline)) inline float softmax_numerators(float* scores, int64_t length, const bool* visible) {
  float best = -3.4e38f;
  for (int64_t t = 0; t < length; ++t)
    if (!visible || visible[t]) best = scores[t] > best ? scores[t] : best;
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = exp_clamped(scores[t] - best);
    total += scores[t];
  }
  if (visible) {  // a hidden key's score may exceed `best`: summed again without them
    total = 0.f;
    for (int64_t t = 0; t < length; ++t) {
      scores[t] = visible[t] ? scores[t] : 0.f;
      total += scores[t];
    }
  }
  return total;
}

// softmax(q·kᵀ·scale)·v per row and query head i = b·H + h, reading key/value head h / (H / Hkv) (GQA),
// keys a row does not see weighing exactly 0 (a boolean mask, as attend() gives SDPA)
template <typename T>
__attribute__((always_inline)) inline void attend_heads(const Attention<T>& a, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / a.H, h = i % a.H, kv = h / (a.H / a.Hkv);
    const float* q = a.q + b * a.q_stride + h * a.D;
    const T* keys = a.keys + b * a.batch_stride + kv * a.head_stride;
    const T* values = a.values + b * a.batch_stride + kv * a.head_stride;
    float* scores = a.scores + i * a.length;
    for (int64_t t = 0; t < a.length; ++t) {
      const T* k = keys + t * a.time_stride;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < a.D; ++d) dot += q[d] * to_float(k[d]);
      scores[t] = dot * a.scale;
    }
    const float total = softmax_numerators(scores, a.length, a.visible ? a.visible + b * a.length : nullptr);
    float* out = a.out + i * a.D;
    for (int64_t d = 0; d < a.D; ++d) out[d] = 0.f;
    for (int64_t t = 0; t < a.length; ++t) {
      if (scores[t] == 0.f) continue;  // hidden (or underflowed): adds nothing
      const T* v = values + t * a.time_stride;
      const float p = scores[t] / total;
#pragma omp simd
      for (int64_t d = 0; d < a.D; ++d) out[d] += p * to_float(v[d]);
    }
  }
}

// The same for head_dim a multiple of the vector width up to 8 vectors (SmolLM2, Llama: 64; an fp32 or
// bf16 cache), in explicit vectors: each key's dot product in registers, the output held in registers
// across the values (the generic loops above cost SmolLM2 ~0.07 ms a block at 520 cached positions, a
// quarter of its decode step). Written once, in attend_vec.inc, and compiled here for AVX-512 and for
// AVX2 with each width's vector operations (lowbit.h).
constexpr int64_t ATTEND_MAX_VECTORS = 8;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace on_avx512 {
using namespace llmkit_lowbit::avx512;
#include "attend_vec.inc"
}  // namespace on_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace on_avx2 {
using namespace llmkit_lowbit::avx2;
#include "attend_vec.inc"
}  // namespace on_avx2
#pragma GCC pop_options

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void attend_avx512(const Attention<T>& a, int64_t h0,
                                                                            int64_t h1) {
  attend_heads(a, h0, h1);
}
template <typename T>
__attribute__((target("avx2,fma"))) void attend_avx2(const Attention<T>& a, int64_t h0, int64_t h1) {
  attend_heads(a, h0, h1);
}
template <typename T>
void attend_portable(const Attention<T>& a, int64_t h0, int64_t h1) { attend_heads(a, h0, h1); }

template <typename T>
void attend(const Attention<T>& a, int64_t rows, int64_t isa) {
  using Fn = void (*)(const Attention<T>&, int64_t, int64_t);
  Fn fn = isa >= 2 ? attend_avx512<T> : isa == 1 ? attend_avx2<T> : attend_portable<T>;
  if (isa >= 2 && a.D % avx512::LANES == 0 && a.D <= avx512::LANES * ATTEND_MAX_VECTORS) fn = on_avx512::attend_vec<T>;
  if (isa == 1 && a.D % avx2::LANES == 0 && a.D <= avx2::LANES * ATTEND_MAX_VECTORS) fn = on_avx2::attend_vec<T>;
  at::parallel_for(0, rows * a.H, 1, [&](int64_t h0, int64_t h1) { fn(a, h0, h1); });
}

// `t` (fp32 or bf16, contiguous) as floats: its own data, or converted into `scratch`
const float* floats(const at::Tensor& t, float* scratch) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  const uint16_t* v = bf16_data(t);
  for (int64_t i = 0; i < t.numel(); ++i) scratch[i] = bf16_to_float(v[i]);
  return scratch;
}

// y = x / sqrt(mean(x²) + eps) · weight, as F.rms_norm
void rms_norm(const float* x, const float* weight, int64_t C, double eps, float* y) {
  float squares = 0.f;
  for (int64_t i = 0; i < C; ++i) squares += x[i] * x[i];
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(C) + static_cast<float>(eps));
  for (int64_t i = 0; i < C; ++i) y[i] = x[i] * inv * weight[i];
}

// RoPE in the half-split layout (apply_rope): out = x·cos + rotate_half(x)·sin, in place, per head
void rope(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// A pre-norm LLaMA-style block for one new position of each of B rows: RMSNorm, fused q/k/v projection,
// RoPE, the new keys and values written into the cache at `pos`, attention over positions 0..pos (those
// `visible` shows, if given), output projection, residual; RMSNorm, fused gate/up projection,
// SiLU(gate)·up, down projection, residual. What llmkit's Block computes for this case (tests compare the
// two), in one call instead of ~30; the B rows share each expansion of the weights (product()).
// weights: codes, scale, offset of qkv, o, gate_up, down; x: (B, 1, C); cos/sin: (B, D), or (D) for all
// rows; keys/values: this layer's (B, Hkv, T, D) cache; visible: (B, pos + 1) bool, or none.
}  // namespace

at::Tensor decode_block(const at::Tensor& x, at::TensorList weights, at::IntArrayRef groups,
                        const c10::List<std::optional<at::Tensor>>& biases,
                        const c10::List<std::optional<at::Tensor>>& act_scales, at::TensorList norms,
                        at::ArrayRef<double> eps, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& keys, const at::Tensor& values, int64_t pos,
                        const std::optional<at::Tensor>& visible, at::IntArrayRef heads, double scale, int64_t isa) {
  TORCH_CHECK(weights.size() == 12 && groups.size() == 4 && biases.size() == 4 && act_scales.size() == 4 &&
              norms.size() == 2 && eps.size() == 2 && heads.size() == 3,
              "decode_block: 4 weights (3 tensors each), their biases and AWQ divisors, 2 norms");
  const int64_t C = x.size(-1), H = heads[0], Hkv = heads[1], D = heads[2], B = x.size(0);
  Weight w[4];
  for (int i = 0; i < 4; ++i) w[i] = weight_of(weights[3 * i], weights[3 * i + 1], weights[3 * i + 2], groups[i], biases.get(i));
  const int64_t F = w[2].N / 2, QKV = (H + 2 * Hkv) * D;
  TORCH_CHECK(w[0].K == C && w[0].N == QKV && w[1].K == H * D && w[1].N == C && w[2].K == C &&
              w[3].K == F && w[3].N == C && H % Hkv == 0 && D % 2 == 0, "decode_block: shapes do not fit together");
  const float* divisors[4];  // AWQ: each projection's input divided by its per-channel scale first, or null
  for (int i = 0; i < 4; ++i) {
    const auto& s = act_scales.get(i);
    TORCH_CHECK(!s || (s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == w[i].K),
                "decode_block: an AWQ divisor must be float32 with one value per input");
    divisors[i] = s ? s->data_ptr<float>() : nullptr;
  }
  // fp32 or bf16 (a bf16 model: its stream, norms and cache are bf16; everything between stays fp32)
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && B >= 1 && (dtype == at::kFloat || dtype == at::kBFloat16) &&
              x.is_contiguous(), "decode_block: one fp32 or bf16 position per row, (B, 1, C)");
  for (const auto& t : {norms[0], norms[1], cos, sin})
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), "decode_block: norms, cos and sin in x's dtype");
  const bool shared_rope = cos.numel() == D;
  TORCH_CHECK(norms[0].numel() == C && norms[1].numel() == C && cos.numel() == sin.numel() &&
              (shared_rope || cos.numel() == B * D), "decode_block: norm or RoPE sizes");
  TORCH_CHECK(keys.scalar_type() == dtype && values.scalar_type() == dtype && keys.dim() == 4 &&
              keys.sizes() == values.sizes() && keys.strides() == values.strides() && keys.size(0) == B &&
              keys.size(1) == Hkv && keys.size(3) == D && keys.stride(3) == 1 && 0 <= pos && pos < keys.size(2),
              "decode_block: a (B, Hkv, T, D) cache in x's dtype with room at pos");
  const int64_t length = pos + 1;
  TORCH_CHECK(!visible || (visible->scalar_type() == at::kBool && visible->is_contiguous() &&
                           visible->numel() == B * length), "decode_block: visible must be (B, pos + 1) bool");

  thread_local std::vector<float> scratch;
  const int64_t rope_rows = shared_rope ? 1 : B;
  const int64_t widest = std::max({C, H * D, F});  // an AWQ-divided input
  scratch.resize(B * C + 2 * C + 2 * rope_rows * D + B * (3 * C + QKV + H * D + 3 * F + H * length) + B * widest);
  float* converted = scratch.data();  // x, the two norms and cos/sin as floats (bf16 models)
  float* y = converted + B * C + 2 * C + 2 * rope_rows * D;
  float* normed = y + B * C;
  float* qkv = normed + B * C;
  float* attended = qkv + B * QKV;
  float* projected = attended + B * H * D;
  float* gate_up = projected + B * C;
  float* act = gate_up + B * 2 * F;
  float* scores = act + B * F;
  float* divided = scores + B * H * length;
  // product i of `in` (B rows), its input first divided by the AWQ scale where the layer has one (as the
  // layer divides it: x / s in fp32)
  const auto project = [&](int i, const float* in, float* out) {
    if (divisors[i]) {
      const int64_t K = w[i].K;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) divided[b * K + k] = in[b * K + k] / divisors[i][k];
      in = divided;
    }
    product(w[i], in, B, out, isa);
  };
  const float* xin = floats(x, converted);
  const float* norm1 = floats(norms[0], converted + B * C);
  const float* norm2 = floats(norms[1], converted + B * C + C);
  const float* cosf = floats(cos, converted + B * C + 2 * C);
  const float* sinf = floats(sin, converted + B * C + 2 * C + rope_rows * D);

  for (int64_t b = 0; b < B; ++b) rms_norm(xin + b * C, norm1, C, eps[0], normed + b * C);
  project(0, normed, qkv);
  const int64_t head_stride = keys.stride(1), time_stride = keys.stride(2), batch_stride = keys.stride(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = shared_rope ? 0 : b;
    rope(qkv + b * QKV, H + Hkv, D, cosf + r * D, sinf + r * D);  // query and key heads
  }
  const bool* seen = visible ? visible->data_ptr<bool>() : nullptr;
  if (dtype == at::kFloat) {
    float* kc = keys.data_ptr<float>();
    float* vc = values.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t at = b * batch_stride + h * head_stride + pos * time_stride;
        std::memcpy(kc + at, qkv + b * QKV + (H + h) * D, D * sizeof(float));
        std::memcpy(vc + at, qkv + b * QKV + (H + Hkv + h) * D, D * sizeof(float));
      }
    attend(Attention<float>{qkv, kc, vc, seen, QKV, batch_stride, head_stride, time_stride, H, Hkv, D, length,
                            static_cast<float>(scale), scores, attended}, B, isa);
  } else {
    at::BFloat16* kc = keys.data_ptr<at::BFloat16>();
    at::BFloat16* vc = values.data_ptr<at::BFloat16>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) {  // rounded to nearest even, as the cache's copy_ would
          const int64_t at = b * batch_stride + h * head_stride + pos * time_stride + d;
          kc[at] = at::BFloat16(qkv[b * QKV + (H + h) * D + d]);
          vc[at] = at::BFloat16(qkv[b * QKV + (H + Hkv + h) * D + d]);
        }
    attend(Attention<uint16_t>{qkv, reinterpret_cast<const uint16_t*>(kc), reinterpret_cast<const uint16_t*>(vc),
                               seen, QKV, batch_stride, head_stride, time_stride, H, Hkv, D, length,
                               static_cast<float>(scale), scores, attended}, B, isa);
  }
  project(1, attended, projected);
  for (int64_t i = 0; i < B * C; ++i) y[i] = xin[i] + projected[i];
  for (int64_t b = 0; b < B; ++b) rms_norm(y + b * C, norm2, C, eps[1], normed + b * C);
  project(2, normed, gate_up);
  swiglu(gate_up, B, F, act, isa);
  project(3, act, projected);
  at::Tensor out = at::empty_like(x);
  if (dtype == at::kFloat) {
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < B * C; ++i) o[i] = y[i] + projected[i];
  } else {
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < B * C; ++i) o[i] = at::BFloat16(y[i] + projected[i]);
  }
  return out;
}

}  // namespace llmkit_lowbit

// Matrix products with 4-bit and 8-bit weights for llmkit's quantised layers (llmkit/layers/quantized.py).
//
// Decoding multiplies every weight matrix by a handful of activation rows; the time goes into streaming
// the weights from memory, so they stay packed (4 or 8 bits) and are expanded to fp32 in registers.
// Activations and accumulation stay fp32, so a product differs from the dequantised fp32 matmul only
// in the order of its sums.
//
// Layouts (exactly the layer's own buffers, no repacking):
//   int4: packed (N, K/2) uint8, column 2j in the low nibble of byte j, 2j+1 in the high nibble;
//         scale and offset (N, G) bf16 per group of G = K/group, w = (code − 8)·scale + offset
//   int8: codes (N, K) int8; scale (N, G) bf16, w = code·scale
// A group's part of row n·x is  scale·Σ code·x + (offset − 8·scale)·Σ x  (int4), so the inner loop
// is a dot product of codes with x and each group costs one scaling.
//
// Which loop runs (product(), run()): one activation row (decoding one sequence) takes four output rows
// side by side (one_row.inc: their FMA chains overlap, the codes are prefetched ahead); a few rows (a
// small decoding batch) go in tiles of WIDE_ROWS rows that share each expansion of the weights into their
// dequantised fp32 values (wide.inc: code·scale + minimum, rounded as the Python reference rounds it);
// from MANY_MIN_ROWS rows on (a prompt, a large batch) each band of weights is expanded once into a
// cached panel for all rows (many_rows.inc). Each is written once and compiled per vector width; the
// portable path (*_rows_portable: per-group sums for up to 4 rows) serves other CPUs. All accumulate in
// fp32; the tests bound each against the dequantised fp32 matmul.
//
// The vector width is chosen at run time (the `isa` argument: 2 AVX-512, 1 AVX2, 0 portable C++) from
// what the CPU reports and what torch's own kernels use (ATEN_CPU_CAPABILITY), one binary for all.
// Threads: torch's intra-op pool (at::parallel_for), so torch.set_num_threads governs them too.
// decode_block.cpp builds one decoder block on product(); lowbit.h is what the two share.

#include "lowbit.h"

namespace llmkit_lowbit {
namespace {

constexpr int MAX_ROWS = 4;    // activation rows sharing one expansion of the weights
// Two rows or more: rows per tile of the kernel that expands the weights fully (wide.inc).
// Measured on SmolLM2's four block layers (1 thread, CPU time, Zen 5): tiles of 4 rows 0.071 ms a row
// (AVX-512) and 0.09-0.10 (AVX2), against 0.10 and 0.14-0.15 for the per-row kernel's tiles; tiles of 8
// were no faster on AVX-512 (0.06-0.09) and would spill AVX2's 16 registers; AVX2 tiles of 8 rows with
// one accumulator each were slower again (all four layers, 16 rows, 2 threads: 0.93 ms against 0.77).
constexpr int WIDE_ROWS = 4;


// Everything one product needs, with x rearranged once per call: within each block of 32 columns the
// 16 even columns first, then the 16 odd ones (int4: the low and the high nibbles of 16 bytes);
// `sums` holds Σx per group and row (int4's offset term).
struct Problem {
  const uint8_t* codes;     // int4: packed nibbles; int8: int8 codes
  const uint16_t* scales;   // (N, G) bf16
  const uint16_t* offsets;  // (N, G) bf16, int4 only
  const float* x;           // (rows, K), rearranged for int4
  const float* sums;        // (rows, G), int4 only
  const float* bias;        // (N,) or null
  float* out;               // (rows, N)
  int64_t rows, K, N, G, group;
};

// ---- int4 --------------------------------------------------------------------------------------

// Portable reference of the kernel's arithmetic (any CPU; also what the vector paths compute).
template <int R>
void int4_rows_portable(const Problem& p, int64_t row0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = p.codes + n * (p.K / 2);
    const uint16_t* scales = p.scales + n * p.G;
    const uint16_t* offsets = p.offsets + n * p.G;
    float totals[R] = {};
    for (int64_t g = 0; g < p.G; ++g) {
      const float scale = bf16_to_float(scales[g]), offset = bf16_to_float(offsets[g]);
      const float minimum = offset - 8.f * scale;
      float acc[R] = {};
      for (int64_t col = g * p.group; col < (g + 1) * p.group; col += BLOCK) {
        for (int i = 0; i < 16; ++i) {
          const uint8_t byte = c[col / 2 + i];
          const float lo = static_cast<float>(byte & 15), hi = static_cast<float>(byte >> 4);
          for (int r = 0; r < R; ++r) {
            const float* x = p.x + (row0 + r) * p.K + col;
            acc[r] += lo * x[i] + hi * x[16 + i];
          }
        }
      }
      for (int r = 0; r < R; ++r) totals[r] += scale * acc[r] + minimum * p.sums[(row0 + r) * p.G + g];
    }
    for (int r = 0; r < R; ++r) p.out[(row0 + r) * p.N + n] = totals[r] + (p.bias ? p.bias[n] : 0.f);
  }
}

// Row n's scales as floats in `sc` and, for int4, its offset term Σ_g (offset − 8·scale)·Σx_g per
// activation row in `minimum`: vector work once per row, so the loop over groups only broadcasts.
template <int R>
__attribute__((always_inline)) inline void row_params(const Problem& p, int64_t n, int64_t row0, float* sc,
                                                      float* minimum) {
  const uint16_t* s = p.scales + n * p.G;
#pragma omp simd
  for (int64_t g = 0; g < p.G; ++g) sc[g] = bf16_to_float(s[g]);
  for (int r = 0; r < R; ++r) minimum[r] = 0.f;
  if (!p.offsets) return;
  const uint16_t* o = p.offsets + n * p.G;
  for (int r = 0; r < R; ++r) {
    const float* sums = p.sums + (row0 + r) * p.G;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t g = 0; g < p.G; ++g) total += (bf16_to_float(o[g]) - 8.f * sc[g]) * sums[g];
    minimum[r] = total;
  }
}

// One activation row (decoding one sequence): NB output rows at a time, so that their NB chains of
// FMAs run side by side (one output row's chain left the core waiting on FMA latency: 15 G MACs/s on
// Zen 5 against 41 for four activation rows) and each load of x serves NB rows. The arithmetic per
// output row is the portable kernel's: per group Σ code·x, scaled once, plus the offset term from
// row_params.
constexpr int NB = 4;

// The NB rows' codes are read side by side, which the hardware prefetchers follow worse than one row
// after another (SmolLM2's int8 head streamed at half speed from memory without this): group g of a
// block of output rows asks for its share of the block PREFETCH_BLOCKS ahead.
constexpr int64_t PREFETCH_BLOCKS = 2;
inline void prefetch_ahead(const uint8_t* block, int64_t block_bytes, int64_t g, int64_t G) {
  const char* ahead = reinterpret_cast<const char*>(block) + PREFETCH_BLOCKS * block_bytes;
  for (int64_t off = g * block_bytes / G; off < (g + 1) * block_bytes / G; off += 64)
    _mm_prefetch(ahead + off, _MM_HINT_T0);
}

// Many rows (many_rows.inc): the fp32 weights a task expands at a time (128 KB: a band of rows that stays
// in a core's L2 cache while every activation row passes; SmolLM2's block layers at 512 rows: 268 / 425 ms
// AVX-512 / AVX2, against 277 / 430 with 64 KB and 273 / 425 with 256 KB). Per width
// below: the tile of activation × weight rows (all of AVX2's 16 vector registers: 12 sums, 3 weights, 1
// activation; AVX-512 6 × 4 of its 32: 24 sums; 4 × 4 was ~10 % slower), and from how many rows the
// panel beats the few-row kernels (measured on SmolLM2's 120 block layers, Zen 5, 2 threads: AVX-512
// 6.5 against 7.2 ms at 4 rows and 12.1 against 9.8 at 8; AVX2 7.0 against 9.1 at 4, 13.1 against 12.4
// at 8).
constexpr int64_t PANEL_BYTES = int64_t{1} << 17;
constexpr int64_t TASKS_PER_THREAD = 4;  // a small weight still spreads over every thread

// Written once (wide.inc, one_row.inc, many_rows.inc) and compiled for each vector width with its
// operations (lowbit.h); the one-row kernel's last output rows, after its whole groups of NB, go to wide<1>.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
namespace on_avx512 {
using namespace llmkit_lowbit::avx512;
constexpr int MANY_MR = 6, MANY_NR = 4, MANY_MIN_ROWS = 6;
#include "wide.inc"
#include "one_row.inc"
#include "many_rows.inc"
}  // namespace on_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace on_avx2 {
using namespace llmkit_lowbit::avx2;
constexpr int MANY_MR = 4, MANY_NR = 3, MANY_MIN_ROWS = 8;
#include "wide.inc"
#include "one_row.inc"
#include "many_rows.inc"
}  // namespace on_avx2
#pragma GCC pop_options

// ---- int8 --------------------------------------------------------------------------------------

template <int R>
void int8_rows_portable(const Problem& p, int64_t row0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* c = reinterpret_cast<const int8_t*>(p.codes) + n * p.K;
    float totals[R] = {};
    for (int64_t g = 0; g < p.G; ++g) {
      const float scale = bf16_to_float(p.scales[n * p.G + g]);
      float acc[R] = {};
      for (int64_t col = g * p.group; col < (g + 1) * p.group; ++col)
        for (int r = 0; r < R; ++r) acc[r] += static_cast<float>(c[col]) * p.x[(row0 + r) * p.K + col];
      for (int r = 0; r < R; ++r) totals[r] += scale * acc[r];
    }
    for (int r = 0; r < R; ++r) p.out[(row0 + r) * p.N + n] = totals[r] + (p.bias ? p.bias[n] : 0.f);
  }
}

// ---- dispatch ----------------------------------------------------------------------------------

using RowsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

// the portable kernels of r ≤ MAX_ROWS rows (the vector paths run one_row, wide and product_many)
RowsFn portable_rows(bool int4, int r) {
  switch (r) {
    case 1: return int4 ? int4_rows_portable<1> : int8_rows_portable<1>;
    case 2: return int4 ? int4_rows_portable<2> : int8_rows_portable<2>;
    case 3: return int4 ? int4_rows_portable<3> : int8_rows_portable<3>;
    default: return int4 ? int4_rows_portable<4> : int8_rows_portable<4>;
  }
}

RowsFn one_row_kernel(bool int4, int64_t isa) {
  if (isa >= 2) return int4 ? on_avx512::one_row<true> : on_avx512::one_row<false>;
  return int4 ? on_avx2::one_row<true> : on_avx2::one_row<false>;
}

template <int R>
RowsFn wide_of(bool int4, int64_t isa) {
  if (int4) return isa >= 2 ? on_avx512::wide<R, true> : on_avx2::wide<R, true>;
  return isa >= 2 ? on_avx512::wide<R, false> : on_avx2::wide<R, false>;
}

RowsFn wide_kernel(bool int4, int64_t isa, int64_t r) {
  return r == 2 ? wide_of<2>(int4, isa) : r == 3 ? wide_of<3>(int4, isa) : wide_of<WIDE_ROWS>(int4, isa);
}

void run(Problem p, bool int4, int64_t isa) {
  // Each task takes a band of output rows: ~64 KB of codes, so a few tasks per thread even for small layers.
  const int64_t bytes_per_row = int4 ? p.K / 2 : p.K;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(bytes_per_row, 1));
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    // vector paths: one row alone, else tiles of WIDE_ROWS rows (the last tile 1 to WIDE_ROWS rows)
    for (int64_t row0 = 0; isa >= 1 && row0 < p.rows;) {
      const int64_t r = std::min<int64_t>(WIDE_ROWS, p.rows - row0);
      (r == 1 ? one_row_kernel(int4, isa) : wide_kernel(int4, isa, r))(p, row0, n0, n1);
      row0 += r;
    }
    for (int64_t row0 = 0; isa == 0 && row0 < p.rows; row0 += MAX_ROWS)
      portable_rows(int4, static_cast<int>(std::min<int64_t>(MAX_ROWS, p.rows - row0)))(p, row0, n0, n1);
  });
}

}  // namespace

Weight weight_of(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& offset, int64_t group,
                 const std::optional<at::Tensor>& bias) {
  const bool int4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 2, "llmkit lowbit kernels take 2-d weights on the CPU");
  TORCH_CHECK(int4 || codes.scalar_type() == at::kChar, "codes must be uint8 (packed int4) or int8");
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == at::kBFloat16,
              "codes and a bf16 scale, contiguous");
  const int64_t N = codes.size(0), K = int4 ? codes.size(1) * 2 : codes.size(1);
  TORCH_CHECK(group % BLOCK == 0 && scale.dim() == 2 && scale.size(0) == N && scale.size(1) * group == K,
              "shapes do not fit together (groups must be whole blocks of 32 columns)");
  TORCH_CHECK(!int4 || (offset.sizes() == scale.sizes() && offset.is_contiguous() &&
                        offset.scalar_type() == at::kBFloat16), "int4: a bf16 offset shaped like the scale");
  TORCH_CHECK(!bias || (bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kFloat),
              "bias must be float32 with one value per output");
  return Weight{int4, reinterpret_cast<const uint8_t*>(codes.data_ptr()), bf16_data(scale),
                int4 ? bf16_data(offset) : nullptr, bias ? bias->data_ptr<float>() : nullptr, N, K, scale.size(1),
                group};
}

// out (M, N) = x (M, K) times w's weight, plus its bias.
void product(const Weight& w, const float* x, int64_t M, float* out, int64_t isa) {
  if (isa >= 2 && M >= on_avx512::MANY_MIN_ROWS) {  // many rows: the weights expanded once (many_rows.inc)
    (w.int4 ? on_avx512::product_many<true> : on_avx512::product_many<false>)(w, x, M, out);
    return;
  }
  if (isa == 1 && M >= on_avx2::MANY_MIN_ROWS) {
    (w.int4 ? on_avx2::product_many<true> : on_avx2::product_many<false>)(w, x, M, out);
    return;
  }
  if (!w.int4) {
    run(Problem{w.codes, w.scales, nullptr, x, nullptr, w.bias, out, M, w.K, w.N, w.G, w.group}, false, isa);
    return;
  }
  // x rearranged (per block of 32: the even columns, then the odd) and Σx per group, once for all
  // outputs, in scratch kept between calls (one per calling thread)
  const int64_t K = w.K, G = w.G;
  thread_local std::vector<float> arranged, sums;
  arranged.resize(M * K);
  sums.resize(M * G);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = x + m * K;
    float* b = arranged.data() + m * K;
    for (int64_t col = 0; col < K; col += BLOCK)
      for (int i = 0; i < 16; ++i) {
        b[col + i] = a[col + 2 * i];
        b[col + 16 + i] = a[col + 2 * i + 1];
      }
    for (int64_t g = 0; g < G; ++g) {
      float total = 0.f;
      for (int64_t col = g * w.group; col < (g + 1) * w.group; ++col) total += a[col];
      sums[m * G + g] = total;
    }
  }
  run(Problem{w.codes, w.scales, w.offsets, arranged.data(), sums.data(), w.bias, out, M, K, w.N, G, w.group}, true,
      isa);
}

namespace {

// x (…, K) times a quantised weight (N, K): (…, N) in x's dtype. act_scale (K,), optional: x is divided
// by it first (AWQ multiplied the weight by it). `offset` is ignored for int8 codes.
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const at::Tensor& offset, int64_t group, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& act_scale, int64_t isa) {
  const Weight w = weight_of(codes, scale, offset, group, bias);
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
              x.size(-1) == w.K, "x must be float32 or bfloat16 on the CPU, (…, in_features)");
  at::Tensor rows = x.reshape({-1, w.K}).to(at::kFloat).contiguous();
  if (act_scale) rows = rows.div(*act_scale);
  at::Tensor out = at::empty({rows.size(0), w.N}, rows.options());
  product(w, rows.data_ptr<float>(), rows.size(0), out.data_ptr<float>(), isa);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.N;
  out = out.view(shape);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// The weight (N, K) as the Python reference computes it: code·scale, then + (offset − 8·scale), each
// rounded in fp32 (the build passes -ffp-contract=off: no fused multiply-add), so bit-identical to it;
// into the first N·K elements of `out` (fp32, or bf16 rounded to nearest even, as .to(bfloat16)).
// Prefill reuses one buffer for every layer: a fresh multi-megabyte tensor per product costs page
// faults worth several times the dequantisation itself.
void int4_dequantize_into(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset, int64_t group,
                          const at::Tensor& out, int64_t isa) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = scale.size(1);
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && offset.is_contiguous() && G * group == K &&
              group % 2 == 0 && packed.scalar_type() == at::kByte && scale.scalar_type() == at::kBFloat16 &&
              offset.scalar_type() == at::kBFloat16 && offset.sizes() == scale.sizes(),
              "int4 shapes do not fit together");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == at::kFloat) && out.is_contiguous() && out.numel() >= N * K,
              "out must be a contiguous fp32 or bf16 buffer of at least N·K elements");
  const Weight w{true, packed.data_ptr<uint8_t>(), bf16_data(scale), bf16_data(offset), nullptr, N, K, G, group};
  const bool vector = isa >= 1 && group % BLOCK == 0;  // the vector paths expand whole blocks of 32
  float* out32 = bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* out16 = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    std::vector<float> row(bf16 ? K : 0);
    for (int64_t n = n0; n < n1; ++n) {
      float* o = bf16 ? row.data() : out32 + n * K;
      if (vector && isa >= 2) {
        on_avx512::expand_rows<true>(w, n, n + 1, o, K);
      } else if (vector) {
        on_avx2::expand_rows<true>(w, n, n + 1, o, K);
      } else {
        for (int64_t g = 0; g < G; ++g) {
          const float s = bf16_to_float(w.scales[n * G + g]), minimum = bf16_to_float(w.offsets[n * G + g]) - 8.f * s;
          const uint8_t* cb = w.codes + n * (K / 2) + g * group / 2;
          float* og = o + g * group;
          for (int64_t j = 0; j < group / 2; ++j) {
            og[2 * j] = static_cast<float>(cb[j] & 15) * s + minimum;
            og[2 * j + 1] = static_cast<float>(cb[j] >> 4) * s + minimum;
          }
        }
      }
      if (bf16)
        for (int64_t k = 0; k < K; ++k) out16[n * K + k] = at::BFloat16(o[k]);
    }
  });
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                           int64_t group, int64_t isa) {
  at::Tensor w = at::empty({packed.size(0), packed.size(1) * 2}, packed.options().dtype(at::kFloat));
  int4_dequantize_into(packed, scale, offset, group, w, isa);
  return w;
}

// How many of the intra-op pool's threads a parallel loop of `tasks` tasks ran on (the tests' proof that
// the products are spread over torch.set_num_threads threads, not run on the calling one)
int64_t parallel_threads(int64_t tasks) {
  std::vector<int> ran(std::max<int64_t>(at::get_num_threads(), 1), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

int64_t supported_isa(int64_t wanted) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  if (wanted >= 2 && avx512) return 2;
  if (wanted >= 1 && avx2) return 1;
  return 0;
}

}  // namespace
}  // namespace llmkit_lowbit

using namespace llmkit_lowbit;

TORCH_LIBRARY(llmkit_lowbit, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor scale, Tensor offset, int group, Tensor? bias, Tensor? act_scale, "
        "int isa) -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor scale, Tensor offset, int group, int isa) -> Tensor");
  m.def("int4_dequantize_into(Tensor packed, Tensor scale, Tensor offset, int group, Tensor(a!) out, int isa) -> ()");
  m.def("decode_block(Tensor x, Tensor[] weights, int[] groups, Tensor?[] biases, Tensor?[] act_scales, "
        "Tensor[] norms, float[] eps, "
        "Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, int pos, Tensor? visible, int[] heads, "
        "float scale, int isa) "
        "-> Tensor");
  m.def("supported_isa(int wanted) -> int", &supported_isa);  // the best of `wanted` this CPU runs
  m.def("parallel_threads(int tasks) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(llmkit_lowbit, CPU, m) {
  m.impl("linear", lowbit_linear);
  m.impl("int4_dequantize", int4_dequantize);
  m.impl("int4_dequantize_into", int4_dequantize_into);
  m.impl("decode_block", decode_block);
}

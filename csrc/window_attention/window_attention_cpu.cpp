// Fused shifted-window attention on the CPU: forward, and a FlashAttention-style backward that recomputes the scores
// from the saved log-sum-exp.
//
// One task = one window of one sample; inside it, one head at a time. The window's valid tokens (padding is
// dropped, not masked) are gathered from the strided (B, T, H, W, heads, head_dim) grids straight into small fp32
// scratch matrices (49 x 32 at Swin-T: L1-resident), scores, bias, shift mask, softmax and both products run there,
// and results are scattered back to the grids. Nothing of size window^2 reaches memory, no partition/reverse copy is
// made, and the only allocations are the outputs: on these VMs a fresh 10 MB tensor costs ~3 ms of page faults, as
// much as the arithmetic of a whole Swin-T stage-1 attention.
//
// The products use a register-tiled fp32 micro-kernel (4 x 16 tiles) compiled for AVX-512, AVX2+FMA and baseline
// x86-64 and picked at load time (GCC target_clones); ~95 GFLOP/s per EPYC core at 49 x 49 x 32. The AVX2+FMA
// clone is named by ISA level (x86-64-v3: AVX2, FMA, BMI, F16C...), which the resolver checks feature by feature;
// "arch=haswell" was dispatched by CPU model (__builtin_cpu_is), so every CPU that is not an Intel Haswell, AMD EPYC
// without AVX-512 included, ran the baseline SSE2 clone: 4-6x slower (2026-11-30, AMD EPYC with AVX2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "window_attention_geometry.h"
#include "../common/format.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define FK_CPU_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))  // no ISA-level dispatch before 12
#else
#define FK_CPU_CLONES
#endif
#if defined(__GNUC__)
#define FK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FK_ALWAYS_INLINE inline
#endif

namespace florence {
namespace {

constexpr float kShiftMask = -100.0f;  // Swin's additive mask between shift regions
constexpr int64_t kRowPad = 16;       // scratch rows/columns are padded to this (the micro-kernel's tile width)

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// --- fp32 micro-GEMM ------------------------------------------------------------------------------------------------

// 16 floats, written with GCC/Clang vector extensions: one zmm in the AVX-512 clone, two ymm in the AVX2 one, four
// xmm in the baseline one. (Plain loops got vectorised across rows with shuffles for the 16-wide tile.)
typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_unaligned __attribute__((vector_size(64), aligned(4)));

// C[MR x 16 NV] = alpha * sum_k A(r, k) B[k, :]. A(r, k) = A[r * a_rs + k * a_ks] (any layout: A is broadcast), B and
// C row-major. The MR x NV accumulators stay in registers.
template <int MR, int NV>
FK_ALWAYS_INLINE void gemm_tile(int64_t K, float alpha, const float* A, int64_t a_rs, int64_t a_ks, const float* B,
                                int64_t ldb, float* C, int64_t ldc) {
  v16f acc[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    v16f b[NV];
    for (int c = 0; c < NV; ++c) b[c] = *reinterpret_cast<const v16f_unaligned*>(B + k * ldb + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * a_rs + k * a_ks];
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) *reinterpret_cast<v16f_unaligned*>(C + r * ldc + 16 * c) = alpha * acc[r][c];
}

// C[0:M, 0:N] = alpha * A[0:M, 0:K] B[0:K, 0:N], K exact. M is rounded up to 4 and N to 16: rows/columns past M/N are
// computed from (finite) scratch contents and ignored by the callers, whose buffers hold round_up(., 16) of both.
// The 4 x 32 tile's accumulators are 8 zmm under AVX-512 but 16 ymm under AVX2, all of its registers: there it spills
// on every k (measured 2026-11-30 on an AMD EPYC with AVX2: the kernel 4x slower than the reference). Without
// AVX-512 the 4 x 16 tile only (8 ymm accumulators, 2 for B).
FK_CPU_CLONES void gemm_f32(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_rs, int64_t a_ks,
                            const float* B, int64_t ldb, float* C, int64_t ldc) {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool wide_tiles = __builtin_cpu_supports("avx512f");
#else
  constexpr bool wide_tiles = false;  // NEON / baseline: 16-wide vectors are four registers already
#endif
  for (int64_t i = 0; i < M; i += 4) {
    int64_t j = 0;
    if (wide_tiles)
      for (; j + 32 <= N; j += 32)
        gemm_tile<4, 2>(K, alpha, A + i * a_rs, a_rs, a_ks, B + j, ldb, C + i * ldc + j, ldc);
    for (; j < N; j += 16) gemm_tile<4, 1>(K, alpha, A + i * a_rs, a_rs, a_ks, B + j, ldb, C + i * ldc + j, ldc);
  }
}

// exp(x) for x <= 0 (softmax arguments after the max is subtracted): Cody-Waite reduction and a degree-6 polynomial,
// written so that GCC vectorises the loops that call it (max relative error 1e-7 on [-87, 0]).
FK_ALWAYS_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// Sum with 16 independent partial sums (vectorisable without reassociation flags).
FK_ALWAYS_INLINE float sum16(const float* x, int64_t n) {
  float acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += x[j + l];
  float s = 0.0f;
  for (; j < n; ++j) s += x[j];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

// Scores of query i: row[j] = scale * row[j] + bias_row[j] + mask, j < n (bias_row already in valid-key order).
FK_CPU_CLONES void score_row(float* row, int64_t n, float scale, const float* bias_row, const int32_t* region,
                             int32_t region_i) {
  if (bias_row != nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] * scale + bias_row[j];
  } else {
    for (int64_t j = 0; j < n; ++j) row[j] *= scale;
  }
  if (region != nullptr) {
    for (int64_t j = 0; j < n; ++j) row[j] += region[j] != region_i ? kShiftMask : 0.0f;
  }
}

// Maximum with 16 independent partial maxima (a plain max reduction vectorises only under -ffast-math).
FK_ALWAYS_INLINE float max16(const float* x, int64_t n) {
  float acc[16];
  for (int l = 0; l < 16; ++l) acc[l] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  for (int l = 0; l < 16; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// Softmax of one score row in place; returns its log-sum-exp.
FK_CPU_CLONES float softmax_row(float* row, int64_t n) {
  const float m = max16(row, n);
  for (int64_t j = 0; j < n; ++j) row[j] = exp_nonpositive(row[j] - m);
  const float s = sum16(row, n);
  const float inv = 1.0f / s;
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  return m + std::log(s);
}

// Backward of one row: p = exp(score - lse) (recomputed), dp -> ds = p * (dp - D).
FK_CPU_CLONES void softmax_backward_row(float* p, float* dp, int64_t n, float lse, float delta) {
  for (int64_t j = 0; j < n; ++j) p[j] = exp_nonpositive(p[j] - lse);
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// --- one window's tokens --------------------------------------------------------------------------------------------

// Strides of a (B, T, H, W, heads, head_dim) grid.
struct Grid {
  int64_t s[6];
  int64_t token(int64_t b, int64_t t, int64_t h, int64_t w) const { return b * s[0] + t * s[1] + h * s[2] + w * s[3]; }
};

Grid grid_of(const at::Tensor& x) { return {{x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4), x.stride(5)}}; }

// The valid (non-padding) tokens of window `row`, in window order: in-window position, grid coordinates, region.
struct WindowTokens {
  int64_t count = 0, b = 0;
  bool mixed_regions = false;  // any two tokens in different shift regions (the mask applies)
  std::vector<int64_t> n, t, h, w;
  std::vector<int32_t> region;

  explicit WindowTokens(int64_t N) : n(N), t(N), h(N), w(N), region(N) {}

  void load(const WindowGeometry& g, int64_t row) {
    count = 0;
    const int64_t win = row % g.windows_per_sample();
    for (int64_t k = 0; k < g.tokens_per_window(); ++k) {
      int64_t tt, hh, ww;
      if (!partition_source(g, row, k, &b, &tt, &hh, &ww)) continue;
      n[count] = k;
      t[count] = tt;
      h[count] = hh;
      w[count] = ww;
      region[count] = static_cast<int32_t>(token_region(g, win, k));
      ++count;
    }
    mixed_regions = false;
    for (int64_t i = 1; i < count; ++i) mixed_regions |= region[i] != region[0];
  }

};

// Every head of the window's tokens, token-major: dst[i * ld + head * D + d] in fp32 (one contiguous read per token
// when heads and head_dim are packed, as in a qkv projection's output).
template <typename scalar_t>
void gather_tokens(const scalar_t* src, const Grid& x, const WindowTokens& tok, int64_t heads, int64_t D, float* dst,
                   int64_t ld) {
  const bool packed = x.s[5] == 1 && x.s[4] == D;
  for (int64_t i = 0; i < tok.count; ++i) {
    const scalar_t* p = src + x.token(tok.b, tok.t[i], tok.h[i], tok.w[i]);
    float* o = dst + i * ld;
    if (packed) {
      for (int64_t c = 0; c < heads * D; ++c) o[c] = static_cast<float>(p[c]);
    } else {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < D; ++d) o[h * D + d] = static_cast<float>(p[h * x.s[4] + d * x.s[5]]);
    }
  }
}

template <typename scalar_t>
void scatter_tokens(const float* src, int64_t ld, const WindowTokens& tok, int64_t heads, int64_t D, scalar_t* dst,
                    const Grid& x) {
  const bool packed = x.s[5] == 1 && x.s[4] == D;
  for (int64_t i = 0; i < tok.count; ++i) {
    scalar_t* p = dst + x.token(tok.b, tok.t[i], tok.h[i], tok.w[i]);
    const float* s = src + i * ld;
    if (packed) {
      for (int64_t c = 0; c < heads * D; ++c) p[c] = static_cast<scalar_t>(s[c]);
    } else {
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < D; ++d) p[h * x.s[4] + d * x.s[5]] = static_cast<scalar_t>(s[h * D + d]);
    }
  }
}

// One head's columns of a token-major scratch, transposed: dst[d * ld + i] = src[i * lds + d] for i < n.
void transpose_head(const float* src, int64_t lds, int64_t n, int64_t D, float* dst, int64_t ld) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < D; ++d) dst[d * ld + i] = src[i * lds + d];
}

// --- shared setup ---------------------------------------------------------------------------------------------------

struct Problem {
  WindowGeometry g;
  NominalWindow nom;
  int64_t heads, D, N;
  float scale;
  bool has_bias;
};

void check_grid(const at::Tensor& x, const char* name, const at::Tensor& q) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 6, name, ": expected (B, T, H, W, num_heads, head_dim), got shape ", sizes_str(x.sizes()));
  TORCH_CHECK(x.sizes() == q.sizes(), name, ": expected shape ", sizes_str(q.sizes()), " (that of q), got ",
              sizes_str(x.sizes()));
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " (that of q), got ",
              x.scalar_type());
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& table,
                     at::IntArrayRef window_size, at::IntArrayRef shift_size, at::IntArrayRef nominal, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "q: expected a CPU tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 6, "q: expected (B, T, H, W, num_heads, head_dim), got shape ", sizes_str(q.sizes()));
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "q: expected float32, float16 or bfloat16, got ", dt);
  check_grid(k, "k", q);
  check_grid(v, "v", q);
  TORCH_CHECK(window_size.size() == 3 && shift_size.size() == 3 && nominal.size() == 3,
              "window_size, shift_size, nominal_window: expected 3 values each, got ", sizes_str(window_size), ", ",
              sizes_str(shift_size), ", ", sizes_str(nominal));
  Problem pb;
  auto& g = pb.g;
  g.B = q.size(0);
  g.T = q.size(1);
  g.H = q.size(2);
  g.W = q.size(3);
  g.C = q.size(4) * q.size(5);
  g.wt = window_size[0];
  g.wh = window_size[1];
  g.ww = window_size[2];
  g.st = shift_size[0];
  g.sh = shift_size[1];
  g.sw = shift_size[2];
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(window_size[i] > 0 && window_size[i] <= nominal[i] && shift_size[i] >= 0 &&
                    shift_size[i] < window_size[i],
                "window_size/shift_size: expected 0 < window <= nominal window and 0 <= shift < window, got window ",
                sizes_str(window_size), ", shift ", sizes_str(shift_size), ", nominal ", sizes_str(nominal));
  }
  g.nT = (g.T + g.wt - 1) / g.wt;
  g.nH = (g.H + g.wh - 1) / g.wh;
  g.nW = (g.W + g.ww - 1) / g.ww;
  pb.nom = {nominal[0], nominal[1], nominal[2]};
  pb.heads = q.size(4);
  pb.D = q.size(5);
  pb.N = g.tokens_per_window();
  pb.scale = static_cast<float>(scale);
  pb.has_bias = table.has_value() && table->defined();
  if (pb.has_bias) {
    const auto& tb = *table;
    TORCH_CHECK(tb.device().is_cpu(), "rel_pos_bias: expected a CPU tensor, got device ", tb.device());
    TORCH_CHECK(tb.dim() == 2 && tb.size(0) == bias_table_rows(pb.nom) && tb.size(1) == pb.heads,
                "rel_pos_bias: expected shape [", bias_table_rows(pb.nom), ", ", pb.heads,
                "] ((2Wt-1)(2Wh-1)(2Ww-1), num_heads), got ", sizes_str(tb.sizes()));
  }
  return pb;
}

// (heads, N, N) fp32 bias of every (query, key) pair of the effective window, gathered once per call.
std::vector<float> dense_bias(const Problem& pb, const at::Tensor& table) {
  const auto tf = table.to(at::kFloat).contiguous();
  const float* t = tf.data_ptr<float>();
  const int64_t N = pb.N, nh = pb.heads;
  std::vector<float> out(nh * N * N);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const int64_t r = relative_bias_row(pb.g, pb.nom, i, j);
      for (int64_t h = 0; h < nh; ++h) out[(h * N + i) * N + j] = t[r * nh + h];
    }
  return out;
}

// Bias of query i against the valid keys, in valid-key order: the dense row itself when no token is padding.
const float* bias_row(const Problem& pb, const std::vector<float>& dense, const WindowTokens& tok, int64_t head,
                      int64_t i, std::vector<float>& buf) {
  const float* row = dense.data() + (head * pb.N + tok.n[i]) * pb.N;
  if (tok.count == pb.N) return row;
  for (int64_t j = 0; j < tok.count; ++j) buf[j] = row[tok.n[j]];
  return buf.data();
}

// --- forward --------------------------------------------------------------------------------------------------------

// Scratch layout of one task: token-major matrices (Np rows, ld Cp) hold every head of the window (head h in columns
// [h * D, h * D + D)); per head, products read and write column blocks of them. A product's output tile is 16 wide,
// so head h may write past its D columns into head h + 1's block (rewritten next) or into the spare 16 columns of Cp.
struct Scratch {
  int64_t Np, Dp, Cp;
  Scratch(int64_t N, int64_t heads, int64_t D)
      : Np(round_up(N, kRowPad)), Dp(round_up(D, kRowPad)), Cp(round_up(heads * D, kRowPad) + kRowPad) {}
  std::vector<float> tokens() const { return std::vector<float>(Np * Cp); }  // zeroed: padding is always finite
  std::vector<float> square() const { return std::vector<float>(Np * Np); }
  std::vector<float> transposed() const { return std::vector<float>(Dp * Np); }
};

template <typename scalar_t>
void forward_impl(const Problem& pb, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::vector<float>& dense, at::Tensor& out, at::Tensor& lse) {
  const auto& g = pb.g;
  const Grid gq = grid_of(q), gk = grid_of(k), gv = grid_of(v), go = grid_of(out);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const int64_t N = pb.N, D = pb.D, nh = pb.heads;
  const Scratch sc(N, nh, D);
  const int64_t Np = sc.Np, Cp = sc.Cp;
  at::parallel_for(0, g.num_rows(), 1, [&](int64_t begin, int64_t end) {
    WindowTokens tok(N);
    auto Q = sc.tokens(), K = sc.tokens(), V = sc.tokens(), O = sc.tokens();
    auto S = sc.square(), Kt = sc.transposed();
    std::vector<float> brow(Np);
    for (int64_t row = begin; row < end; ++row) {
      tok.load(g, row);
      const int64_t n = tok.count;
      const int32_t* region = tok.mixed_regions ? tok.region.data() : nullptr;
      gather_tokens(qp, gq, tok, nh, D, Q.data(), Cp);
      gather_tokens(kp, gk, tok, nh, D, K.data(), Cp);
      gather_tokens(vp, gv, tok, nh, D, V.data(), Cp);
      for (int64_t head = 0; head < nh; ++head) {
        const int64_t c0 = head * D;
        transpose_head(K.data() + c0, Cp, n, D, Kt.data(), Np);
        gemm_f32(n, n, D, 1.0f, Q.data() + c0, Cp, 1, Kt.data(), Np, S.data(), Np);  // S = Q K^T
        float* lse_row = lp + (row * nh + head) * N;
        for (int64_t i = 0; i < n; ++i) {
          float* s = S.data() + i * Np;
          const float* b = pb.has_bias ? bias_row(pb, dense, tok, head, i, brow) : nullptr;
          score_row(s, n, pb.scale, b, region, tok.region[i]);
          lse_row[tok.n[i]] = softmax_row(s, n);
        }
        gemm_f32(n, D, n, 1.0f, S.data(), Np, 1, V.data() + c0, Cp, O.data() + c0, Cp);  // O = P V
      }
      scatter_tokens(O.data(), Cp, tok, nh, D, op, go);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const c10::optional<at::Tensor>& table,
                                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                        at::IntArrayRef nominal_window, double scale) {
  const Problem pb = make_problem(q, k, v, table, window_size, shift_size, nominal_window, scale);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  // Positions that are padding in a window keep 0 (never read).
  auto lse = at::zeros({pb.g.num_rows(), pb.heads, pb.N}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const std::vector<float> dense = pb.has_bias ? dense_bias(pb, *table) : std::vector<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_fwd_cpu",
                                  [&] { forward_impl<scalar_t>(pb, q, k, v, dense, out, lse); });
  return {out, lse};
}

// --- backward -------------------------------------------------------------------------------------------------------

template <typename scalar_t>
void backward_impl(const Problem& pb, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::vector<float>& dense,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, std::vector<std::vector<float>>& dbias) {
  const auto& g = pb.g;
  const Grid gq = grid_of(q), gk = grid_of(k), gv = grid_of(v), go = grid_of(out), gdo = grid_of(dout);
  const Grid gdq = grid_of(dq), gdk = grid_of(dk), gdv = grid_of(dv);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t *op = out.data_ptr<scalar_t>(), *dop = dout.data_ptr<scalar_t>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  const int64_t N = pb.N, D = pb.D, nh = pb.heads;
  const Scratch sc(N, nh, D);
  const int64_t Np = sc.Np, Cp = sc.Cp;
  at::parallel_for(0, g.num_rows(), 1, [&](int64_t begin, int64_t end) {
    WindowTokens tok(N);
    auto Q = sc.tokens(), K = sc.tokens(), V = sc.tokens(), O = sc.tokens(), dO = sc.tokens();
    auto dQ = sc.tokens(), dK = sc.tokens(), dV = sc.tokens();
    auto P = sc.square(), dP = sc.square(), Kt = sc.transposed(), Vt = sc.transposed();
    std::vector<float> brow(Np), delta(Np);
    float* db = nullptr;
    if (pb.has_bias) {
      auto& mine = dbias[at::get_thread_num()];
      if (mine.empty()) mine.assign(nh * N * N, 0.0f);
      db = mine.data();
    }
    for (int64_t row = begin; row < end; ++row) {
      tok.load(g, row);
      const int64_t n = tok.count;
      const int32_t* region = tok.mixed_regions ? tok.region.data() : nullptr;
      gather_tokens(qp, gq, tok, nh, D, Q.data(), Cp);
      gather_tokens(kp, gk, tok, nh, D, K.data(), Cp);
      gather_tokens(vp, gv, tok, nh, D, V.data(), Cp);
      gather_tokens(op, go, tok, nh, D, O.data(), Cp);
      gather_tokens(dop, gdo, tok, nh, D, dO.data(), Cp);
      for (int64_t head = 0; head < nh; ++head) {
        const int64_t c0 = head * D;
        for (int64_t i = 0; i < n; ++i) {  // D_i = dO_i . O_i
          const float *a = dO.data() + i * Cp + c0, *o = O.data() + i * Cp + c0;
          float s = 0.0f;
          for (int64_t d = 0; d < D; ++d) s += a[d] * o[d];
          delta[i] = s;
        }
        transpose_head(K.data() + c0, Cp, n, D, Kt.data(), Np);
        transpose_head(V.data() + c0, Cp, n, D, Vt.data(), Np);
        gemm_f32(n, n, D, 1.0f, Q.data() + c0, Cp, 1, Kt.data(), Np, P.data(), Np);    // scores
        gemm_f32(n, n, D, 1.0f, dO.data() + c0, Cp, 1, Vt.data(), Np, dP.data(), Np);  // dP = dO V^T
        const float* lse_row = lp + (row * nh + head) * N;
        for (int64_t i = 0; i < n; ++i) {
          float* p = P.data() + i * Np;
          float* ds = dP.data() + i * Np;
          const float* b = pb.has_bias ? bias_row(pb, dense, tok, head, i, brow) : nullptr;
          score_row(p, n, pb.scale, b, region, tok.region[i]);
          softmax_backward_row(p, ds, n, lse_row[tok.n[i]], delta[i]);  // p = softmax, ds = p (dp - D_i)
          if (db != nullptr) {
            float* dbr = db + (head * N + tok.n[i]) * N;
            if (n == N) {
              for (int64_t j = 0; j < n; ++j) dbr[j] += ds[j];
            } else {
              for (int64_t j = 0; j < n; ++j) dbr[tok.n[j]] += ds[j];
            }
          }
        }
        gemm_f32(n, D, n, 1.0f, P.data(), 1, Np, dO.data() + c0, Cp, dV.data() + c0, Cp);      // dV = P^T dO
        gemm_f32(n, D, n, pb.scale, dP.data(), Np, 1, K.data() + c0, Cp, dQ.data() + c0, Cp);  // dQ = s dS K
        gemm_f32(n, D, n, pb.scale, dP.data(), 1, Np, Q.data() + c0, Cp, dK.data() + c0, Cp);  // dK = s dS^T Q
      }
      scatter_tokens(dQ.data(), Cp, tok, nh, D, dqp, gdq);
      scatter_tokens(dK.data(), Cp, tok, nh, D, dkp, gdk);
      scatter_tokens(dV.data(), Cp, tok, nh, D, dvp, gdv);
    }
  });
}

at::Tensor window_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& table,
                                at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                at::IntArrayRef nominal_window, double scale, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv) {
  const Problem pb = make_problem(q, k, v, table, window_size, shift_size, nominal_window, scale);
  check_grid(dout, "dout", q);
  check_grid(out, "out", q);
  check_grid(dq, "dq", q);
  check_grid(dk, "dk", q);
  check_grid(dv, "dv", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({pb.g.num_rows(), pb.heads, pb.N}),
              "lse: expected a contiguous float32 tensor of shape [", pb.g.num_rows(), ", ", pb.heads, ", ", pb.N,
              "] (from window_attention_fwd), got ", lse.scalar_type(), " ", sizes_str(lse.sizes()));
  std::vector<std::vector<float>> dbias(pb.has_bias ? at::get_num_threads() : 0);
  if (q.numel() > 0) {
    const std::vector<float> dense = pb.has_bias ? dense_bias(pb, *table) : std::vector<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention_bwd_cpu", [&] {
      backward_impl<scalar_t>(pb, dout, q, k, v, out, lse, dense, dq, dk, dv, dbias);
    });
  }
  if (!pb.has_bias) return at::empty({0}, q.options());
  // Sum the per-thread (heads, N, N) gradients, then scatter each pair into its table row.
  const int64_t N = pb.N, nh = pb.heads;
  std::vector<float> total(nh * N * N, 0.0f);
  for (const auto& part : dbias)
    for (size_t e = 0; e < part.size(); ++e) total[e] += part[e];
  auto dtable = at::zeros(table->sizes(), table->options().dtype(at::kFloat));
  float* dt = dtable.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const int64_t r = relative_bias_row(pb.g, pb.nom, i, j);
      for (int64_t h = 0; h < nh; ++h) dt[r * nh + h] += total[(h * N + i) * N + j];
    }
  return dtable.to(table->scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(florence_kernels_C, CPU, m) {
  m.impl("window_attention_fwd", &window_attention_fwd);
  m.impl("window_attention_bwd", &window_attention_bwd);
}

}  // namespace florence

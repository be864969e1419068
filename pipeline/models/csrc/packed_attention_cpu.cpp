// Causal attention within each packed sample on CPU, forward and backward, one fused task per (sample, KV head).
//
// Why: GLUE-style packed rows hold samples of ~50-200 tokens. torch's CPU sdpa runs each (sample, head) as a
// flash kernel whose BLAS calls are too small to pay for themselves, and the trainer had to cast q, k, v to fp32
// (and the gradients back) around it. Here each task loads its sample's K and V once (converted to fp32, K
// transposed), serves every query head that shares them, and keeps everything in cache: scores in fp32 from
// register-tiled loops, the softmax in fp32, the causal half only. Compiled for the machine that runs it
// (pipeline/models/cpu_attention.py, -march=native): the vector width W follows what the target has.
//
// Layout: q (B, H, L, D), k and v (B, Hkv, L, D) as strided views (head dim contiguous); out (B, L, H, D);
// lse (B, H, L) fp32, the log-sum-exp of each row's scaled scores, kept for backward; positions outside every
// sample get zeros. `samples` (N, 3) int64: row, first position, length. `window` > 0: token i sees i-window+1..i.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int RB = 4;  // query rows per block: each K^T tile load serves RB rows

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

struct Strides { int64_t b, h, l; };

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// rows x D of a (B, H, L, D) view starting at row `first` -> dst (rows x D fp32), times `scale`
template <typename T, int D>
void load_rows(const T* src, int64_t sl, int64_t rows, float scale, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int d = 0; d < D; ++d) dst[i * D + d] = static_cast<float>(src[i * sl + d]) * scale;
}

// rows x D -> dst (D x ld fp32, transposed), columns rows..ld zero
template <typename T, int D>
void load_transposed(const T* src, int64_t sl, int64_t rows, int64_t ld, float* dst) {
  std::fill(dst, dst + D * ld, 0.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int d = 0; d < D; ++d) dst[d * ld + i] = static_cast<float>(src[i * sl + d]);
}

// W fp32 lanes per vector: the CPU's register width where the compiler targets it (AVX-512: 16, AVX2: 8, else 4;
// GCC/Clang vector extension, aligned(4): unaligned loads). Wider vectors than the target's registers compile to
// slow code (an AVX2 build of 16-lane vectors ran 25x slower), so the width follows the target.
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
constexpr int JB = 2 * W;  // key columns per tile (two vectors); a task's buffers hold its length rounded up to it
typedef float vecf __attribute__((vector_size(4 * W), aligned(4)));
typedef int32_t veci __attribute__((vector_size(4 * W), aligned(4)));

inline vecf loadv(const float* p) { return *reinterpret_cast<const vecf*>(p); }
inline void storev(float* p, vecf x) { *reinterpret_cast<vecf*>(p) = x; }
inline vecf splat(float x) { return vecf{} + x; }
inline float lane_sum(vecf x) { float s = 0.0f; for (int c = 0; c < W; ++c) s += x[c]; return s; }
inline float lane_max(vecf x) { float m = x[0]; for (int c = 1; c < W; ++c) m = std::max(m, x[c]); return m; }

// e^x for x <= 0 (a score minus its row's maximum or log-sum-exp), W at a time: |relative error| < 1e-6
inline vecf exp_nonpositive(vecf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const veci ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, veci);  // round(x / ln2): x <= 0
  const vecf n = __builtin_convertvector(ni, vecf);
  const vecf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // |r| <= ln2 / 2
  const vecf p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                  r * (1.0f / 720 + r * (1.0f / 5040)))))));
  return p * reinterpret_cast<vecf>((ni + 127) << 23);
}

inline veci lane_index() { veci x{}; for (int c = 0; c < W; ++c) x[c] = c; return x; }

// Which of the W keys j0.. a query sees (keys lo..hi): lanes all-ones where seen
inline veci seen_keys(int64_t j0, int64_t lo, int64_t hi) {
  static const veci lanes = lane_index();
  const veci j = lanes + static_cast<int32_t>(j0);
  return (j >= static_cast<int32_t>(lo)) & (j <= static_cast<int32_t>(hi));
}

// One query's scores s[j0..j1) (multiples of W) -> its probabilities (0 outside keys lo..hi), unnormalised:
// e^(s - max). Returns the log of their sum plus the max (the row's log-sum-exp) and writes 1 / their sum.
inline float softmax_row(float* s, int64_t j0, int64_t j1, int64_t lo, int64_t hi, float& inv_sum) {
  vecf vmax = splat(-3.0e38f);
  for (int64_t j = j0; j < j1; j += W) {
    const vecf x = loadv(s + j);
    vmax = seen_keys(j, lo, hi) & (x > vmax) ? x : vmax;
  }
  const float m = lane_max(vmax);
  vecf vsum{};
  for (int64_t j = j0; j < j1; j += W) {
    const vecf e = seen_keys(j, lo, hi) ? exp_nonpositive(loadv(s + j) - m) : vecf{};
    storev(s + j, e);
    vsum += e;
  }
  const float sum = lane_sum(vsum);
  inv_sum = 1.0f / sum;
  return m + std::log(sum);
}

// Backward, one query's tiles: p[j] <- its probability e^(s - lse), ds[j] <- p (dp - delta) (both 0 outside keys
// lo..hi), for j in [j0, j1) (multiples of W)
inline void score_gradients_row(float* p, float* ds, int64_t j0, int64_t j1, int64_t lo, int64_t hi, float lse,
                                float delta) {
  for (int64_t j = j0; j < j1; j += W) {
    const vecf pj = seen_keys(j, lo, hi) ? exp_nonpositive(loadv(p + j) - lse) : vecf{};
    storev(p + j, pj);
    storev(ds + j, pj * (loadv(ds + j) - delta));
  }
}

template <int D>
inline float dot(const float* a, const float* b) {
  vecf acc{};
  for (int d = 0; d < D; d += W) acc += loadv(a + d) * loadv(b + d);
  return lane_sum(acc);
}

// s[r][j] = a[r] . bt[:, j] for RB rows of a (RB x D) and columns j0..j1 (multiples of W) of bt (D x ld):
// RB x 2 accumulators, enough independent chains to keep both FMA units busy
template <int D>
void tile_products(const float* __restrict__ a, const float* __restrict__ bt, int64_t ld, int64_t j0, int64_t j1,
                   float* __restrict__ s) {
  int64_t jb = j0;
  for (; jb + JB <= j1; jb += JB) {
    vecf acc[RB][2] = {};
    for (int d = 0; d < D; ++d) {
      const vecf b0 = loadv(bt + d * ld + jb), b1 = loadv(bt + d * ld + jb + W);
      for (int r = 0; r < RB; ++r) {
        const float x = a[r * D + d];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int r = 0; r < RB; ++r) {
      storev(s + r * ld + jb, acc[r][0]);
      storev(s + r * ld + jb + W, acc[r][1]);
    }
  }
  if (jb < j1) {  // the last W columns (the causal edge): half a tile
    vecf acc[RB] = {};
    for (int d = 0; d < D; ++d) {
      const vecf b0 = loadv(bt + d * ld + jb);
      for (int r = 0; r < RB; ++r) acc[r] += a[r * D + d] * b0;
    }
    for (int r = 0; r < RB; ++r) storev(s + r * ld + jb, acc[r]);
  }
}

// acc[r] += sum over j in [j0, j1) of w[r][j] * x[j] (RB rows of weights w, ld apart; x is rows x D), 64 columns
// of x at a time (RB x 4 accumulators)
template <int D>
void weighted_rows(const float* __restrict__ w, int64_t ld, const float* __restrict__ x, int64_t j0, int64_t j1,
                   float (&out)[RB][D]) {
  static_assert(D % W == 0, "head dim must be a multiple of the vector width");
  // vectors per chunk: RB x C accumulators fit the registers (32 with AVX-512, 16 otherwise)
  constexpr int C = W == 16 ? (D % 64 == 0 ? 4 : D % 48 == 0 ? 3 : D % 32 == 0 ? 2 : 1) : (D % (2 * W) == 0 ? 2 : 1);
  for (int d0 = 0; d0 < D; d0 += W * C) {
    vecf acc[RB][C] = {};
    for (int64_t j = j0; j < j1; ++j) {
      vecf xj[C];
      for (int c = 0; c < C; ++c) xj[c] = loadv(x + j * D + d0 + W * c);
      for (int r = 0; r < RB; ++r) {
        const float wr = w[r * ld + j];
        for (int c = 0; c < C; ++c) acc[r][c] += wr * xj[c];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < C; ++c) storev(&out[r][d0 + W * c], loadv(&out[r][d0 + W * c]) + acc[r][c]);
  }
}

// For keys j in [j0, j1): dv[j] += sum_r p[r][j] * go[r] and dk[j] += sum_r ds[r][j] * qs[r] over one block of RB
// query rows (go: their output gradients, qs: their scaled queries, both RB x D)
template <int D>
void accumulate_key_gradients(const float* __restrict__ p, const float* __restrict__ ds, int64_t ld,
                              const float* __restrict__ go, const float* __restrict__ qs, int64_t j0, int64_t j1,
                              float* __restrict__ dv, float* __restrict__ dk) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int d = 0; d < D; d += W) {
      vecf v = loadv(dv + j * D + d), k = loadv(dk + j * D + d);
      for (int r = 0; r < RB; ++r) {
        v += p[r * ld + j] * loadv(go + r * D + d);
        k += ds[r * ld + j] * loadv(qs + r * D + d);
      }
      storev(dv + j * D + d, v);
      storev(dk + j * D + d, k);
    }
  }
}

// The keys row i sees: [lo, i] (causal, within the window when one is set).
inline int64_t first_key(int64_t i, int64_t window) { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }

struct Sample { int64_t row, first, len; };

std::vector<Sample> read_samples(const at::Tensor& samples, int64_t L) {
  TORCH_CHECK(samples.dim() == 2 && samples.size(1) == 3 && samples.scalar_type() == at::kLong,
              "samples must be an (N, 3) int64 tensor of (row, first position, length)");
  auto s = samples.contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  std::vector<Sample> out;
  for (int64_t n = 0; n < s.size(0); ++n) {
    Sample x{p[3 * n], p[3 * n + 1], p[3 * n + 2]};
    TORCH_CHECK(x.len > 0 && x.first >= 0 && x.first + x.len <= L, "sample ", n, " (first ", x.first, ", length ",
                x.len, ") does not fit a row of ", L);
    out.push_back(x);
  }
  return out;
}

// Run fn(sample, kv_head) for every pair on torch's intra-op threads, longest samples first, taken dynamically.
template <typename F>
void for_each_task(const std::vector<Sample>& samples, int64_t kv_heads, const F& fn) {
  std::vector<int64_t> order(samples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return samples[a].len > samples[b].len; });
  const int64_t tasks = static_cast<int64_t>(order.size()) * kv_heads;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) fn(samples[order[t / kv_heads]], t % kv_heads);
  });
}

template <typename T, int D>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<Sample>& samples,
                    float scale, int64_t window, at::Tensor& out, at::Tensor& lse) {
  const int64_t H = q.size(1), Hkv = k.size(1), L = q.size(2), group = H / Hkv;
  const Strides qs = strides_of(q), ks = strides_of(k), vs = strides_of(v);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  for_each_task(samples, Hkv, [&](const Sample& s, int64_t g) {
    const int64_t n = s.len, ld = round_up(n, JB);
    std::vector<float> kt(D * ld), vv(n * D), qq((n + RB) * D, 0.0f), sc(RB * ld);
    load_transposed<T, D>(kp + s.row * ks.b + g * ks.h + s.first * ks.l, ks.l, n, ld, kt.data());
    load_rows<T, D>(vp + s.row * vs.b + g * vs.h + s.first * vs.l, vs.l, n, 1.0f, vv.data());
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      load_rows<T, D>(qp + s.row * qs.b + h * qs.h + s.first * qs.l, qs.l, n, scale, qq.data());
      for (int64_t i0 = 0; i0 < n; i0 += RB) {
        const int64_t rows = std::min<int64_t>(RB, n - i0), j_end = i0 + rows, j_lo = first_key(i0, window);
        const int64_t j_tile = j_lo / W * W, j_stop = round_up(j_end, W);
        tile_products<D>(qq.data() + i0 * D, kt.data(), ld, j_tile, j_stop, sc.data());
        float inv_sum[RB] = {};
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          lp[(s.row * H + h) * L + s.first + i] =
              softmax_row(sc.data() + r * ld, j_tile, j_stop, first_key(i, window), i, inv_sum[r]);
        }
        for (int64_t r = rows; r < RB; ++r) std::fill(sc.data() + r * ld + j_lo, sc.data() + r * ld + j_end, 0.0f);
        float acc[RB][D] = {};
        weighted_rows<D>(sc.data(), ld, vv.data(), j_lo, j_end, acc);
        for (int64_t r = 0; r < rows; ++r) {
          T* o = op + ((s.row * L + s.first + i0 + r) * H + h) * D;
          for (int d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r][d] * inv_sum[r]);
        }
      }
    }
  });
}

template <typename T, int D>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& grad_out, const std::vector<Sample>& samples,
                     float scale, int64_t window, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t H = q.size(1), Hkv = k.size(1), L = q.size(2), group = H / Hkv;
  const Strides qs = strides_of(q), ks = strides_of(k), vs = strides_of(v);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *op = out.data_ptr<T>();
  const T* gp = grad_out.data_ptr<T>();  // (B, L, H, D) contiguous
  const float* lp = lse.data_ptr<float>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();  // (B, L, heads, D) contiguous
  const int64_t ol = H * D;  // position stride of out, grad_out and dq
  for_each_task(samples, Hkv, [&](const Sample& s, int64_t g) {
    const int64_t n = s.len, ld = round_up(n, JB);
    std::vector<float> kt(D * ld), vt(D * ld), kk(n * D), qq((n + RB) * D, 0.0f), go((n + RB) * D, 0.0f);
    std::vector<float> oo(n * D), delta(n), p(RB * ld), dp(RB * ld), dkk(n * D, 0.0f), dvv(n * D, 0.0f);
    const T* k0 = kp + s.row * ks.b + g * ks.h + s.first * ks.l;
    const T* v0 = vp + s.row * vs.b + g * vs.h + s.first * vs.l;
    load_transposed<T, D>(k0, ks.l, n, ld, kt.data());
    load_transposed<T, D>(v0, vs.l, n, ld, vt.data());
    load_rows<T, D>(k0, ks.l, n, 1.0f, kk.data());
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      load_rows<T, D>(qp + s.row * qs.b + h * qs.h + s.first * qs.l, qs.l, n, scale, qq.data());
      const int64_t at0 = (s.row * L + s.first) * ol + h * D;
      load_rows<T, D>(gp + at0, ol, n, 1.0f, go.data());
      load_rows<T, D>(op + at0, ol, n, 1.0f, oo.data());
      for (int64_t i = 0; i < n; ++i) delta[i] = dot<D>(go.data() + i * D, oo.data() + i * D);  // dO_i . O_i
      const float* lse_h = lp + (s.row * H + h) * L + s.first;
      for (int64_t i0 = 0; i0 < n; i0 += RB) {
        const int64_t rows = std::min<int64_t>(RB, n - i0), j_end = i0 + rows, j_lo = first_key(i0, window);
        const int64_t j_tile = j_lo / W * W, j_stop = round_up(j_end, W);
        tile_products<D>(qq.data() + i0 * D, kt.data(), ld, j_tile, j_stop, p.data());
        tile_products<D>(go.data() + i0 * D, vt.data(), ld, j_tile, j_stop, dp.data());
        for (int64_t r = 0; r < RB; ++r) {  // rows past the sample's end: keys lo > hi, so all zero
          const int64_t i = i0 + r;
          score_gradients_row(p.data() + r * ld, dp.data() + r * ld, j_tile, j_stop,
                              r < rows ? first_key(i, window) : j_stop, i, r < rows ? lse_h[i] : 0.0f,
                              r < rows ? delta[i] : 0.0f);
        }
        accumulate_key_gradients<D>(p.data(), dp.data(), ld, go.data() + i0 * D, qq.data() + i0 * D, j_lo, j_end,
                                    dvv.data(), dkk.data());
        float acc[RB][D] = {};
        weighted_rows<D>(dp.data(), ld, kk.data(), j_lo, j_end, acc);
        for (int64_t r = 0; r < rows; ++r) {
          T* o = dqp + at0 + (i0 + r) * ol;
          for (int d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r][d] * scale);
        }
      }
    }
    const int64_t kvl = Hkv * D, kv0 = (s.row * L + s.first) * kvl + g * D;
    for (int64_t j = 0; j < n; ++j)
      for (int d = 0; d < D; ++d) {
        dkp[kv0 + j * kvl + d] = static_cast<T>(dkk[j * D + d]);
        dvp[kv0 + j * kvl + d] = static_cast<T>(dvv[j * D + d]);
      }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, heads, L, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "q (B, H, L, D) and k, v (B, Hkv, L, D) do not match");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads ", q.size(1), " not a multiple of KV heads ", k.size(1));
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "head dim must be contiguous");
}

#define DISPATCH_HEAD_DIM(D_VALUE, ...)                                                          \
  switch (D_VALUE) {                                                                             \
    case 64: { constexpr int D = 64; __VA_ARGS__(); break; }                                     \
    case 128: { constexpr int D = 128; __VA_ARGS__(); break; }                                   \
    case 32: { constexpr int D = 32; __VA_ARGS__(); break; }                                     \
    case 96: { constexpr int D = 96; __VA_ARGS__(); break; }                                     \
    case 80: { constexpr int D = 80; __VA_ARGS__(); break; }                                     \
    case 256: { constexpr int D = 256; __VA_ARGS__(); break; }                                   \
    default: TORCH_CHECK(false, "head dim ", D_VALUE, " not compiled (32, 64, 80, 96, 128, 256)"); \
  }

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& samples, double scale, int64_t window) {
  check_inputs(q, k, v);
  const auto list = read_samples(samples, q.size(2));
  auto out = at::zeros({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  auto lse = at::zeros({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "packed_attention_forward", [&] {
    DISPATCH_HEAD_DIM(q.size(3), [&] { forward_kernel<scalar_t, D>(q, k, v, list, scale, window, out, lse); });
  });
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& grad_out, const at::Tensor& samples,
                                 double scale, int64_t window) {
  check_inputs(q, k, v);
  const auto list = read_samples(samples, q.size(2));
  const auto go = grad_out.to(q.scalar_type()).contiguous();
  auto dq = at::zeros({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options());
  auto dk = at::zeros({k.size(0), k.size(2), k.size(1), k.size(3)}, k.options());
  auto dv = at::zeros_like(dk);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "packed_attention_backward", [&] {
    DISPATCH_HEAD_DIM(q.size(3), [&] {
      backward_kernel<scalar_t, D>(q, k, v, out.contiguous(), lse, go, list, scale, window, dq, dk, dv);
    });
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "packed causal attention, forward: (out (B, L, H, D), lse (B, H, L))");
  m.def("backward", &backward, "packed causal attention, backward: (dq, dk, dv) as (B, heads, L, D) views");
}

// y = x B + bias (GELU optional) for a few rows of x (a decoding step's 1 to 64 text rows), a few queries'
// attention over stored keys and values (cross-attention to image tokens), self-attention over a history, and a
// residual add with LayerNorm; fp32, AVX-512, OpenMP.
// Built and loaded by few_rows.py (see there for why) as torch operators med_few_rows::* (at the end).
//
// B (K x N) is packed once into panels of 48 columns, panels[p][k][j] = B[k][48 p + j], zeros past N, so that a
// panel is one sequential stream of K x 48 floats (reading B in place, row after row of a panel at B's row
// stride, made the bench's folded products 1.8 to 3 times slower). For each panel, a block of up to 8 rows
// keeps its 8 x 48 sums in 24 of the 32 vector registers; each k loads three vectors of the panel and adds them
// times x[r][k] (broadcast) to the row's sums: 24 multiply-adds per 3 loads, so the product runs near the FMA
// rate while streaming B once. The panels are split among the threads; a panel (K x 192 bytes: 147 KB for
// K = 768) stays in L2 while the other row blocks use it, and the second block (with 16 rows or more) fetches the
// next panel into L2 meanwhile: alone, the first block waits on memory (8 rows take a panel's 192 bytes a k
// faster than one core's 21 GB/s bring them); the bench's beam-3 steps (24 rows) ran 4 to 9% faster with it.
//
// Attention (med_few_rows_attend): per (image, head), a block of up to 4 query rows computes its scores against
// 6 vectors of 16 keys at a time from the keys stored transposed (D rows of S), the softmax runs over the row in
// the thread's buffer, then the probabilities times the values (S rows of D) in blocks of 4 rows x 64 columns;
// the scores never leave L1/L2 and the keys and values are read once, in their own layout (no packing).
// Self-attention over a history (med_few_rows_attend_history): per (row, head), one query's dot products with
// the keys of each position's stored row (a table says which), softmax, then the weighted values; a 64-wide head
// is held in 4 registers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kPanel = 48;        // outputs per panel: three 16-float vectors
constexpr int kRows = 8;          // rows per block: 8 x 3 sums in registers
constexpr int kPrefetch = 24;     // how many k ahead the panel is prefetched (24 x 192 bytes)

// exp(x) for x <= 0 (a softmax's shifted scores), to about 1 ulp: exp(x) = 2^n exp(r), n = round(x / ln 2),
// r = x - n ln 2 (in two parts), exp(r) by Cephes' degree-6 polynomial, 2^n applied by scalef (0 far below).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// erf by Abramowitz and Stegun's 7.1.26 (absolute error under 1.5e-7), the formula of torch's vectorized erf,
// and BERT's exact GELU from it, x / 2 (1 + erf(x / sqrt 2)), as torch's F.gelu computes it. (AVX-512F only:
// the sign is moved with integer operations.)
inline __m512 erf_ps(__m512 x) {
  const __m512i sign = _mm512_and_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u)));
  const __m512 a = _mm512_abs_ps(x), one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
  __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
  r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(e, t), r, one);  // 1 - r t exp(-x^2)
  return _mm512_castsi512_ps(_mm512_xor_epi32(_mm512_castps_si512(y), sign));
}

inline __m512 gelu(__m512 x) {
  const __m512 half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half, erf_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f))), half);
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

template <int R>
void block(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y, int64_t ldy,
           int64_t outputs, const float* next, bool activate) {
  __m512 sum[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) sum[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    const char* ahead = reinterpret_cast<const char*>(w + kPrefetch * kPanel);  // a hint: never faults
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    if (next) {
      const char* later = reinterpret_cast<const char*>(next + k * kPanel);
      _mm_prefetch(later, _MM_HINT_T1);
      _mm_prefetch(later + 64, _MM_HINT_T1);
      _mm_prefetch(later + 128, _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * ldx + k]);
      sum[r][0] = _mm512_fmadd_ps(xr, w0, sum[r][0]);
      sum[r][1] = _mm512_fmadd_ps(xr, w1, sum[r][1]);
      sum[r][2] = _mm512_fmadd_ps(xr, w2, sum[r][2]);
    }
  }
  for (int j = 0; j < 3 && 16 * j < outputs; ++j) {
    const __mmask16 mask = lanes(outputs - 16 * j);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 out = _mm512_add_ps(sum[r][j], b);
      _mm512_mask_storeu_ps(y + r * ldy + 16 * j, mask, activate ? gelu(out) : out);
    }
  }
}

using Block = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t,
                      const float*, bool);
constexpr Block kBlocks[kRows + 1] = {nullptr, block<1>, block<2>, block<3>, block<4>,
                                      block<5>, block<6>, block<7>, block<8>};

constexpr int kAttendRows = 4;  // query rows per block
constexpr int kKeyVectors = 6;  // 16-key vectors per block of the scores: 4 x 6 sums in registers
constexpr int kDimVectors = 4;  // 16-wide vectors of a head per block of the mix: 4 x 4 sums

// sum[r][j] = sum_i a[r][i] b[i][16 j .. 16 j + 15] for i < count: R rows of a (at stride lda) times V vectors
// of b's rows (at stride ldb); with MaskLast, only the lanes of `tail` are read in the last vector (masked loads
// there only: a masked load in every position halves the rate).
template <int R, int V, bool MaskLast>
__attribute__((always_inline)) inline void rows_times(const float* a, int64_t lda, int64_t count, const float* b,
                                                      int64_t ldb, __mmask16 tail, __m512 (&sum)[R][V],
                                                      const float* fetch) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) sum[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    const float* row = b + i * ldb;
    if (fetch) {  // the same row of the next task's block (a hint: never faults)
      for (int j = 0; j < V; ++j) _mm_prefetch(reinterpret_cast<const char*>(fetch + i * ldb + 16 * j), _MM_HINT_T2);
    }
    __m512 vec[V];
    for (int j = 0; j < V; ++j)
      vec[j] = MaskLast && j == V - 1 ? _mm512_maskz_loadu_ps(tail, row + 16 * j) : _mm512_loadu_ps(row + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * lda + i]);
      for (int j = 0; j < V; ++j) sum[r][j] = _mm512_fmadd_ps(ar, vec[j], sum[r][j]);
    }
  }
}

// scores[r][16 j + i] = sum_d q[r][d] kt[d][16 j + i] (+ mask[r][...]) for R rows and V vectors of keys, the last
// holding `last` keys (fewer than 16 with MaskLast).
template <int R, int V, bool MaskLast>
void scores_block(const float* q, int64_t D, const float* kt, int64_t ldk, int64_t last, const float* mask,
                  int64_t ldm, float* scores, int64_t lds, const float* fetch) {
  const __mmask16 tail = MaskLast ? lanes(last) : __mmask16(0xFFFF);
  __m512 sum[R][V];
  rows_times<R, V, MaskLast>(q, D, D, kt, ldk, tail, sum, fetch);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) {
      const __mmask16 m = MaskLast && j == V - 1 ? tail : __mmask16(0xFFFF);
      __m512 v = sum[r][j];
      if (mask) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, mask + r * ldm + 16 * j));
      _mm512_mask_storeu_ps(scores + r * lds + 16 * j, m, v);
    }
}

// out[r][16 j + i] = sum_s p[r][s] v[s][16 j + i] for R rows and V vectors of a head's dimensions (the last one
// `last` wide): the probabilities times the values.
template <int R, int V, bool MaskLast>
void mix_block(const float* p, int64_t lds, int64_t S, const float* v, int64_t ldv, int64_t last, float* out,
               int64_t ldo, const float* fetch) {
  const __mmask16 tail = MaskLast ? lanes(last) : __mmask16(0xFFFF);
  __m512 sum[R][V];
  rows_times<R, V, MaskLast>(p, lds, S, v, ldv, tail, sum, fetch);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j)
      _mm512_mask_storeu_ps(out + r * ldo + 16 * j, MaskLast && j == V - 1 ? tail : __mmask16(0xFFFF), sum[r][j]);
}

using ScoresBlock = void (*)(const float*, int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                             int64_t, const float*);
using MixBlock = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                          const float*);

// Tables of the blocks by [masked last vector][rows - 1][vectors - 1].
template <int R, bool M, size_t... V>
constexpr std::array<ScoresBlock, sizeof...(V)> scores_blocks(std::index_sequence<V...>) {
  return {scores_block<R, int(V) + 1, M>...};
}
template <int R, bool M, size_t... V>
constexpr std::array<MixBlock, sizeof...(V)> mix_blocks(std::index_sequence<V...>) {
  return {mix_block<R, int(V) + 1, M>...};
}
template <bool M, size_t... R>
constexpr std::array<std::array<ScoresBlock, kKeyVectors>, sizeof...(R)> scores_table(std::index_sequence<R...>) {
  return {scores_blocks<int(R) + 1, M>(std::make_index_sequence<kKeyVectors>())...};
}
template <bool M, size_t... R>
constexpr std::array<std::array<MixBlock, kDimVectors>, sizeof...(R)> mix_table(std::index_sequence<R...>) {
  return {mix_blocks<int(R) + 1, M>(std::make_index_sequence<kDimVectors>())...};
}
constexpr std::array<std::array<ScoresBlock, kKeyVectors>, kAttendRows> kScores[2] = {
    scores_table<false>(std::make_index_sequence<kAttendRows>()),
    scores_table<true>(std::make_index_sequence<kAttendRows>())};
constexpr std::array<std::array<MixBlock, kDimVectors>, kAttendRows> kMix[2] = {
    mix_table<false>(std::make_index_sequence<kAttendRows>()),
    mix_table<true>(std::make_index_sequence<kAttendRows>())};

// Runs `block(start, vectors, masked, last)` over 0 .. n in blocks of up to `most` 16-wide vectors; `last` is
// how many of the block's last vector are in range (masked: fewer than 16).
template <typename F>
void blocks_of(int64_t n, int most, F block) {
  for (int64_t start = 0; start < n; start += 16 * most) {
    const int64_t left = n - start;
    const int vectors = left >= 16 * most ? most : int((left + 15) / 16);
    const int64_t last = left - 16 * (vectors - 1);
    block(start, vectors, last < 16, last);
  }
}

// In place: each of R rows of S scores (at stride lds) becomes its softmax.
void softmax_rows(float* scores, int64_t R, int64_t S, int64_t lds) {
  for (int64_t r = 0; r < R; ++r) {
    float* row = scores + r * lds;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < S; s += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes(S - s), row + s));
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 m = lanes(S - s);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s), peak));
      total = _mm512_mask_add_ps(total, m, total, e);
      _mm512_mask_storeu_ps(row + s, m, e);
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 m = lanes(S - s);
      _mm512_mask_storeu_ps(row + s, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + s), inverse));
    }
  }
}

// Runs task(t, next, scratch) for t < tasks, split among `threads` OpenMP threads (none: no OpenMP region, which
// costs microseconds per call even for one thread); `next` is the task the same thread runs after t (-1: none);
// each thread has its own scratch buffer of `scratch` floats.
template <typename F>
void for_each_task(int64_t tasks, int threads, int64_t scratch, F task) {
  auto run = [&](int64_t first, int64_t step) {
    std::vector<float> buffer(scratch);
    for (int64_t t = first; t < tasks; t += step) task(t, t + step < tasks ? t + step : -1, buffer.data());
  };
  if (threads > 1 && tasks > 1) {
#pragma omp parallel num_threads(threads)
    run(omp_get_thread_num(), omp_get_num_threads());
  } else {
    run(0, 1);
  }
}

// The kernels, on raw pointers; the torch operators at the end check their tensors and call them.

// For i < batch: y[i] = x[i] B[i] + bias[i], where x[i] (M, K) and y[i] (M, N) are row-major at x + i * x_stride
// and y + i * y_stride, B[i] is packed as above at panels + i * panels_stride, and bias[i] (N) is at
// bias + i * bias_stride (bias null: none); with `activation` 1, BERT's GELU is applied to each output (after the
// bias). `threads` OpenMP threads (torch's count: the caller's thread may not carry torch's setting) share the
// batch's panels.
void matmul_kernel(const float* x, int64_t batch, int64_t x_stride, int64_t M, int64_t K, const float* panels,
                   int64_t panels_stride, int64_t N, const float* bias, int64_t bias_stride, float* y,
                   int64_t y_stride, int activation, int threads) {
  const int64_t count = (N + kPanel - 1) / kPanel;
  auto task = [&](int64_t t) {
    const int64_t i = t / count, p = t % count;
    const float* panel = panels + i * panels_stride + p * K * kPanel;
    const float* xi = x + i * x_stride;
    const float* bi = bias ? bias + i * bias_stride + p * kPanel : nullptr;
    float* yi = y + i * y_stride + p * kPanel;
    const int64_t outputs = N - p * kPanel < kPanel ? N - p * kPanel : kPanel;
    for (int64_t m = 0; m < M; m += kRows) {
      const int rows = M - m < kRows ? int(M - m) : kRows;
      const float* next = m == kRows && rows == kRows && p + 1 < count ? panel + K * kPanel : nullptr;
      kBlocks[rows](xi + m * K, K, panel, K, bi, yi + m * N, N, outputs, next, activation == 1);
    }
  };
  if (threads > 1 && batch * count > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < batch * count; ++t) task(t);
  } else {  // no OpenMP region at all: entering even a one-thread team costs microseconds per call
    for (int64_t t = 0; t < batch * count; ++t) task(t);
  }
}

// For each (b, h) < (B, H): out[b][h] = softmax(q[b][h] kt[b][h] * scale + mask[b][h]) v[b][h], with q (R, D),
// kt (D, S) (the keys transposed), v (S, D), mask (R, S) additive (null: none) and out (R, D), each row-major
// with its last dimension contiguous, found at base + b * stride_b + h * stride_h (a mask's strides may be 0:
// broadcast; its rows at stride mask_r). The scores of one (b, h) stay in a buffer of the thread's own.
void attend_kernel(const float* q, const int64_t* q_strides, const float* kt, const int64_t* kt_strides,
                   const float* v, const int64_t* v_strides, const float* mask, const int64_t* mask_strides,
                   float* out, const int64_t* out_strides, int64_t B, int64_t H, int64_t R, int64_t S,
                   int64_t D, float scale, int threads) {
  // strides: {b, h, row} in floats; a row's elements are contiguous
  const int64_t lds = (S + 15) / 16 * 16;
  // While a task computes, each block of its first query rows fetches the same block of the next task's keys or
  // values, row by row as it reads its own: alone, a task would wait for memory, then compute, then wait again
  // (cold: 0.61 ms a beam-3 layer; in cache 0.29 ms; reading the K/V alone 0.37 ms).
  auto task = [&](int64_t t, int64_t next, float* scores, float* query) {
    const int64_t b = t / H, h = t % H;
    const float* next_k = next < 0 ? nullptr : kt + next / H * kt_strides[0] + next % H * kt_strides[1];
    const float* next_v = next < 0 ? nullptr : v + next / H * v_strides[0] + next % H * v_strides[1];
    const float* qi = q + b * q_strides[0] + h * q_strides[1];
    const float* ki = kt + b * kt_strides[0] + h * kt_strides[1];
    const float* vi = v + b * v_strides[0] + h * v_strides[1];
    const float* mi = mask ? mask + b * mask_strides[0] + h * mask_strides[1] : nullptr;
    const int64_t ldm = mask ? mask_strides[2] : 0;
    float* oi = out + b * out_strides[0] + h * out_strides[1];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < D; ++d) query[r * D + d] = qi[r * q_strides[2] + d] * scale;
    for (int64_t r = 0; r < R; r += kAttendRows) {
      const int rows = R - r < kAttendRows ? int(R - r) : kAttendRows;
      blocks_of(S, kKeyVectors, [&](int64_t s, int vectors, bool masked, int64_t last) {
        kScores[masked][rows - 1][vectors - 1](query + r * D, D, ki + s, kt_strides[2], last,
                                                mi ? mi + r * ldm + s : nullptr, ldm, scores + r * lds + s, lds,
                                                next_k && r == 0 ? next_k + s : nullptr);
      });
    }
    softmax_rows(scores, R, S, lds);
    for (int64_t r = 0; r < R; r += kAttendRows) {
      const int rows = R - r < kAttendRows ? int(R - r) : kAttendRows;
      blocks_of(D, kDimVectors, [&](int64_t d, int vectors, bool masked, int64_t last) {
        kMix[masked][rows - 1][vectors - 1](scores + r * lds, lds, S, vi + d, v_strides[2], last,
                                             oi + r * out_strides[2] + d, out_strides[2],
                                             next_v && r == 0 ? next_v + d : nullptr);
      });
    }
  };
  for_each_task(B * H, threads, R * lds + R * D, [&](int64_t t, int64_t next, float* scratch) {
    task(t, next, scratch, scratch + R * lds);  // scores, then query
  });
}


// Self-attention of one new query per text row over keys and values that were never reordered: position p's
// K/V of text row r lie in the store's row source[r][p] (a beam search records where each beam's history went
// instead of copying it every step). For each (r, h) < (R, H): out[r][h] = softmax(q[r][h] . K[p] * scale) V[p]
// over p < T, where K[p] = keys + p * pos_stride + source[r * source_stride + p] * row_stride + h * D (D
// contiguous floats; values alike); q and out are (R, H, D) contiguous.
void attend_history_kernel(const float* q, int64_t R, int64_t H, int64_t D, const float* keys,
                           const float* values, int64_t pos_stride, int64_t row_stride, const int64_t* source,
                           int64_t source_stride, int64_t T, float scale, float* out, int threads) {
  const int64_t lds = (T + 15) / 16 * 16;
  auto task = [&](int64_t t, float* scores) {
    const int64_t r = t / H, h = t % H;
    const int64_t* from = source + r * source_stride;
    const float* base_k = keys + h * D;
    const float* base_v = values + h * D;
    const float* qi = q + (r * H + h) * D;
    float* o = out + (r * H + h) * D;
    // a head of 16 x V floats (BERT's 64: V = 4) in registers, unmasked; other widths in masked 64-wide blocks
    auto head = [&](auto vectors) {
      constexpr int V = decltype(vectors)::value;
      __m512 query[V];
      for (int j = 0; j < V; ++j) query[j] = _mm512_mul_ps(_mm512_loadu_ps(qi + 16 * j), _mm512_set1_ps(scale));
      for (int64_t p = 0; p < T; ++p) {
        const float* k = base_k + p * pos_stride + from[p] * row_stride;
        __m512 sum = _mm512_mul_ps(query[0], _mm512_loadu_ps(k));
        for (int j = 1; j < V; ++j) sum = _mm512_fmadd_ps(query[j], _mm512_loadu_ps(k + 16 * j), sum);
        scores[p] = _mm512_reduce_add_ps(sum);
      }
      softmax_rows(scores, 1, T, lds);
      __m512 mixed[V];
      for (int j = 0; j < V; ++j) mixed[j] = _mm512_setzero_ps();
      for (int64_t p = 0; p < T; ++p) {
        const float* v = base_v + p * pos_stride + from[p] * row_stride;
        const __m512 weight = _mm512_set1_ps(scores[p]);
        for (int j = 0; j < V; ++j) mixed[j] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + 16 * j), mixed[j]);
      }
      for (int j = 0; j < V; ++j) _mm512_storeu_ps(o + 16 * j, mixed[j]);
    };
    if (D == 64) {
      head(std::integral_constant<int, 4>());
      return;
    }
    const int64_t vectors = (D + 15) / 16;
    for (int64_t p = 0; p < T; ++p) {
      const float* k = base_k + p * pos_stride + from[p] * row_stride;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < vectors; ++j) {
        const __mmask16 m = lanes(D - 16 * j);
        sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qi + 16 * j), _mm512_maskz_loadu_ps(m, k + 16 * j), sum);
      }
      scores[p] = _mm512_reduce_add_ps(sum) * scale;
    }
    softmax_rows(scores, 1, T, lds);
    for (int64_t j = 0; j < vectors; ++j) {
      const __mmask16 m = lanes(D - 16 * j);
      __m512 mixed = _mm512_setzero_ps();
      for (int64_t p = 0; p < T; ++p) {
        const float* v = base_v + p * pos_stride + from[p] * row_stride;
        mixed = _mm512_fmadd_ps(_mm512_set1_ps(scores[p]), _mm512_maskz_loadu_ps(m, v + 16 * j), mixed);
      }
      _mm512_mask_storeu_ps(o + 16 * j, m, mixed);
    }
  };
  for_each_task(R * H, threads, lds, [&](int64_t t, int64_t, float* scratch) { task(t, scratch); });
}

// For each of `rows` rows of `width` floats (all contiguous): out = LayerNorm(x + residual) with the given weight
// and bias (residual null: LayerNorm(x)); the mean and variance in two passes, as torch's LayerNorm to float
// rounding. out may be x or residual.
void add_norm_kernel(const float* x, const float* residual, const float* weight, const float* bias, float eps,
                     float* out, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    const float* rr = residual ? residual + r * width : nullptr;
    float* o = out + r * width;
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = lanes(width - i);
      __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
      if (rr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, rr + i));
      _mm512_mask_storeu_ps(o + i, m, v);
      total = _mm512_add_ps(total, v);
    }
    const float mean = _mm512_reduce_add_ps(total) / float(width);
    const __m512 centre = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = lanes(width - i);
      const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, o + i), centre);
      squares = _mm512_fmadd_ps(d, d, squares);
    }
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / float(width) + eps));
    for (int64_t i = 0; i < width; i += 16) {
      const __mmask16 m = lanes(width - i);
      const __m512 normed = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, o + i), centre), scale);
      _mm512_mask_storeu_ps(o + i, m, _mm512_fmadd_ps(normed, _mm512_maskz_loadu_ps(m, weight + i),
                                                       _mm512_maskz_loadu_ps(m, bias + i)));
    }
  }
}

// A beam search step's candidates, row by row: for each of `rows` rows of `vocab` logits (at stride ld) with
// log-probabilities logits - logsumexp(logits), its beam's running score plus each token's log-probability:
// ending[r] = the candidate of token `eos` (-1: none), and the `k` best candidates of the other tokens, best
// first (ties: the lower token first), in top_scores[r][:k] and top_tokens[r][:k]. Two passes over a row: its
// maximum with the k largest logits (a vector compare against the k-th best rejects almost every token), then
// the sum of exponentials (polynomial exp).
void beam_candidates_kernel(const float* logits, int64_t rows, int64_t vocab, int64_t ld,
                            const float* beam_scores, int64_t eos, int64_t k, float* ending, float* top_scores,
                            int64_t* top_tokens, int threads) {
  for_each_task(rows, threads, 0, [&](int64_t r, int64_t, float*) {
    const float* row = logits + r * ld;
    std::vector<float> best(k, -INFINITY);
    std::vector<int64_t> token(k, -1);
    float threshold = -INFINITY;  // the k-th best logit so far: only a larger one enters
    int64_t filled = 0;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t v = 0; v < vocab; v += 16) {
      const __mmask16 m = lanes(vocab - v);
      const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + v);
      top = _mm512_max_ps(top, x);
      __mmask16 enter = _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(threshold), _CMP_GT_OQ);
      if (filled < k) enter = m;  // until k tokens are in, every one enters
      while (enter) {
        const int lane = __builtin_ctz(enter);
        enter &= enter - 1;
        const int64_t t = v + lane;
        const float value = row[t];
        if (t == eos || !(value > best[k - 1] || filled < k)) continue;
        int64_t at = filled < k ? filled++ : k - 1;  // insert, keeping best[] sorted (a later equal stays after)
        while (at > 0 && value > best[at - 1]) {
          best[at] = best[at - 1];
          token[at] = token[at - 1];
          --at;
        }
        best[at] = value;
        token[at] = t;
        if (filled == k) threshold = best[k - 1];
      }
    }
    const float peak = _mm512_reduce_max_ps(top);
    __m512 total = _mm512_setzero_ps();
    if (peak != -INFINITY) {
      const __m512 shift = _mm512_set1_ps(peak);
      for (int64_t v = 0; v < vocab; v += 16) {
        const __mmask16 m = lanes(vocab - v);
        total = _mm512_mask_add_ps(total, m, total,
                                   exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + v), shift)));
      }
    }
    const float logsum = logf(_mm512_reduce_add_ps(total));  // log-probability = (logit - peak) - logsum, as torch
    const float base = beam_scores[r];
    if (ending) ending[r] = eos >= 0 ? base + ((row[eos] - peak) - logsum) : -INFINITY;
    for (int64_t i = 0; i < k; ++i) {
      top_scores[r * k + i] = token[i] >= 0 ? base + ((best[i] - peak) - logsum) : -INFINITY;
      top_tokens[r * k + i] = token[i] >= 0 ? token[i] : 0;
    }
  });
}

// ---- The torch operators: each checks what would make its kernel read or write out of bounds (few_rows.py's
// wrappers check the rest, with messages that name the argument), then runs the kernel with torch's thread count.

void check_fp32_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "med_few_rows::", op, ": ", name,
              " must be fp32 on the CPU, got ", t.scalar_type(), " on ", t.device());
}

// Whether t's last dimension is contiguous (of one element: its stride is never used).
bool last_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

const float* data_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// out = x B + bias (GELU optional), x (M, K) or (B, M, K) contiguous, panels (P, K, 48) for every x[i] or
// (B, P, K, 48), bias (N,) or none, out x's shape with N last, contiguous.
void matmul_into(const at::Tensor& x, const at::Tensor& panels, int64_t outputs, const std::optional<at::Tensor>& bias,
                 bool gelu, const at::Tensor& out) {
  for (const auto& [t, name] : {std::pair(&x, "x"), std::pair(&panels, "panels"), std::pair(&out, "out")}) {
    check_fp32_cpu(*t, "matmul", name);
    TORCH_CHECK(t->is_contiguous(), "med_few_rows::matmul: ", name, " must be contiguous");
  }
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "med_few_rows::matmul: x must be (M, K) or (B, M, K)");
  const int64_t batch = x.dim() == 3 ? x.size(0) : 1, M = x.size(-2), K = x.size(-1);
  const int64_t count = (outputs + kPanel - 1) / kPanel;
  const bool shared = panels.dim() == 3;
  TORCH_CHECK((shared || (panels.dim() == 4 && x.dim() == 3 && panels.size(0) == batch)) &&
                  panels.size(-3) == count && panels.size(-2) == K && panels.size(-1) == kPanel,
              "med_few_rows::matmul: panels ", panels.sizes(), " are not pack()'s for x ", x.sizes(), " and ",
              outputs, " outputs");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = outputs;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "med_few_rows::matmul: out must be ", at::IntArrayRef(shape),
              ", got ", out.sizes());
  if (bias) {
    check_fp32_cpu(*bias, "matmul", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == outputs && bias->is_contiguous(),
                "med_few_rows::matmul: bias must be (", outputs, ",) contiguous, got ", bias->sizes());
  }
  if (out.numel() == 0) return;
  matmul_kernel(x.data_ptr<float>(), batch, M * K, M, K, panels.data_ptr<float>(), shared ? 0 : count * K * kPanel,
                outputs, data_or_null(bias), 0, out.data_ptr<float>(), M * outputs, gelu ? 1 : 0,
                at::get_num_threads());
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& panels, int64_t outputs,
                  const std::optional<at::Tensor>& bias, bool gelu) {
  std::vector<int64_t> shape = x.sizes().vec();
  TORCH_CHECK(!shape.empty(), "med_few_rows::matmul: x must be (M, K) or (B, M, K)");
  shape.back() = outputs;
  at::Tensor out = at::empty(shape, x.options());
  matmul_into(x, panels, outputs, bias, gelu, out);
  return out;
}

// out = softmax(query keys_t * scale + mask) value per (batch, head): query (B, H, R, D), keys_t (B, H, D, S),
// value (B, H, S, D), mask (B, H, R, S) (strides 0 where broadcast) or none, out (B, H, R, D); any strides but
// a contiguous last dimension.
void attend_into(const at::Tensor& query, const at::Tensor& keys_t, const at::Tensor& value,
                 const std::optional<at::Tensor>& mask, double scale, const at::Tensor& out) {
  TORCH_CHECK(query.dim() == 4, "med_few_rows::attend: query must be (B, H, R, D)");
  const int64_t B = query.size(0), H = query.size(1), R = query.size(2), D = query.size(3), S = keys_t.size(-1);
  const std::array<std::tuple<const at::Tensor*, const char*, std::array<int64_t, 4>>, 5> tensors = {{
      {&query, "query", {B, H, R, D}}, {&keys_t, "keys_t", {B, H, D, S}}, {&value, "value", {B, H, S, D}},
      {mask ? &*mask : nullptr, "mask", {B, H, R, S}}, {&out, "out", {B, H, R, D}}}};
  for (const auto& [t, name, shape] : tensors) {
    if (!t) continue;
    check_fp32_cpu(*t, "attend", name);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && (t->numel() == 0 || last_contiguous(*t)),
                "med_few_rows::attend: ", name, " must be ", at::IntArrayRef(shape),
                " with a contiguous last dimension, got ", t->sizes(), " with strides ", t->strides());
  }
  if (out.numel() == 0) return;
  TORCH_CHECK(S > 0, "med_few_rows::attend needs at least one key");
  auto strides = [](const at::Tensor& t) { return std::array<int64_t, 3>{t.stride(0), t.stride(1), t.stride(2)}; };
  const auto q_strides = strides(query), k_strides = strides(keys_t), v_strides = strides(value),
             o_strides = strides(out);
  const auto m_strides = mask ? strides(*mask) : std::array<int64_t, 3>{};
  attend_kernel(query.data_ptr<float>(), q_strides.data(), keys_t.data_ptr<float>(), k_strides.data(),
                value.data_ptr<float>(), v_strides.data(), data_or_null(mask), mask ? m_strides.data() : nullptr,
                out.data_ptr<float>(), o_strides.data(), B, H, R, S, D, float(scale), at::get_num_threads());
}

at::Tensor attend(const at::Tensor& query, const at::Tensor& keys_t, const at::Tensor& value,
                  const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4, "med_few_rows::attend: query must be (B, H, R, D)");
  at::Tensor out = at::empty(query.sizes(), query.options());
  attend_into(query, keys_t, value, mask, scale, out);
  return out;
}

// One query per text row over its history: query (R, H, D) contiguous, keys and values (P, S, H, D) with the
// same strides and each position's rows (H, D) contiguous, source (R, T) int64 (T <= P) of stored rows < S.
at::Tensor attend_history(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor& source, double scale) {
  for (const auto& [t, name] : {std::pair(&query, "query"), std::pair(&keys, "keys"), std::pair(&values, "values")})
    check_fp32_cpu(*t, "attend_history", name);
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous() && keys.dim() == 4 && keys.sizes() == values.sizes() &&
                  keys.strides() == values.strides() && keys.size(2) == query.size(1) &&
                  keys.size(3) == query.size(2) && last_contiguous(keys) &&
                  (keys.size(2) <= 1 || keys.stride(2) == keys.size(3)),
              "med_few_rows::attend_history: query must be (R, H, D) contiguous and keys/values (P, S, H, D) "
              "alike, each position's rows contiguous; got ", query.sizes(), ", ", keys.sizes(), " and ",
              values.sizes());
  const int64_t R = query.size(0), H = query.size(1), D = query.size(2);
  TORCH_CHECK(source.device().is_cpu() && source.scalar_type() == at::kLong && source.dim() == 2 &&
                  source.size(0) == R && source.size(1) <= keys.size(0) && last_contiguous(source),
              "med_few_rows::attend_history: source must be int64 (", R, ", T <= ", keys.size(0),
              ") with contiguous rows, got ", source.scalar_type(), " ", source.sizes());
  const int64_t T = source.size(1);
  at::Tensor out = at::empty(query.sizes(), query.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(T > 0, "med_few_rows::attend_history needs at least one position");
  const int64_t* from = source.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = 0; p < T; ++p) {
      const int64_t row = from[r * source.stride(0) + p];
      TORCH_CHECK(row >= 0 && row < keys.size(1), "med_few_rows::attend_history: source rows must lie in 0 .. ",
                  keys.size(1) - 1, ", got ", row);
    }
  attend_history_kernel(query.data_ptr<float>(), R, H, D, keys.data_ptr<float>(), values.data_ptr<float>(),
                        keys.stride(0), keys.stride(1), from, source.stride(0), T, float(scale),
                        out.data_ptr<float>(), at::get_num_threads());
  return out;
}

// LayerNorm(x + residual) (residual none: of x) over the last dimension of contiguous rows (R, W).
at::Tensor add_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    const at::Tensor& bias, double eps) {
  TORCH_CHECK(x.dim() == 2, "med_few_rows::add_norm: x must be (R, W)");
  const int64_t width = x.size(1);
  const at::Tensor* added = residual ? &*residual : nullptr;
  for (const auto& [t, name, row] : {std::tuple(&x, "x", true), std::tuple(added, "residual", true),
                                     std::tuple(&weight, "weight", false), std::tuple(&bias, "bias", false)}) {
    if (!t) continue;
    check_fp32_cpu(*t, "add_norm", name);
    TORCH_CHECK(t->is_contiguous() && (row ? t->sizes() == x.sizes() : t->dim() == 1 && t->size(0) == width),
                "med_few_rows::add_norm: ", name, " must be contiguous, ", row ? "shaped as x " : "of x's width ",
                x.sizes(), ", got ", t->sizes());
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  add_norm_kernel(x.data_ptr<float>(), data_or_null(residual), weight.data_ptr<float>(), bias.data_ptr<float>(),
                  float(eps), out.data_ptr<float>(), x.size(0), width);
  return out;
}

// (beam_scores + log_softmax(logits))[:, eos] (-inf where eos < 0), then the k best of the other tokens and
// those tokens, best first: logits (R, V) with contiguous rows, beam_scores (R,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_candidates(const at::Tensor& logits, const at::Tensor& beam_scores,
                                                               int64_t eos, int64_t k) {
  check_fp32_cpu(logits, "beam_candidates", "logits");
  check_fp32_cpu(beam_scores, "beam_candidates", "beam_scores");
  TORCH_CHECK(logits.dim() == 2 && (logits.numel() == 0 || last_contiguous(logits)) && beam_scores.dim() == 1 &&
                  beam_scores.size(0) == logits.size(0) && beam_scores.is_contiguous(),
              "med_few_rows::beam_candidates: logits must be (R, V) with contiguous rows and beam_scores (R,), got ",
              logits.sizes(), " and ", beam_scores.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(0 < k && k <= vocab - (eos >= 0 ? 1 : 0) && eos < vocab,
              "med_few_rows::beam_candidates: needs 0 < k < V and eos < V, got k=", k, ", eos=", eos, ", V=", vocab);
  at::Tensor ending = at::empty({rows}, logits.options()), scores = at::empty({rows, k}, logits.options());
  at::Tensor tokens = at::empty({rows, k}, logits.options().dtype(at::kLong));
  if (rows)
    beam_candidates_kernel(logits.data_ptr<float>(), rows, vocab, logits.stride(0), beam_scores.data_ptr<float>(),
                           eos < 0 ? -1 : eos, k, ending.data_ptr<float>(), scores.data_ptr<float>(),
                           tokens.data_ptr<int64_t>(), at::get_num_threads());
  return {ending, scores, tokens};
}

}  // namespace

// The schemas few_rows.py calls (torch.ops.med_few_rows.*) and gives fake implementations, so that the profiler,
// torch.compile and FakeTensor see each call as one operator.
TORCH_LIBRARY(med_few_rows, m) {
  m.def("matmul(Tensor x, Tensor panels, int outputs, Tensor? bias, bool gelu) -> Tensor");
  m.def("matmul_into(Tensor x, Tensor panels, int outputs, Tensor? bias, bool gelu, Tensor(a!) out) -> ()");
  m.def("attend(Tensor query, Tensor keys_t, Tensor value, Tensor? mask, float scale) -> Tensor");
  m.def("attend_into(Tensor query, Tensor keys_t, Tensor value, Tensor? mask, float scale, Tensor(a!) out) -> ()");
  m.def("attend_history(Tensor query, Tensor keys, Tensor values, Tensor source, float scale) -> Tensor");
  m.def("add_norm(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("beam_candidates(Tensor logits, Tensor beam_scores, int eos, int k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(med_few_rows, CPU, m) {
  m.impl("matmul", &matmul);
  m.impl("matmul_into", &matmul_into);
  m.impl("attend", &attend);
  m.impl("attend_into", &attend_into);
  m.impl("attend_history", &attend_history);
  m.impl("add_norm", &add_norm);
  m.impl("beam_candidates", &beam_candidates);
}

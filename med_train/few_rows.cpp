// y = x B + bias for a few rows of x (a decoding step's 1 to 64 text rows), fp32, AVX-512, OpenMP.
// Built and loaded by few_rows.py (see there for why); plain C ABI, no Python or torch headers.
//
// B (K x N) is packed once into panels of 48 columns, panels[p][k][j] = B[k][48 p + j], zeros past N, so that a
// panel is one sequential stream of K x 48 floats (reading B in place, row after row of a panel at B's row
// stride, made the bench's folded products 1.8 to 3 times slower). For each panel, a block of up to 8 rows
// keeps its 8 x 48 sums in 24 of the 32 vector registers; each k loads three vectors of the panel and adds them
// times x[r][k] (broadcast) to the row's sums: 24 multiply-adds per 3 loads, so the product runs near the FMA
// rate while streaming B once. The panels are split among the threads; a panel (K x 192 bytes: 147 KB for
// K = 768) stays in L2 while the other row blocks use it.
#include <immintrin.h>
#include <stdint.h>

namespace {

constexpr int kPanel = 48;        // outputs per panel: three 16-float vectors
constexpr int kRows = 8;          // rows per block: 8 x 3 sums in registers
constexpr int kPrefetch = 24;     // how many k ahead the panel is prefetched (24 x 192 bytes)

template <int R>
void block(const float* x, int64_t ldx, const float* panel, int64_t K, const float* bias, float* y, int64_t ldy,
           int64_t outputs) {
  __m512 sum[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) sum[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    const char* ahead = reinterpret_cast<const char*>(w + kPrefetch * kPanel);  // a hint: never faults
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * ldx + k]);
      sum[r][0] = _mm512_fmadd_ps(xr, w0, sum[r][0]);
      sum[r][1] = _mm512_fmadd_ps(xr, w1, sum[r][1]);
      sum[r][2] = _mm512_fmadd_ps(xr, w2, sum[r][2]);
    }
  }
  for (int j = 0; j < 3 && 16 * j < outputs; ++j) {
    const int64_t left = outputs - 16 * j;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, mask, _mm512_add_ps(sum[r][j], b));
  }
}

using Block = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t);
constexpr Block kBlocks[kRows + 1] = {nullptr, block<1>, block<2>, block<3>, block<4>,
                                      block<5>, block<6>, block<7>, block<8>};

}  // namespace

extern "C" {

// Bumped whenever the layout or the signatures below change (few_rows.py checks it).
int med_few_rows_version() { return 4; }

// For i < batch: y[i] = x[i] B[i] + bias[i], where x[i] (M, K) and y[i] (M, N) are row-major at x + i * x_stride
// and y + i * y_stride, B[i] is packed as above at panels + i * panels_stride, and bias[i] (N) is at
// bias + i * bias_stride (bias null: none). `threads` OpenMP threads (torch's count: the caller's thread may not
// carry torch's setting) share the batch's panels.
void med_few_rows_matmul(const float* x, int64_t batch, int64_t x_stride, int64_t M, int64_t K, const float* panels,
                         int64_t panels_stride, int64_t N, const float* bias, int64_t bias_stride, float* y,
                         int64_t y_stride, int threads) {
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
      kBlocks[rows](xi + m * K, K, panel, K, bi, yi + m * N, N, outputs);
    }
  };
  if (threads > 1 && batch * count > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < batch * count; ++t) task(t);
  } else {  // no OpenMP region at all: entering even a one-thread team costs microseconds per call
    for (int64_t t = 0; t < batch * count; ++t) task(t);
  }
}

}  // extern "C"

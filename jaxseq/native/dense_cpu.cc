// Dense layers y = act(x W + b) on x86-64 CPUs with AVX-512, as XLA FFI custom calls, in float32, with
// the bias, the GELU (tanh approximation, GPT-2's "gelu_new") and their gradients fused in.
//
// Why: in the GPT train step the dense layers' matmuls ran at ~110 GFLOP/s inside the step (YNNPACK,
// and Eigen for the weight gradients beside it) where a lone matmul of the same shape reaches ~150-190,
// and the bias sums, the GELU and its derivative were passes of their own (benchmarks/README.md, GPT
// attempts 4, 7, 8). Here each matmul is the 8 x 32 register tile of kernels.h over a packed B operand,
// and the elementwise work happens while the data is in cache.
//
//   jaxseq_dense_fwd:       x [M, K], w [K, N], b [N]; attribute gelu (bool) -> y [M, N]
//   jaxseq_dense_fwd_train: the same                                        -> y [M, N], pre [M, N]
//     (pre = x W + b, the GELU's input, kept for the backward; with gelu false it is never read)
//   jaxseq_dense_bwd: x, w, pre, dy [M, N]; attribute gelu -> dx [M, K], dw [K, N], db [N]
//
// K and N must be multiples of 32 (the tile's width); M is any. Each call runs in phases of independent
// units on XLA's CPU threads (pool.h):
//   forward:  pack W into 32-column panels; then blocks of kRowBlock rows of y;
//   backward: pack W^T the same way; then blocks of rows of g = dy * GELU'(pre) (or g = dy) and of
//             dx = g W^T; then dW = x^T g over chunks of kChunk rows, in as many parts of dW's longer
//             side as there are threads, with db summed while g is packed.
// Every output element is a sum in an order fixed by the shapes alone, so results are bit-identical
// whatever the number of threads.

#include <cmath>
#include <cstring>

#include "kernels.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxseq_native;

constexpr int64_t kPanel = 32;   // columns of a tile, and of a packed panel
constexpr int64_t kRowBlock = 64;  // rows of x that meet each packed panel in turn (their A rows stay in L1/L2)
constexpr int64_t kChunk = 256;  // rows of x and g packed at a time for dW (measured: 128 and 512 were slower)
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// tanh(u) = 1 - 2 / (1 + e^{2u}); exp_ps saturates, so large |u| give exactly +-1.
inline __m512 tanh_ps(__m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_ps(_mm512_add_ps(u, u));
  return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(one, e)));
}

inline __m512 gelu_inner(__m512 x) {  // sqrt(2/pi) (x + 0.044715 x^3)
  const __m512 x2 = _mm512_mul_ps(x, x);
  return _mm512_mul_ps(_mm512_set1_ps(kGeluC), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluA), x2), x, x));
}

// 0.5 x (1 + tanh(inner(x)))
inline __m512 gelu_ps(__m512 x) {
  const __m512 half_x = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
  return _mm512_fmadd_ps(half_x, tanh_ps(gelu_inner(x)), half_x);
}

// d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(inner(x))
inline __m512 gelu_grad_ps(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512 t = tanh_ps(gelu_inner(x));
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 dinner = _mm512_mul_ps(_mm512_set1_ps(kGeluC), _mm512_fmadd_ps(_mm512_set1_ps(3.0f * kGeluA), x2, one));
  const __m512 sech2 = _mm512_fnmadd_ps(t, t, one);
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(half, x), sech2), dinner, _mm512_mul_ps(half, _mm512_add_ps(one, t)));
}

struct Shape {
  int64_t M, K, N;
};

// [first, last) of n items for part t of nt.
inline void split(int64_t n, int64_t t, int64_t nt, int64_t* first, int64_t* last) {
  *first = n * t / nt;
  *last = n * (t + 1) / nt;
}

inline int64_t row_blocks(int64_t M) { return (M + kRowBlock - 1) / kRowBlock; }

// Panels [p0, p1) of B (rows x cols, element (r, c) at src[r * ld + c], or at src[c * ld + r] when
// transposed) into dst[p][r][kPanel].
void pack_panels(const float* src, int64_t ld, bool transposed, int64_t rows, int64_t p0, int64_t p1, float* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = dst + p * rows * kPanel;
    if (!transposed) {
      for (int64_t r = 0; r < rows; ++r) std::memcpy(panel + r * kPanel, src + r * ld + p * kPanel, kPanel * sizeof(float));
    } else {
      for (int64_t c = 0; c < kPanel; ++c) {
        const float* col = src + (p * kPanel + c) * ld;
        for (int64_t r = 0; r < rows; ++r) panel[r * kPanel + c] = col[r];
      }
    }
  }
}

// C[mb:me, :] = A[mb:me, :] Bp (+ bias) for row block `block` (kRowBlock rows), A [M, Kc] row-major, Bp
// the packed [Kc, Nc]; `after(m, rows, c)` runs on each finished 8 x 32 block at column c (the GELU,
// while the block is in L1).
template <typename After>
void block_times_panels(const float* A, int64_t M, int64_t Kc, const float* Bp, int64_t Nc, const float* bias,
                        float* C, int64_t block, After after) {
  const Seg none{nullptr, 0, nullptr, 0, 0};
  const int64_t mb = block * kRowBlock, me = std::min(M, mb + kRowBlock);
  for (int64_t p = 0; p < Nc / kPanel; ++p) {
    const float* panel = Bp + p * Kc * kPanel;
    const int64_t c = p * kPanel;
    const __m512 b0 = bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_loadu_ps(bias + c + 16) : _mm512_setzero_ps();
    for (int64_t m = mb; m < me; m += kMR) {
      float* out = C + m * Nc + c;
      auto store = [&](int r, __m512 a0, __m512 a1) {
        _mm512_storeu_ps(out + r * Nc, _mm512_add_ps(a0, b0));
        _mm512_storeu_ps(out + r * Nc + 16, _mm512_add_ps(a1, b1));
      };
      const int rows = static_cast<int>(std::min<int64_t>(kMR, me - m));
      tile_rows(rows, Seg{A + m * Kc, Kc, panel, kPanel, Kc}, none, store);
      after(m, rows, c);
    }
  }
}

// One thread-local scratch buffer per calling thread, grown as needed: the packed weights and g are
// megabytes, and a fresh allocation of that size is a fresh mmap whose pages fault in on every call.
float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) {
    buffer = std::vector<float>(floats);
    advise_huge(buffer.data(), floats * sizeof(float));
  }
  return buffer.data();
}

void forward(xla::ffi::ThreadPool& pool, const Shape& s, const float* x, const float* w, const float* b, bool gelu,
             float* y, float* pre) {
  if (s.M == 0) return;
  float* wp = scratch(s.K * s.N);
  // Without a separate `pre`, y holds x W + b first and the GELU overwrites it in place.
  float* lin = (gelu && pre) ? pre : y;
  parallel_for(pool, s.N / kPanel, [&](int64_t p) { pack_panels(w, s.N, false, s.K, p, p + 1, wp); });
  parallel_for(pool, row_blocks(s.M), [&](int64_t block) {
    block_times_panels(x, s.M, s.K, wp, s.N, b, lin, block, [&](int64_t m, int rows, int64_t c) {
      if (!gelu) return;
      for (int r = 0; r < rows; ++r)
        for (int64_t j = 0; j < kPanel; j += 16) {
          const int64_t at = (m + r) * s.N + c + j;
          _mm512_storeu_ps(y + at, gelu_ps(_mm512_loadu_ps(lin + at)));
        }
    });
  });
}

// dW[strips s0..s1 of 8 rows, panels p0..p1] = x^T g over all M rows, in chunks of kChunk rows; the
// thread that owns panel p's sums (sum_db) adds g's columns into db while packing them.
void weight_grad(const Shape& s, const float* x, const float* g, int64_t s0, int64_t s1, int64_t p0, int64_t p1,
                 bool sum_db, float* xs, float* gp, float* dw, float* db) {
  const Seg none{nullptr, 0, nullptr, 0, 0};
  for (int64_t m0 = 0; m0 < s.M; m0 += kChunk) {
    const int64_t rows = std::min(kChunk, s.M - m0);
    for (int64_t m = 0; m < rows; ++m) {  // x's strips as [strip][row][8], g's panels as [panel][row][32]
      const float* xrow = x + (m0 + m) * s.K;
      const float* grow = g + (m0 + m) * s.N;
      for (int64_t q = s0; q < s1; ++q) std::memcpy(xs + ((q - s0) * rows + m) * kMR, xrow + q * kMR, kMR * sizeof(float));
      for (int64_t p = p0; p < p1; ++p) std::memcpy(gp + ((p - p0) * rows + m) * kPanel, grow + p * kPanel, kPanel * sizeof(float));
    }
    if (sum_db)
      for (int64_t p = p0; p < p1; ++p) {
        __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
        for (int64_t m = 0; m < rows; ++m) {
          c0 = _mm512_add_ps(c0, _mm512_loadu_ps(gp + ((p - p0) * rows + m) * kPanel));
          c1 = _mm512_add_ps(c1, _mm512_loadu_ps(gp + ((p - p0) * rows + m) * kPanel + 16));
        }
        float* out = db + p * kPanel;
        _mm512_storeu_ps(out, m0 == 0 ? c0 : _mm512_add_ps(c0, _mm512_loadu_ps(out)));
        _mm512_storeu_ps(out + 16, m0 == 0 ? c1 : _mm512_add_ps(c1, _mm512_loadu_ps(out + 16)));
      }
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t q = s0; q < s1; ++q) {
        float* out = dw + q * kMR * s.N + p * kPanel;
        auto store = [&](int r, __m512 a0, __m512 a1) {
          if (m0 > 0) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(out + r * s.N));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(out + r * s.N + 16));
          }
          _mm512_storeu_ps(out + r * s.N, a0);
          _mm512_storeu_ps(out + r * s.N + 16, a1);
        };
        tile<kMR, true>(Seg{xs + (q - s0) * rows * kMR, kMR, gp + (p - p0) * rows * kPanel, kPanel, rows}, none, store);
      }
  }
}

void backward(xla::ffi::ThreadPool& pool, const Shape& s, const float* x, const float* w, const float* pre,
              const float* dy, bool gelu, float* dx, float* dw, float* db) {
  if (s.M == 0) {
    std::fill(dw, dw + s.K * s.N, 0.0f);
    std::fill(db, db + s.N, 0.0f);
    return;
  }
  // dW's parts split its longer side (8-row strips of K, or 32-column panels of N) and each packs the
  // whole of the other operand's chunk, which is then the smaller copy.
  const bool split_k = s.K > s.N;
  const int64_t nt = std::min<int64_t>(max_threads(), split_k ? s.K / kMR : s.N / kPanel);
  const int64_t pack_floats = kChunk * (split_k ? (s.K / nt + kMR) + s.N : s.K + (s.N / nt + kPanel));
  float* wtp = scratch(s.K * s.N + (gelu ? s.M * s.N : 0) + nt * pack_floats);
  float* g = gelu ? wtp + s.K * s.N : const_cast<float*>(dy);
  float* packs = wtp + s.K * s.N + (gelu ? s.M * s.N : 0);
  parallel_for(pool, s.K / kPanel, [&](int64_t p) { pack_panels(w, s.N, true, s.N, p, p + 1, wtp); });  // W^T [N, K]
  parallel_for(pool, row_blocks(s.M), [&](int64_t block) {
    if (gelu)
      for (int64_t i = block * kRowBlock * s.N; i < std::min(s.M, (block + 1) * kRowBlock) * s.N; i += 16)
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_loadu_ps(dy + i), gelu_grad_ps(_mm512_loadu_ps(pre + i))));
    block_times_panels(g, s.M, s.N, wtp, s.K, nullptr, dx, block, [](int64_t, int, int64_t) {});
  });
  parallel_for(pool, nt, [&](int64_t t) {
    int64_t s0 = 0, s1 = s.K / kMR, q0 = 0, q1 = s.N / kPanel;
    if (split_k) split(s.K / kMR, t, nt, &s0, &s1); else split(s.N / kPanel, t, nt, &q0, &q1);
    float* xs = packs + t * pack_floats;
    weight_grad(s, x, g, s0, s1, q0, q1, !split_k || t == 0, xs, xs + kChunk * (s1 - s0) * kMR, dw, db);
  });
}

ffi::Error shape_of(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w, Shape* s) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("jaxseq dense kernel: x must be [M, K] and w [K, N]");
  *s = Shape{xd[0], xd[1], wd[1]};
  if (s->K % kPanel || s->N % kPanel)
    return ffi::Error::InvalidArgument("jaxseq dense kernel: K and N must be multiples of 32");
  return ffi::Error::Success();
}

ffi::Error DenseFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b, bool gelu,
                        ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto e = shape_of(x, w, &s); e.failure()) return e;
  forward(pool, s, x.typed_data(), w.typed_data(), b.typed_data(), gelu, y->typed_data(), nullptr);
  return ffi::Error::Success();
}

ffi::Error DenseFwdTrainImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b, bool gelu,
                             ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> pre) {
  Shape s;
  if (auto e = shape_of(x, w, &s); e.failure()) return e;
  forward(pool, s, x.typed_data(), w.typed_data(), b.typed_data(), gelu, y->typed_data(), pre->typed_data());
  return ffi::Error::Success();
}

ffi::Error DenseBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> pre,
                        ffi::Buffer<ffi::F32> dy, bool gelu, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db) {
  Shape s;
  if (auto e = shape_of(x, w, &s); e.failure()) return e;
  backward(pool, s, x.typed_data(), w.typed_data(), pre.typed_data(), dy.typed_data(), gelu, dx->typed_data(),
           dw->typed_data(), db->typed_data());
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqDenseFwd, DenseFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Attr<bool>("gelu").Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqDenseFwdTrain, DenseFwdTrainImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Attr<bool>("gelu").Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqDenseBwd, DenseBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Attr<bool>("gelu")
                                  .Ret<F32>().Ret<F32>().Ret<F32>());

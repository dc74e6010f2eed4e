// LayerNorm over the last axis on x86-64 CPUs with AVX-512, as XLA FFI custom calls, in float32.
//
// Why: XLA:CPU ran a Transformer block's LayerNorm as several passes (statistics, normalisation, and in
// the backward the row reductions and the column sums of dscale and dbias, as reduce-windows), ~3.5 ms
// for forward + backward at [4096, 256] and ~60 ms of the GPT train step at d 256 (benchmarks/README.md,
// GPT attempt 15). Here the forward is one pass over a row held in L1, the backward two.
//
//   jaxseq_layernorm_fwd: x [M, D], scale [D], bias [D]; attribute eps (f32)
//     -> y [M, D], mean [M], rstd [M]   (rstd = 1 / sqrt(var + eps), var = mean((x - mean)^2))
//   jaxseq_layernorm_bwd: x, scale, mean, rstd, dy [M, D] -> dx [M, D], dscale [D], dbias [D]
//
// D must be a multiple of 16. The work goes in chunks of kChunk rows to XLA's CPU threads (pool.h).
// dscale and dbias are sums over the rows, taken per chunk and the chunks' sums added in order, so
// results are bit-identical whatever the number of threads.

#include <cmath>

#include "kernels.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxseq_native;

constexpr int64_t kChunk = 64;  // rows per partial sum of dscale and dbias

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

void forward(xla::ffi::ThreadPool& pool, int64_t M, int64_t D, const float* x, const float* scale, const float* bias,
             float eps, float* y, float* mean, float* rstd) {
  parallel_for(pool, (M + kChunk - 1) / kChunk, [&](int64_t chunk) {
    for (int64_t m = chunk * kChunk; m < std::min(M, (chunk + 1) * kChunk); ++m) {
      const float* xr = x + m * D;
      __m512 s = _mm512_setzero_ps();
      for (int64_t e = 0; e < D; e += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(xr + e));
      const float mu = hsum(s) / D;
      const __m512 vmu = _mm512_set1_ps(mu);
      __m512 ss = _mm512_setzero_ps();
      for (int64_t e = 0; e < D; e += 16) {
        const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(xr + e), vmu);
        ss = _mm512_fmadd_ps(c, c, ss);
      }
      const float r = 1.0f / std::sqrt(hsum(ss) / D + eps);
      const __m512 vr = _mm512_set1_ps(r);
      for (int64_t e = 0; e < D; e += 16) {
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + e), vmu), vr);
        _mm512_storeu_ps(y + m * D + e, _mm512_fmadd_ps(xhat, _mm512_loadu_ps(scale + e), _mm512_loadu_ps(bias + e)));
      }
      mean[m] = mu;
      rstd[m] = r;
    }
  });
}

void backward(xla::ffi::ThreadPool& pool, int64_t M, int64_t D, const float* x, const float* scale, const float* mean,
              const float* rstd, const float* dy, float* dx, float* dscale, float* dbias) {
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  std::vector<float> parts(2 * chunks * D);  // per chunk: sum of dy * xhat, then of dy
  parallel_for(pool, chunks, [&](int64_t chunk) {
    float* ps = parts.data() + 2 * chunk * D;
    float* pb = ps + D;
    std::fill(ps, ps + 2 * D, 0.0f);
    for (int64_t m = chunk * kChunk; m < std::min(M, (chunk + 1) * kChunk); ++m) {
      const float* xr = x + m * D;
      const float* gr = dy + m * D;
      const __m512 vmu = _mm512_set1_ps(mean[m]), vr = _mm512_set1_ps(rstd[m]);
      __m512 sg = _mm512_setzero_ps(), sgx = _mm512_setzero_ps();  // sums of g = dy * scale and g * xhat
      for (int64_t e = 0; e < D; e += 16) {
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + e), vmu), vr);
        const __m512 d = _mm512_loadu_ps(gr + e);
        const __m512 g = _mm512_mul_ps(d, _mm512_loadu_ps(scale + e));
        sg = _mm512_add_ps(sg, g);
        sgx = _mm512_fmadd_ps(g, xhat, sgx);
        _mm512_storeu_ps(ps + e, _mm512_fmadd_ps(d, xhat, _mm512_loadu_ps(ps + e)));
        _mm512_storeu_ps(pb + e, _mm512_add_ps(d, _mm512_loadu_ps(pb + e)));
      }
      // dx = rstd (g - mean(g) - xhat mean(g xhat))
      const __m512 mg = _mm512_set1_ps(hsum(sg) / D), mgx = _mm512_set1_ps(hsum(sgx) / D);
      for (int64_t e = 0; e < D; e += 16) {
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xr + e), vmu), vr);
        const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(gr + e), _mm512_loadu_ps(scale + e));
        _mm512_storeu_ps(dx + m * D + e, _mm512_mul_ps(vr, _mm512_sub_ps(_mm512_sub_ps(g, mg), _mm512_mul_ps(xhat, mgx))));
      }
    }
  });
  // The chunks' partials, added in chunk order, 16 columns at a time.
  parallel_for(pool, D / 16, [&](int64_t vec) {
    const int64_t e = 16 * vec;
    __m512 s = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      s = _mm512_add_ps(s, _mm512_loadu_ps(parts.data() + 2 * c * D + e));
      b = _mm512_add_ps(b, _mm512_loadu_ps(parts.data() + (2 * c + 1) * D + e));
    }
    _mm512_storeu_ps(dscale + e, s);
    _mm512_storeu_ps(dbias + e, b);
  });
}

ffi::Error check(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale, int64_t* M, int64_t* D) {
  const auto xd = x.dimensions();
  if (xd.size() != 2 || scale.element_count() != xd[1] || xd[1] % 16)
    return ffi::Error::InvalidArgument("jaxseq layernorm kernel: needs x [M, D] with D % 16 == 0 and scale, bias [D]");
  *M = xd[0];
  *D = xd[1];
  return ffi::Error::Success();
}

ffi::Error LayerNormFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, float eps,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd) {
  int64_t M, D;
  if (auto e = check(x, scale, &M, &D); e.failure()) return e;
  forward(pool, M, D, x.typed_data(), scale.typed_data(), bias.typed_data(), eps, y->typed_data(), mean->typed_data(),
          rstd->typed_data());
  return ffi::Error::Success();
}

ffi::Error LayerNormBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                            ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  int64_t M, D;
  if (auto e = check(x, scale, &M, &D); e.failure()) return e;
  backward(pool, M, D, x.typed_data(), scale.typed_data(), mean.typed_data(), rstd.typed_data(), dy.typed_data(),
           dx->typed_data(), dscale->typed_data(), dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLayerNormFwd, LayerNormFwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Attr<float>("eps")
                                  .Ret<F32>().Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLayerNormBwd, LayerNormBwdImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>());

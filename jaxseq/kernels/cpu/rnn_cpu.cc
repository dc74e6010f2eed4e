// The LSTM's and the GRU's recurrent loops on x86-64 CPUs with AVX-512, as XLA FFI custom calls.
// The LSTM is described here; the GRU, built from the same parts, in its section below.
//
// Why: in XLA:CPU each step of jaxseq's fused loop is ~12 ops that XLA dispatches one after another,
// with the per-step matmul handed to a library and its second thread joining late; the loops ran at
// ~245 us a step against ~105 us for oneDNN's (benchmarks/README.md, "Measurement history"). Here each
// step is one matmul kernel ([h_t-1 | x_t] [W_hh; W_ih]) whose epilogue is the LSTM cell, split over
// threads by hidden units, with one barrier per step (its own std::threads, not XLA's pool: a pool
// helper that never starts would deadlock a per-step barrier). The weight-gradient and input-gradient matmuls
// after the backward loop stay in XLA.
//
// Layout: batch-major, float32. Gate columns are in "panel order": panel p holds the 32 columns
// [i, f, g, o] x units 8p..8p+7, so the epilogue of a 8-row x 32-column tile has every gate of 8
// units and updates their cell in registers. The kernels pack the weights that way themselves;
// jaxseq/kernels/cpu/rnn.py permutes the bias and permutes dz's columns back in the weight gradients.
//
//   jaxseq_lstm_fwd (training):
//     x [B, T, D], w_ih [D, 4H], bias [4H] (panel order), w_hh [H, 4H], h0, c0 [B, H], mask, resets
//     [B, T] (pred); the weights in jaxseq's order, packed into panels by each call
//     -> ys [B, T, H], gates [B * T, 4H] (activated), hs, cs [B, T, H] (the carry entering each step,
//        after resets), hT, cT [B, H]
//   jaxseq_lstm_infer: the same inputs -> ys, hT, cT
//   jaxseq_lstm_bwd:
//     gates, cs, w_hh [H, 4H] (jaxseq's order), mask, resets, dys [B, T, H], dhT, dcT [B, H]
//     -> dz [B * T, 4H] (gate pre-activation cotangents; aliases gates), dh0, dc0 [B, H]
//
// Semantics are those of jaxseq.kernels.fused_rnn.lstm_sequence: a reset before step t replaces the carry by
// (h0, c0); a masked step holds the carry and outputs 0; cotangents follow the same rules.

#include <string>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxseq_native;

// tanh as XLA:CPU and Eigen compute it: a 13/6 rational approximation on [-7.9, 7.9] (float32 to a
// few ulp; 3.2e-7 absolute error measured on [-12, 12]), the identity below 4e-4.
inline __m512 tanh_ps(__m512 x) {
  const __m512 clamp = _mm512_set1_ps(7.90531110763549805f);
  const __m512 xc = _mm512_max_ps(_mm512_min_ps(x, clamp), _mm512_sub_ps(_mm512_setzero_ps(), clamp));
  const __m512 x2 = _mm512_mul_ps(xc, xc);
  __m512 p = _mm512_set1_ps(-2.76076847742355e-16f);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.00018790482477e-13f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-8.60467152213735e-11f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(5.12229709037114e-08f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(1.48572235717979e-05f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(6.37261928875436e-04f));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(4.89352455891786e-03f));
  p = _mm512_mul_ps(p, xc);
  __m512 q = _mm512_set1_ps(1.19825839466702e-06f);
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(1.18534705686654e-04f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(2.26843463243900e-03f));
  q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(4.89352518554385e-03f));
  const __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(0.0004f), _CMP_LT_OQ);
  // p / q as p * (1 / q) with the reciprocal estimate refined by one Newton step: 5.4 ulp at most
  // against 4.7 for a division, and the training step 4-10% faster (measured; divisions are slow).
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  return _mm512_mask_mov_ps(_mm512_mul_ps(p, r), tiny, x);
}

inline __m256 tanh8(__m256 x) { return _mm512_castps512_ps256(tanh_ps(_mm512_castps256_ps512(x))); }


// Column q of the LSTM's panel order -> column of jaxseq's [i | f | g | o] order (blocks of H).
inline int64_t source_column(int64_t q, int64_t H) { return ((q % 32) / 8) * H + 8 * (q / 32) + q % 8; }

// Panels p0..p1 of W [K, ld] -> out [p1 - p0][K][32]: out[p][k][c] = W[k, source(32 p + c)], or 0 where
// source gives -1. The kernel's matmuls stream B panels contiguously: read in place from W, each
// panel's rows sat ld floats apart, on the same few L1 sets, and the two LSTM loops took 53 against
// 29 ms (hidden 256, under the profiler).
template <typename Source>
void pack_panels(const float* W, int64_t K, int64_t ld, int64_t p0, int64_t p1, float* out, Source source) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < 32; ++c) {
      const int64_t col = source(p * 32 + c);
      for (int64_t k = 0; k < K; ++k) out[((p - p0) * K + k) * 32 + c] = col < 0 ? 0.0f : W[k * ld + col];
    }
}

// Panels q0..q1 of W^T for the backward matmul over K gate columns: out[q][k][v] = W[32 q + v, source(k)]
// (W [H, ld], row = hidden unit).
template <typename Source>
void pack_panels_transposed(const float* W, int64_t ld, int64_t K, int64_t q0, int64_t q1, float* out, Source source) {
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t col = source(k);
      for (int64_t v = 0; v < 32; ++v) out[((q - q0) * K + k) * 32 + v] = W[(32 * q + v) * ld + col];
    }
}

// Threads for a call: one per group of 32 hidden units at most, at most the machine's cores
// (JAXSEQ_NATIVE_THREADS overrides).
int thread_count(int64_t hidden) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({max_threads(), hidden / 32, 64})));
}

struct Dims {
  int64_t B, T, H;
};

// B, T from the mask [B, T]; H from w_hh [H, gates * H] (4 gates for the LSTM, 3 for the GRU).
ffi::Error dims(const ffi::Buffer<ffi::PRED>& mask, const ffi::Buffer<ffi::F32>& w_hh, int64_t gates, Dims* d) {
  auto md = mask.dimensions();
  auto wd = w_hh.dimensions();
  if (md.size() != 2 || wd.size() != 2 || wd[1] != gates * wd[0] || wd[0] % 32 != 0)
    return ffi::Error::InvalidArgument("jaxseq RNN kernel: mask must be [B, T] and W_hh [H, " + std::to_string(gates) +
                                       "H] with H % 32 == 0");
  d->B = md[0], d->T = md[1], d->H = wd[0];
  return ffi::Error::Success();
}


// One forward step's matmuls over this thread's panels p0..p1: cell(b, p, z0, z1) receives row b's 32
// pre-activations of panel p, bias added, from [h | x_t] [W_hh; W_ih] (the panels packed by the caller;
// h's rows ldh apart, x [B, T, D]).
template <typename Cell>
void step_tiles(int64_t B, int64_t T, int64_t t, int64_t p0, int64_t p1, const float* bias, const float* h, int64_t ldh,
                const float* w_hh, int64_t H, const float* x, int64_t D, const float* w_ih, Cell& cell) {
  for (int64_t p = p0; p < p1; ++p) {
    const __m512 bias0 = _mm512_loadu_ps(bias + p * 32), bias1 = _mm512_loadu_ps(bias + p * 32 + 16);
    for (int64_t r0 = 0; r0 < B; r0 += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, B - r0));
      auto epilogue = [&](int r, __m512 acc0, __m512 acc1) {
        cell(r0 + r, p, _mm512_add_ps(acc0, bias0), _mm512_add_ps(acc1, bias1));
      };
      const Seg rec{h + r0 * ldh, ldh, w_hh + (p - p0) * H * 32, 32, H};
      const Seg inp{x + (r0 * T + t) * D, T * D, w_ih + (p - p0) * D * 32, 32, D};
      tile_rows(rows, rec, inp, epilogue);
    }
  }
}

// ------------------------------------------------------------------------------------ forward

struct Forward {
  const float* x;  // [B, T, D]
  const float* w_ih;  // [D, 4H] in jaxseq's order (packed into panels here)
  int64_t D;
  const float* bias;  // [4H], panel order
  const float *w_hh, *h0, *c0;  // w_hh [H, 4H] in jaxseq's order (packed into panels here)
  const bool *mask, *resets;
  float* ys;
  float *gates, *hs, *cs;  // training only (else null)
  float *hT, *cT;
};

void forward(Dims d, const Forward& a) {
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H;
  const int n = thread_count(H);
  // h's rows 16 floats further apart than H: at a power-of-two stride the 8 rows a tile reads would
  // share L1 sets (4K aliasing)
  const int64_t ldh = H + 16;
  std::vector<float> hbuf(2 * B * ldh), c(B * H);
  Barrier barrier(n);
  // lanes of [i f | g o]: sigmoid(x) = 0.5 tanh(x / 2) + 0.5 and tanh(x) = 1 tanh(1 x) + 0
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 a_go = _mm512_insertf32x8(_mm512_set1_ps(1.0f), _mm256_set1_ps(0.5f), 1);
  const __m512 b_go = _mm512_insertf32x8(_mm512_setzero_ps(), _mm256_set1_ps(0.5f), 1);

  if (a.gates != nullptr) {
    advise_huge(a.gates, B * T * G * 4);
    advise_huge(a.hs, B * T * H * 4);
    advise_huge(a.cs, B * T * H * 4);
  }
  advise_huge(a.ys, B * T * H * 4);
  run_threads(n, [&](int tid) {
    const int64_t u0 = (H / 32) * tid / n * 32, u1 = (H / 32) * (tid + 1) / n * 32;  // this thread's units
    const int64_t p0 = u0 / 8, p1 = u1 / 8;  // and its panels
    std::vector<float> w_hh((p1 - p0) * H * 32), w_ih((p1 - p0) * a.D * 32);
    auto lstm_column = [H](int64_t q) { return source_column(q, H); };
    pack_panels(a.w_hh, H, 4 * H, p0, p1, w_hh.data(), lstm_column);
    pack_panels(a.w_ih, a.D, 4 * H, p0, p1, w_ih.data(), lstm_column);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) hbuf[b * ldh + j] = a.h0[b * H + j], c[b * H + j] = a.c0[b * H + j];
    barrier.wait();
    for (int64_t t = 0; t < T; ++t) {
      const float* cur = hbuf.data() + (t & 1) * B * ldh;
      float* nxt = hbuf.data() + ((t + 1) & 1) * B * ldh;
      if (a.hs != nullptr)
        for (int64_t b = 0; b < B; ++b) {
          std::copy(cur + b * ldh + u0, cur + b * ldh + u1, a.hs + (b * T + t) * H + u0);
          std::copy(c.data() + b * H + u0, c.data() + b * H + u1, a.cs + (b * T + t) * H + u0);
        }
      auto cell = [&](int64_t b, int64_t p, __m512 z0, __m512 z1) {
        const int64_t bt = b * T + t;
        const __m512 i_f = _mm512_fmadd_ps(tanh_ps(_mm512_mul_ps(z0, half)), half, half);
        const __m512 g_o = _mm512_fmadd_ps(tanh_ps(_mm512_mul_ps(z1, a_go)), a_go, b_go);
        if (a.gates != nullptr) {
          _mm512_storeu_ps(a.gates + bt * G + p * 32, i_f);
          _mm512_storeu_ps(a.gates + bt * G + p * 32 + 16, g_o);
        }
        const __m256 i = _mm512_castps512_ps256(i_f), f = _mm512_extractf32x8_ps(i_f, 1);
        const __m256 g = _mm512_castps512_ps256(g_o), o = _mm512_extractf32x8_ps(g_o, 1);
        float* cb = c.data() + b * H + p * 8;
        const __m256 c_old = _mm256_loadu_ps(cb);
        const __m256 c_new = _mm256_fmadd_ps(f, c_old, _mm256_mul_ps(i, g));
        const __m256 h_new = _mm256_mul_ps(o, tanh8(c_new));
        const bool m = a.mask[bt];
        _mm256_storeu_ps(a.ys + bt * H + p * 8, m ? h_new : _mm256_setzero_ps());
        __m256 h_next = m ? h_new : _mm256_loadu_ps(cur + b * ldh + p * 8);
        __m256 c_next = m ? c_new : c_old;
        if (t + 1 < T && a.resets[bt + 1]) {  // the next step starts from the initial carry
          h_next = _mm256_loadu_ps(a.h0 + b * H + p * 8);
          c_next = _mm256_loadu_ps(a.c0 + b * H + p * 8);
        }
        _mm256_storeu_ps(nxt + b * ldh + p * 8, h_next);
        _mm256_storeu_ps(cb, c_next);
      };
      step_tiles(B, T, t, p0, p1, a.bias, cur, ldh, w_hh.data(), H, a.x, a.D, w_ih.data(), cell);
      barrier.wait();
    }
    const float* last = hbuf.data() + (T & 1) * B * ldh;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) a.hT[b * H + j] = last[b * ldh + j], a.cT[b * H + j] = c[b * H + j];
  });
}

// Checks the shapes and runs `forward`; gates, hs and cs are null for inference.
ffi::Error checked_forward(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w_ih,
                           const ffi::Buffer<ffi::F32>& bias, const ffi::Buffer<ffi::F32>& w_hh,
                           const ffi::Buffer<ffi::F32>& h0, const ffi::Buffer<ffi::F32>& c0,
                           const ffi::Buffer<ffi::PRED>& mask, const ffi::Buffer<ffi::PRED>& resets, float* ys,
                           float* gates, float* hs, float* cs, float* hT, float* cT) {
  Dims d;
  if (auto e = dims(mask, w_hh, 4, &d); e.failure()) return e;
  auto xd = x.dimensions();
  if (xd.size() != 3 || xd[0] != d.B || xd[1] != d.T || w_ih.element_count() != xd[2] * 4 * d.H)
    return ffi::Error::InvalidArgument("jaxseq LSTM kernel: x must be [B, T, D] and W_ih [D, 4H]");
  forward(d, Forward{x.typed_data(), w_ih.typed_data(), xd[2], bias.typed_data(), w_hh.typed_data(), h0.typed_data(),
                     c0.typed_data(), mask.typed_data(), resets.typed_data(), ys, gates, hs, cs, hT, cT});
  return ffi::Error::Success();
}

// Training. The input projection x_t W_ih is part of each step's matmul (K = H + D), as in inference:
// measured against one XLA matmul for all steps before the kernel, training ran 10% faster at hidden
// 64-256 and level at 512 (that matmul's library threads kept spinning beside the kernel's).
ffi::Error LstmFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                       ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                       ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets, ffi::ResultBuffer<ffi::F32> ys,
                       ffi::ResultBuffer<ffi::F32> gates, ffi::ResultBuffer<ffi::F32> hs,
                       ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> hT,
                       ffi::ResultBuffer<ffi::F32> cT) {
  return checked_forward(x, w_ih, bias, w_hh, h0, c0, mask, resets, ys->typed_data(), gates->typed_data(),
                         hs->typed_data(), cs->typed_data(), hT->typed_data(), cT->typed_data());
}

// Inference: the same with nothing saved (at hidden 256, 22 ms against 32 ms with XLA's projection
// matmul before the kernel, measured).
ffi::Error LstmInferImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                         ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                         ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets, ffi::ResultBuffer<ffi::F32> ys,
                         ffi::ResultBuffer<ffi::F32> hT, ffi::ResultBuffer<ffi::F32> cT) {
  return checked_forward(x, w_ih, bias, w_hh, h0, c0, mask, resets, ys->typed_data(), nullptr, nullptr, nullptr,
                         hT->typed_data(), cT->typed_data());
}

// ------------------------------------------------------------------------------------ backward

// Phase 2 of a backward step, for this thread's units [u0, u1): dh[b, j] += dz_b W^T (dzs_t: the step's
// cotangents, rows ldz apart; w_t: this thread's packed panels of W^T over K columns). Phase 1 left in dh
// what is not a matmul. A row whose step began with a reset hands its result to dh0 and carries 0.
void backward_carry(int64_t B, int64_t T, int64_t H, int64_t t, int64_t u0, int64_t u1, const float* dzs_t, int64_t ldz,
                    const float* w_t, int64_t K, const bool* resets, float* dh, float* dh0) {
  for (int64_t q = u0 / 32; q < u1 / 32; ++q) {
    for (int64_t r0 = 0; r0 < B; r0 += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, B - r0));
      auto carry = [&](int r, __m512 d0, __m512 d1) {
        const int64_t b = r0 + r;
        float* dhb = dh + b * H + q * 32;
        d0 = _mm512_add_ps(d0, _mm512_loadu_ps(dhb)), d1 = _mm512_add_ps(d1, _mm512_loadu_ps(dhb + 16));
        if (resets[b * T + t]) {
          float* a = dh0 + b * H + q * 32;
          _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), d0));
          _mm512_storeu_ps(a + 16, _mm512_add_ps(_mm512_loadu_ps(a + 16), d1));
          d0 = d1 = _mm512_setzero_ps();
        }
        _mm512_storeu_ps(dhb, d0);
        _mm512_storeu_ps(dhb + 16, d1);
      };
      const Seg dz{dzs_t + r0 * ldz, ldz, w_t + (q - u0 / 32) * K * 32, 32, K};
      const Seg none{nullptr, 0, nullptr, 0, 0};
      tile_rows(rows, dz, none, carry);
    }
  }
}

void backward(Dims d, float* gz /* gates in, dz out */, const float* cs, const float* w_hh /* [H, 4H] */, const bool* mask,
              const bool* resets, const float* dys, const float* dhT, const float* dcT, float* dh0, float* dc0) {
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H;
  const int n = thread_count(H);
  std::vector<float> dh(B * H), dc(B * H);
  // Phase 2 reads dz from a copy with rows G + 16 floats apart: in the [B * T, 4H] buffer the 8 rows
  // of a tile sit T * 4H floats apart, all on the same L1 sets (2x slower, measured). Two copies: a
  // thread may write step t - 1's while the other still reads step t's.
  const int64_t ldz = G + 16;
  std::vector<float> dzs(2 * B * ldz);
  Barrier barrier(n);
  const __m256 one = _mm256_set1_ps(1.0f);

  run_threads(n, [&](int tid) {
    const int64_t u0 = (H / 32) * tid / n * 32, u1 = (H / 32) * (tid + 1) / n * 32;
    std::vector<float> w_hh_t((u1 - u0) * G);
    pack_panels_transposed(w_hh, G, G, u0 / 32, u1 / 32, w_hh_t.data(), [H](int64_t k) { return source_column(k, H); });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) {
        dh[b * H + j] = dhT[b * H + j], dc[b * H + j] = dcT[b * H + j];
        dh0[b * H + j] = 0.0f, dc0[b * H + j] = 0.0f;
      }
    for (int64_t t = T - 1; t >= 0; --t) {
      // Phase 1, this thread's units: the gate cotangents dz (over the activations, in place) and dc.
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bt = b * T + t;
        const bool m = mask[bt], r = resets[bt];
        for (int64_t p = u0 / 8; p < u1 / 8; ++p) {
          float* gp = gz + bt * G + p * 32;
          const int64_t j = b * H + p * 8;
          const __m256 dh_in = _mm256_loadu_ps(dh.data() + j), dc_in = _mm256_loadu_ps(dc.data() + j);
          const __m256 dhn = m ? _mm256_add_ps(dh_in, _mm256_loadu_ps(dys + bt * H + p * 8)) : _mm256_setzero_ps();
          const __m256 dcn = m ? dc_in : _mm256_setzero_ps();
          const __m256 i = _mm256_loadu_ps(gp), f = _mm256_loadu_ps(gp + 8);
          const __m256 g = _mm256_loadu_ps(gp + 16), o = _mm256_loadu_ps(gp + 24);
          const __m256 c = _mm256_loadu_ps(cs + bt * H + p * 8);
          const __m256 tc = tanh8(_mm256_fmadd_ps(f, c, _mm256_mul_ps(i, g)));
          const __m256 dcx = _mm256_fmadd_ps(_mm256_mul_ps(dhn, o), _mm256_fnmadd_ps(tc, tc, one), dcn);
          const __m256 dz[4] = {
              _mm256_mul_ps(_mm256_mul_ps(dcx, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i))),
              _mm256_mul_ps(_mm256_mul_ps(dcx, c), _mm256_mul_ps(f, _mm256_sub_ps(one, f))),
              _mm256_mul_ps(_mm256_mul_ps(dcx, i), _mm256_fnmadd_ps(g, g, one)),
              _mm256_mul_ps(_mm256_mul_ps(dhn, tc), _mm256_mul_ps(o, _mm256_sub_ps(one, o)))};
          float* zs = dzs.data() + ((t & 1) * B + b) * ldz + p * 32;
          for (int k = 0; k < 4; ++k) _mm256_storeu_ps(gp + 8 * k, dz[k]), _mm256_storeu_ps(zs + 8 * k, dz[k]);
          __m256 dc_prev = _mm256_mul_ps(dcx, f);
          if (!m) dc_prev = _mm256_add_ps(dc_prev, dc_in);  // a masked step passed the carry through
          if (r) {  // a reset step took the initial carry
            _mm256_storeu_ps(dc0 + j, _mm256_add_ps(_mm256_loadu_ps(dc0 + j), dc_prev));
            dc_prev = _mm256_setzero_ps();
          }
          _mm256_storeu_ps(dc.data() + j, dc_prev);
          _mm256_storeu_ps(dh.data() + j, m ? _mm256_setzero_ps() : dh_in);  // phase 2 adds it to dz W_hh^T
        }
      }
      barrier.wait();
      backward_carry(B, T, H, t, u0, u1, dzs.data() + (t & 1) * B * ldz, ldz, w_hh_t.data(), G, resets, dh.data(), dh0);
      // The next phase 1 reads only this thread's units of dh and dc, and writes dz of step t - 1
      // (in the other copy), which no phase 2 of step t reads: no barrier needed here.
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) dh0[b * H + j] += dh[b * H + j], dc0[b * H + j] += dc[b * H + j];
  });
}

ffi::Error LstmBwdImpl(ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> cs, ffi::Buffer<ffi::F32> w_hh,
                       ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets, ffi::Buffer<ffi::F32> dys,
                       ffi::Buffer<ffi::F32> dhT, ffi::Buffer<ffi::F32> dcT, ffi::ResultBuffer<ffi::F32> dz,
                       ffi::ResultBuffer<ffi::F32> dh0, ffi::ResultBuffer<ffi::F32> dc0) {
  Dims d;
  if (auto e = dims(mask, w_hh, 4, &d); e.failure()) return e;
  if (gates.element_count() != d.B * d.T * 4 * d.H) return ffi::Error::InvalidArgument("jaxseq LSTM kernel: gates must be [B * T, 4H]");
  if (dz->typed_data() != gates.typed_data())  // XLA honours the alias unless it had to copy
    std::copy_n(gates.typed_data(), gates.element_count(), dz->typed_data());
  backward(d, dz->typed_data(), cs.typed_data(), w_hh.typed_data(), mask.typed_data(), resets.typed_data(),
           dys.typed_data(), dhT.typed_data(), dcT.typed_data(), dh0->typed_data(), dc0->typed_data());
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------ GRU
//
// PyTorch's GRU: r, z = sigmoid(x W_i{r,z} + b_i{r,z} + h W_h{r,z} + b_h{r,z}),
// n = tanh(x W_in + b_in + r (h W_hn + b_hn)), h' = (1 - z) n + z h. A tile's 32 columns are
// [r, z, h W_hn, x W_in] for 8 units: the last two stay apart because r multiplies only the first,
// so the recurrent panel has zeros where x W_in goes and the input panel where h W_hn goes (a quarter
// of each matmul is zeros). Saved per step: [r, z, n, h W_hn + b_hn] in panel order, and the entering h.
// The backward writes [dr, dz, dhn, dn] over them (dhn = dn r, the cotangent of h W_hn + b_hn).

// GRU weights [K, 3H] (blocks r, z, n) -> the panel column q's source, or -1 for a zero column.
inline int64_t gru_column(int64_t q, int64_t H, bool recurrent) {
  const int64_t block = (q % 32) / 8, unit = 8 * (q / 32) + q % 8;
  if (block < 2) return block * H + unit;
  return (block == 2) == recurrent ? 2 * H + unit : -1;
}

struct GruForward {
  const float *x, *w_ih;  // x [B, T, D], w_ih [D, 3H]
  int64_t D;
  const float *bias, *w_hh, *h0;  // bias [4H] in panel order ([b_ir + b_hr, b_iz + b_hz, b_hn, b_in]), w_hh [H, 3H]
  const bool *mask, *resets;
  float* ys;
  float *gates, *hs;  // training only (else null)
  float* hT;
};

void gru_forward(Dims d, const GruForward& a) {
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H;
  const int n = thread_count(H);
  const int64_t ldh = H + 16;  // see `forward`
  std::vector<float> hbuf(2 * B * ldh);
  Barrier barrier(n);
  const __m512 half = _mm512_set1_ps(0.5f);
  if (a.gates != nullptr) advise_huge(a.gates, B * T * G * 4), advise_huge(a.hs, B * T * H * 4);
  advise_huge(a.ys, B * T * H * 4);
  run_threads(n, [&](int tid) {
    const int64_t u0 = (H / 32) * tid / n * 32, u1 = (H / 32) * (tid + 1) / n * 32;
    const int64_t p0 = u0 / 8, p1 = u1 / 8;
    std::vector<float> w_hh((p1 - p0) * H * 32), w_ih((p1 - p0) * a.D * 32);
    pack_panels(a.w_hh, H, 3 * H, p0, p1, w_hh.data(), [H](int64_t q) { return gru_column(q, H, true); });
    pack_panels(a.w_ih, a.D, 3 * H, p0, p1, w_ih.data(), [H](int64_t q) { return gru_column(q, H, false); });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) hbuf[b * ldh + j] = a.h0[b * H + j];
    barrier.wait();
    for (int64_t t = 0; t < T; ++t) {
      const float* cur = hbuf.data() + (t & 1) * B * ldh;
      float* nxt = hbuf.data() + ((t + 1) & 1) * B * ldh;
      if (a.hs != nullptr)
        for (int64_t b = 0; b < B; ++b) std::copy(cur + b * ldh + u0, cur + b * ldh + u1, a.hs + (b * T + t) * H + u0);
      auto cell = [&](int64_t b, int64_t p, __m512 z0, __m512 z1) {
        const int64_t bt = b * T + t;
        const __m512 rz = _mm512_fmadd_ps(tanh_ps(_mm512_mul_ps(z0, half)), half, half);
        const __m256 rg = _mm512_castps512_ps256(rz), zg = _mm512_extractf32x8_ps(rz, 1);
        // z1 = [h W_hn + b_hn | x W_in + b_in]
        const __m256 hn = _mm512_castps512_ps256(z1), xn = _mm512_extractf32x8_ps(z1, 1);
        const __m256 ng = tanh8(_mm256_fmadd_ps(rg, hn, xn));
        const __m256 h_old = _mm256_loadu_ps(cur + b * ldh + p * 8);
        const __m256 h_new = _mm256_fmadd_ps(zg, _mm256_sub_ps(h_old, ng), ng);
        if (a.gates != nullptr) {
          float* gp = a.gates + bt * G + p * 32;
          _mm512_storeu_ps(gp, rz);
          _mm256_storeu_ps(gp + 16, ng);
          _mm256_storeu_ps(gp + 24, hn);
        }
        const bool m = a.mask[bt];
        _mm256_storeu_ps(a.ys + bt * H + p * 8, m ? h_new : _mm256_setzero_ps());
        __m256 h_next = m ? h_new : h_old;
        if (t + 1 < T && a.resets[bt + 1]) h_next = _mm256_loadu_ps(a.h0 + b * H + p * 8);
        _mm256_storeu_ps(nxt + b * ldh + p * 8, h_next);
      };
      step_tiles(B, T, t, p0, p1, a.bias, cur, ldh, w_hh.data(), H, a.x, a.D, w_ih.data(), cell);
      barrier.wait();
    }
    const float* last = hbuf.data() + (T & 1) * B * ldh;
    for (int64_t b = 0; b < B; ++b) std::copy(last + b * ldh + u0, last + b * ldh + u1, a.hT + b * H + u0);
  });
}

void gru_backward(Dims d, float* gz /* gates in, [dr, dz, dhn, dn] out */, const float* hs, const float* w_hh /* [H, 3H] */,
                  const bool* mask, const bool* resets, const float* dys, const float* dhT, float* dh0) {
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H, K = 3 * H;
  const int n = thread_count(H);
  std::vector<float> dh(B * H);
  const int64_t ldz = K + 16;  // [dr, dz, dhn] of each panel, 24 floats; padded rows as in `backward`
  std::vector<float> dzs(2 * B * ldz);
  Barrier barrier(n);
  const __m256 one = _mm256_set1_ps(1.0f);
  // compact column k (24 per panel: dr, dz, dhn) -> its W_hh column
  auto compact_column = [H](int64_t k) { return ((k % 24) / 8) * H + 8 * (k / 24) + k % 8; };

  run_threads(n, [&](int tid) {
    const int64_t u0 = (H / 32) * tid / n * 32, u1 = (H / 32) * (tid + 1) / n * 32;
    std::vector<float> w_hh_t((u1 - u0) * K);
    pack_panels_transposed(w_hh, 3 * H, K, u0 / 32, u1 / 32, w_hh_t.data(), compact_column);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) dh[b * H + j] = dhT[b * H + j], dh0[b * H + j] = 0.0f;
    for (int64_t t = T - 1; t >= 0; --t) {
      // Phase 1, this thread's units: [dr, dz, dhn, dn] over the gates, and in dh the part of dh_prev
      // that is not a matmul (dh z, or the held cotangent on a masked step).
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bt = b * T + t;
        const bool m = mask[bt];
        for (int64_t p = u0 / 8; p < u1 / 8; ++p) {
          float* gp = gz + bt * G + p * 32;
          const int64_t j = b * H + p * 8;
          const __m256 dh_in = _mm256_loadu_ps(dh.data() + j);
          const __m256 dhx = m ? _mm256_add_ps(dh_in, _mm256_loadu_ps(dys + bt * H + p * 8)) : _mm256_setzero_ps();
          const __m256 r = _mm256_loadu_ps(gp), z = _mm256_loadu_ps(gp + 8);
          const __m256 ng = _mm256_loadu_ps(gp + 16), hn = _mm256_loadu_ps(gp + 24);
          const __m256 h = _mm256_loadu_ps(hs + bt * H + p * 8);
          const __m256 dn = _mm256_mul_ps(_mm256_mul_ps(dhx, _mm256_sub_ps(one, z)), _mm256_fnmadd_ps(ng, ng, one));
          const __m256 g[4] = {
              _mm256_mul_ps(_mm256_mul_ps(dn, hn), _mm256_mul_ps(r, _mm256_sub_ps(one, r))),                  // dr
              _mm256_mul_ps(_mm256_mul_ps(dhx, _mm256_sub_ps(h, ng)), _mm256_mul_ps(z, _mm256_sub_ps(one, z))),  // dz
              _mm256_mul_ps(dn, r),                                                                              // dhn
              dn};
          float* zs = dzs.data() + ((t & 1) * B + b) * ldz + p * 24;
          for (int k = 0; k < 4; ++k) _mm256_storeu_ps(gp + 8 * k, g[k]);
          for (int k = 0; k < 3; ++k) _mm256_storeu_ps(zs + 8 * k, g[k]);
          _mm256_storeu_ps(dh.data() + j, m ? _mm256_mul_ps(dhx, z) : dh_in);
        }
      }
      barrier.wait();
      backward_carry(B, T, H, t, u0, u1, dzs.data() + (t & 1) * B * ldz, ldz, w_hh_t.data(), K, resets, dh.data(), dh0);
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = u0; j < u1; ++j) dh0[b * H + j] += dh[b * H + j];
  });
}

ffi::Error checked_gru_forward(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w_ih,
                               const ffi::Buffer<ffi::F32>& bias, const ffi::Buffer<ffi::F32>& w_hh,
                               const ffi::Buffer<ffi::F32>& h0, const ffi::Buffer<ffi::PRED>& mask,
                               const ffi::Buffer<ffi::PRED>& resets, float* ys, float* gates, float* hs, float* hT) {
  Dims d;
  if (auto e = dims(mask, w_hh, 3, &d); e.failure()) return e;
  auto xd = x.dimensions();
  if (xd.size() != 3 || xd[0] != d.B || xd[1] != d.T || w_ih.element_count() != xd[2] * 3 * d.H)
    return ffi::Error::InvalidArgument("jaxseq GRU kernel: x must be [B, T, D] and W_ih [D, 3H]");
  gru_forward(d, GruForward{x.typed_data(), w_ih.typed_data(), xd[2], bias.typed_data(), w_hh.typed_data(),
                            h0.typed_data(), mask.typed_data(), resets.typed_data(), ys, gates, hs, hT});
  return ffi::Error::Success();
}

ffi::Error GruFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::PRED> mask,
                      ffi::Buffer<ffi::PRED> resets, ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> gates,
                      ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> hT) {
  return checked_gru_forward(x, w_ih, bias, w_hh, h0, mask, resets, ys->typed_data(), gates->typed_data(),
                             hs->typed_data(), hT->typed_data());
}

ffi::Error GruInferImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                        ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::PRED> mask,
                        ffi::Buffer<ffi::PRED> resets, ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> hT) {
  return checked_gru_forward(x, w_ih, bias, w_hh, h0, mask, resets, ys->typed_data(), nullptr, nullptr, hT->typed_data());
}

ffi::Error GruBwdImpl(ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> w_hh,
                      ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets, ffi::Buffer<ffi::F32> dys,
                      ffi::Buffer<ffi::F32> dhT, ffi::ResultBuffer<ffi::F32> dz, ffi::ResultBuffer<ffi::F32> dh0) {
  Dims d;
  if (auto e = dims(mask, w_hh, 3, &d); e.failure()) return e;
  if (gates.element_count() != d.B * d.T * 4 * d.H) return ffi::Error::InvalidArgument("jaxseq GRU kernel: gates must be [B * T, 4H]");
  if (dz->typed_data() != gates.typed_data()) std::copy_n(gates.typed_data(), gates.element_count(), dz->typed_data());
  gru_backward(d, dz->typed_data(), hs.typed_data(), w_hh.typed_data(), mask.typed_data(), resets.typed_data(),
               dys.typed_data(), dhT.typed_data(), dh0->typed_data());
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
using Pred = ffi::Buffer<ffi::PRED>;
using Out = ffi::ResultBuffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLstmFwd, LstmFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLstmInfer, LstmInferImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqLstmBwd, LstmBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>());


XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqGruFwd, GruFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqGruInfer, GruInferImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>()
                                  .Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqGruBwd, GruBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<Pred>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>());

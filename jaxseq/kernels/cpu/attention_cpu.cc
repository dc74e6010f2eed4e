// Scaled dot-product attention on x86-64 CPUs with AVX-512, as XLA FFI custom calls: FlashAttention-2's
// forward and backward (Dao 2023) in float32.
//
// Why: jaxseq.flash_attention, the same algorithm written in JAX, ran at 0.68x-0.95x PyTorch's SDPA
// on two cores (benchmarks/README.md, "Measurement history"): XLA:CPU dispatches each block pair's
// ~10 ops one after another, its batched matmuls leave a core idle between them, and moving to the
// blocked layout and back costs a fifth of the step at short lengths. Here a block pair is five
// register-tiled matmuls whose epilogues hold the softmax, over operands packed once per head, in the
// caller's [B, T, H, d] layout, and the threads split the work with no barrier at all: the forward's
// (batch, head, query block) triples, the backward's (batch, kv head) pairs, cut into key-block
// chunks when there are few of them. The threads are XLA's own (pool.h).
//
//   jaxseq_attention_fwd: q [B, T, H, d], k, v [B, S, Hkv, d] (H % Hkv == 0), kvalid [B, S] (pred),
//     offset [B] (s32); attributes causal (bool), scale (f32)
//     -> out [B, T, H, d], lse [B, H, T] (the log-sum-exp of each query's scaled scores)
//   jaxseq_attention_bwd: q, k, v, kvalid, offset, out, lse, dout [B, T, H, d]; the same attributes
//     -> dq [B, T, H, d], dk, dv [B, S, Hkv, d]
//
// Semantics are jaxseq.attention's: query t of row b sits at position offset[b] + t and, when causal,
// sees the keys s <= offset[b] + t; a key whose kvalid is false is seen by no query. A query that sees
// no key returns exact zeros, lse = +inf, and zero gradients. Key blocks that the causal mask hides
// from a whole query block are skipped, so causal attention does about half the work.
//
// Blocks are kBlock queries x kBlock keys. Packed per head (zero-padded to whole blocks): K^T and Q^T
// in blocks [n][d][kBlock] (the B operand of the score matmuls: rows of a 32-column panel kBlock floats
// apart, never on one cache set as the caller's rows H*d floats apart would be), and copies of the rows.

#include <cmath>
#include <limits>
#include <string>

#include "kernels.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxseq_native;

constexpr int64_t kBlock = 64;  // queries and keys per block: two 32-column tile panels
constexpr int64_t kMinUnits = 8;  // the backward splits heads by key blocks below this many (batch, kv head) pairs
constexpr int64_t kMaxPartFloats = int64_t{64} << 20;  // ... holding at most 256 MB of partial dQ
constexpr float kInf = std::numeric_limits<float>::infinity();

inline __m512i iota16() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

// int32 of a position, clamped: positions only meet in comparisons against indices below 2^30.
inline int32_t pos32(int64_t p) { return static_cast<int32_t>(std::clamp<int64_t>(p, -(int64_t{1} << 30), int64_t{1} << 30)); }

// Of the 16 keys k0.., those query position qpos may see: valid, and (causal) at positions <= qpos.
inline __mmask16 keys_seen(const int32_t* kvi, int64_t k0, bool causal, int64_t qpos) {
  const __m512i valid = _mm512_loadu_si512(kvi + k0);
  __mmask16 m = _mm512_test_epi32_mask(valid, valid);
  if (causal) m &= _mm512_cmple_epi32_mask(_mm512_add_epi32(iota16(), _mm512_set1_epi32(pos32(k0))), _mm512_set1_epi32(pos32(qpos)));
  return m;
}

inline float hsum(__m512 x) { return _mm512_reduce_add_ps(x); }

struct Dims {
  int64_t B, T, S, H, Hkv, d;
  int64_t nq() const { return (T + kBlock - 1) / kBlock; }
  int64_t nk() const { return (S + kBlock - 1) / kBlock; }
};

ffi::Error dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                const ffi::Buffer<ffi::PRED>& kvalid, const ffi::Buffer<ffi::S32>& offset, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = kvalid.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("jaxseq attention kernel: q, k, v must be rank 4 and kvalid [B, S]");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("jaxseq attention kernel: k and v shapes differ");
  *d = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
  if (kd[0] != d->B || kd[3] != d->d || d->H % d->Hkv != 0 || d->d % 32 != 0 || md[0] != d->B || md[1] != d->S ||
      offset.element_count() != d->B)
    return ffi::Error::InvalidArgument(
        "jaxseq attention kernel: needs q [B, T, H, d], k, v [B, S, Hkv, d] with H % Hkv == 0 and d % 32 == 0, "
        "kvalid [B, S] and offset [B]");
  return ffi::Error::Success();
}

// One key/value head of one batch row, packed: rows kr, vr [nk * kBlock][d], K^T and V^T blocks kt,
// vt [nk][d][kBlock], kvi [nk * kBlock] (1 = valid; 0 past S), and which key blocks are wholly valid.
// The forward pass needs kt and vr, the backward all four.
struct PackedKV {
  std::vector<float> kr, vr, kt, vt;
  std::vector<int32_t> kvi;
  std::vector<char> whole;
  int64_t packed = -1;  // which (b, kv head) it holds
  bool backward;         // kr and vt too

  PackedKV(const Dims& d, bool backward)
      : kr(backward ? d.nk() * kBlock * d.d : 0), vr(d.nk() * kBlock * d.d), kt(vr.size()), vt(kr.size()),
        kvi(d.nk() * kBlock), whole(d.nk()), backward(backward) {}

  void pack(const Dims& d, const float* k, const float* v, const bool* kvalid, int64_t b, int64_t hk) {
    if (packed == b * d.Hkv + hk) return;
    packed = b * d.Hkv + hk;
    for (int64_t s = 0; s < d.S; ++s) {
      const float* ks = k + ((b * d.S + s) * d.Hkv + hk) * d.d;
      const float* vs = v + ((b * d.S + s) * d.Hkv + hk) * d.d;
      const int64_t at_t = (s / kBlock) * d.d * kBlock + s % kBlock;
      for (int64_t e = 0; e < d.d; ++e) kt[at_t + e * kBlock] = ks[e];
      std::copy(vs, vs + d.d, vr.data() + s * d.d);
      if (backward) {
        for (int64_t e = 0; e < d.d; ++e) vt[at_t + e * kBlock] = vs[e];
        std::copy(ks, ks + d.d, kr.data() + s * d.d);
      }
      kvi[s] = kvalid[b * d.S + s] ? 1 : 0;
    }
    for (int64_t j = 0; j < d.nk(); ++j) {
      whole[j] = 1;
      for (int64_t s = j * kBlock; s < (j + 1) * kBlock; ++s) whole[j] &= kvi[s];
    }
  }
};

// Key blocks [0, end) hold every key that a query up to index q_last may see (causal: positions <= offset + q).
inline int64_t key_blocks_seen(const Dims& d, bool causal, int64_t offset, int64_t q_last) {
  if (!causal) return d.nk();
  const int64_t last_key = offset + q_last;
  return last_key < 0 ? 0 : std::min(d.nk(), last_key / kBlock + 1);
}

// Must block pair (query block i, key block j) be masked element-wise?
inline bool needs_mask(const PackedKV& kv, bool causal, int64_t offset, int64_t i, int64_t j) {
  return !kv.whole[j] || (causal && (j + 1) * kBlock - 1 > offset + i * kBlock);
}

const Seg kNone{nullptr, 0, nullptr, 0, 0};

// Splits units [0, U) among at most n threads into contiguous runs of about equal total cost (cost(u) >=
// 1; causal attention's later query blocks see more key blocks): the runs' bounds, one more than the
// threads. Contiguous runs keep a thread on one key/value head, which it then packs once.
template <typename Cost>
std::vector<int64_t> balanced_ranges(int64_t U, int n, Cost cost) {
  n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, U)));
  std::vector<int64_t> prefix(U + 1, 0);
  for (int64_t u = 0; u < U; ++u) prefix[u + 1] = prefix[u] + cost(u);
  std::vector<int64_t> bounds(n + 1, U);
  bounds[0] = 0;
  for (int t = 1; t < n; ++t)
    bounds[t] = std::lower_bound(prefix.begin(), prefix.end(), prefix[U] * t / n) - prefix.begin();
  return bounds;
}

// Causal geometry of block pair (i, j), by tiles of kMR rows: with base = offset + (i - j) kBlock, query
// row r of block i sees key column c of block j iff c <= base + r. Work past these bounds multiplies
// exact zeros (masked probabilities), so the tiles skip it: half of every diagonal block pair.
struct Extent {
  bool causal;
  int64_t base;
  // How many of block j's keys the last query of rows rt..rt+kMR-1 may see.
  int64_t keys_upto(int64_t rt) const { return causal ? std::clamp<int64_t>(base + rt + kMR, 0, kBlock) : kBlock; }
  // The first query of block i that key rt of block j may be seen by.
  int64_t first_query(int64_t rt) const { return causal ? std::clamp<int64_t>(rt - base, 0, kBlock) : 0; }
};

// S = Q K_j^T for one block pair: Q's kBlock rows D floats apart, K_j^T packed [D][kBlock] -> s
// [kBlock][kBlock]; the 32-column panels past `ext` are left unwritten (the caller's mask covers them).
// The epilogue only stores: masking or exp there, with their constants, made GCC keep the 16
// accumulators in memory (a store after every FMA; 1.6x the forward's time), so they run in a pass
// over s afterwards.
inline void block_scores(const float* q, const float* kt_j, int64_t D, float* s, const Extent& ext) {
  for (int64_t rt = 0; rt < kBlock; rt += kMR)
    for (int64_t p = 0; p < ext.keys_upto(rt); p += 32) {
      float* base = s + rt * kBlock + p;
      auto store = [base](int r, __m512 a0, __m512 a1) {
        _mm512_storeu_ps(base + r * kBlock, a0);
        _mm512_storeu_ps(base + r * kBlock + 16, a1);
      };
      tile<kMR>(Seg{q + rt * D, D, kt_j + p, kBlock, D}, kNone, store);
    }
}

// ------------------------------------------------------------------------------------------- forward

// The inputs both passes read, as their handlers receive them.
struct Inputs {
  const float *q, *k, *v;
  const bool* kvalid;
  const int32_t* offset;
  bool causal;
  float scale;
};

struct Forward : Inputs {
  float *out, *lse;
};

void forward(ffi::ThreadPool& pool, const Dims& d, const Forward& a) {
  const int64_t G = d.H / d.Hkv, D = d.d, nq = d.nq();
  // Units are (batch row, head, query block): u = (b * H + h) * nq + i, so that one head of one row
  // (B = 1 at inference) still keeps every core busy.
  const auto bounds = balanced_ranges(d.B * d.H * nq, max_threads(), [&](int64_t u) {
    const int64_t b = u / (d.H * nq), i = u % nq;
    return 1 + key_blocks_seen(d, a.causal, a.offset[b], std::min(d.T, (i + 1) * kBlock) - 1);
  });
  parallel_for(pool, static_cast<int64_t>(bounds.size()) - 1, [&](int64_t tid) {
    PackedKV kv(d, false);
    std::vector<float> qc(kBlock * D), s(kBlock * kBlock), o(kBlock * D), m(kBlock), l(kBlock), alpha(kBlock);
    for (int64_t u = bounds[tid]; u < bounds[tid + 1]; ++u) {
      const int64_t b = u / (d.H * nq), h = u / nq % d.H, i = u % nq, off = a.offset[b];
      kv.pack(d, a.k, a.v, a.kvalid, b, h / G);
      {
        const int64_t rows = std::min(kBlock, d.T - i * kBlock);
        // This block's queries, scaled, in rows D floats apart; rows past T are zeros.
        std::fill(qc.begin(), qc.end(), 0.0f);
        for (int64_t r = 0; r < rows; ++r) {
          const float* qr = a.q + ((b * d.T + i * kBlock + r) * d.H + h) * D;
          for (int64_t e = 0; e < D; ++e) qc[r * D + e] = qr[e] * a.scale;
        }
        std::fill(m.begin(), m.end(), -kInf);
        std::fill(l.begin(), l.end(), 0.0f);
        const int64_t nj = key_blocks_seen(d, a.causal, off, i * kBlock + rows - 1);
        for (int64_t j = 0; j < nj; ++j) {
          const bool masked = needs_mask(kv, a.causal, off, i, j);
          const Extent ext{a.causal, off + (i - j) * kBlock};
          block_scores(qc.data(), kv.kt.data() + j * D * kBlock, D, s.data(), ext);  // S = (scale q) K_j^T
          // Online softmax: P = exp(S - m_new) in place, alpha = exp(m_old - m_new), l = alpha l + rowsum P.
          for (int64_t r = 0; r < kBlock; ++r) {
            float* sr = s.data() + r * kBlock;
            if (masked) {  // -inf where the query may not see the key
              const int64_t qpos = off + i * kBlock + r;
              for (int64_t c = 0; c < kBlock; c += 16)
                _mm512_storeu_ps(sr + c, _mm512_mask_blend_ps(keys_seen(kv.kvi.data(), j * kBlock + c, a.causal, qpos),
                                                              _mm512_set1_ps(-kInf), _mm512_loadu_ps(sr + c)));
            }
            __m512 mx = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(sr), _mm512_loadu_ps(sr + 16)),
                                      _mm512_max_ps(_mm512_loadu_ps(sr + 32), _mm512_loadu_ps(sr + 48)));
            const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
            if (m_new == -kInf) {  // nothing seen yet: P = 0 and the accumulators stay 0
              std::fill(sr, sr + kBlock, 0.0f);
              alpha[r] = 1.0f;
              continue;
            }
            const __m512 shift = _mm512_set1_ps(m_new);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t c = 0; c < kBlock; c += 16) {
              const __m512 pc = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + c), shift));
              _mm512_storeu_ps(sr + c, pc);
              sum = _mm512_add_ps(sum, pc);
            }
            alpha[r] = std::exp(m[r] - m_new);
            l[r] = alpha[r] * l[r] + hsum(sum);
            m[r] = m_new;
          }
          // o = alpha o + P V_j.
          for (int64_t rt = 0; rt < kBlock; rt += kMR)
            for (int64_t p = 0; p < D; p += 32) {
              auto update = [&](int r, __m512 a0, __m512 a1) {
                float* orow = o.data() + (rt + r) * D + p;
                if (j > 0) {
                  const __m512 al = _mm512_set1_ps(alpha[rt + r]);
                  a0 = _mm512_fmadd_ps(al, _mm512_loadu_ps(orow), a0);
                  a1 = _mm512_fmadd_ps(al, _mm512_loadu_ps(orow + 16), a1);
                }
                _mm512_storeu_ps(orow, a0);
                _mm512_storeu_ps(orow + 16, a1);
              };
              tile<kMR>(Seg{s.data() + rt * kBlock, kBlock, kv.vr.data() + j * kBlock * D + p, D, ext.keys_upto(rt)}, kNone, update);
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t t = i * kBlock + r;
          float* out_r = a.out + ((b * d.T + t) * d.H + h) * D;
          const bool seen = nj > 0 && l[r] > 0.0f;
          const float inv = seen ? 1.0f / l[r] : 0.0f;
          for (int64_t e = 0; e < D; ++e) out_r[e] = seen ? o[r * D + e] * inv : 0.0f;
          a.lse[(b * d.H + h) * d.T + t] = seen ? m[r] + std::log(l[r]) : kInf;
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ backward

struct Backward : Inputs {
  const float *out, *lse, *dout;
  float *dq, *dk, *dv;
};

// Per (batch row, kv head), for each of its G query heads: the queries' packed rows, then over key
// blocks j and the query blocks i that see them (FlashAttention-2's order):
//   P = exp((scale Q_i) K_j^T - lse_i), dS = P * (dO_i V_j^T - delta_i),
//   dV_j += P^T dO_i, dK_j += dS^T (scale Q_i), dQ_i += dS K_j  (dQ = scale dS K at the end).
// The products with P^T and dS^T read their A operand transposed (tile<.., true>), so no operand of
// a query head is ever transposed; K^T and V^T are packed once per key/value head.
void backward(ffi::ThreadPool& pool, const Dims& d, const Backward& a) {
  const int64_t G = d.H / d.Hkv, D = d.d, nk = d.nk(), Tp = d.nq() * kBlock, Sp = nk * kBlock;
  // Units are (batch row, kv head, key-block chunk). With fewer than kMinUnits (batch, kv head) pairs,
  // each pair's key blocks are cut into chunks of equal cost, every chunk writes its own dK, dV rows
  // and a partial dQ, and the partials are summed in chunk order after the threads join. The chunks
  // depend on the shapes, not on the thread count, so the result is the same on any machine.
  const int64_t pairs = d.B * d.Hkv, part_floats = pairs * G * d.T * D;  // one dQ's floats
  const int64_t chunks = std::clamp<int64_t>(
      std::min((kMinUnits + pairs - 1) / pairs, kMaxPartFloats / std::max<int64_t>(1, part_floats)), 1, nk);
  // The cost of key block j of row b: 1 + G x the query blocks that see it (rows' offsets differ).
  std::vector<std::vector<int64_t>> key_cost(d.B, std::vector<int64_t>(nk, 1)), key_chunks(d.B);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t i = 0; i < d.nq(); ++i)
      for (int64_t j = 0; j < key_blocks_seen(d, a.causal, a.offset[b], std::min(d.T, (i + 1) * kBlock) - 1); ++j)
        key_cost[b][j] += G;
    key_chunks[b] = balanced_ranges(nk, static_cast<int>(chunks), [&](int64_t j) { return key_cost[b][j]; });
    key_chunks[b].resize(chunks + 1, nk);  // fewer key blocks than chunks: empty chunks at the end
  }
  const int64_t units = pairs * chunks;
  auto unit_cost = [&](int64_t u) {
    const int64_t b = u / chunks / d.Hkv, c = u % chunks;
    int64_t cost = 1;
    for (int64_t j = key_chunks[b][c]; j < key_chunks[b][c + 1]; ++j) cost += key_cost[b][j];
    return cost;
  };
  const auto bounds = balanced_ranges(units, max_threads(), unit_cost);
  std::vector<float> dq_parts(chunks > 1 ? chunks * part_floats : 0);  // [unit][g][t][d]
  parallel_for(pool, static_cast<int64_t>(bounds.size()) - 1, [&](int64_t tid) {
    PackedKV kv(d, true);
    std::vector<float> qs(Tp * D), dor(Tp * D), dq(Tp * D), lse(Tp), delta(Tp);
    std::vector<float> dk(Sp * D), dv(Sp * D), pb(kBlock * kBlock), dsb(kBlock * kBlock);
    const __m512 scale = _mm512_set1_ps(a.scale);
    for (int64_t u = bounds[tid]; u < bounds[tid + 1]; ++u) {  // u = (b * Hkv + hk) * chunks + c
      const int64_t b = u / chunks / d.Hkv, hk = u / chunks % d.Hkv, c = u % chunks, off = a.offset[b];
      const int64_t j0 = key_chunks[b][c], j1 = key_chunks[b][c + 1];
      kv.pack(d, a.k, a.v, a.kvalid, b, hk);
      std::fill(dk.begin() + j0 * kBlock * D, dk.begin() + j1 * kBlock * D, 0.0f);
      std::fill(dv.begin() + j0 * kBlock * D, dv.begin() + j1 * kBlock * D, 0.0f);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t t = 0; t < d.T; ++t) {  // rows past T stay zero (lse +inf: P = 0)
          const int64_t at = ((b * d.T + t) * d.H + h) * D;
          __m512 dsum = _mm512_setzero_ps();
          for (int64_t e = 0; e < D; e += 16) {
            const __m512 de = _mm512_loadu_ps(a.dout + at + e);
            _mm512_storeu_ps(qs.data() + t * D + e, _mm512_mul_ps(_mm512_loadu_ps(a.q + at + e), scale));
            _mm512_storeu_ps(dor.data() + t * D + e, de);
            dsum = _mm512_fmadd_ps(de, _mm512_loadu_ps(a.out + at + e), dsum);
          }
          lse[t] = a.lse[(b * d.H + h) * d.T + t];
          delta[t] = hsum(dsum);
        }
        std::fill(lse.begin() + d.T, lse.end(), kInf);
        std::fill(dq.begin(), dq.end(), 0.0f);
        for (int64_t j = j0; j < j1; ++j) {
          for (int64_t i = 0; i < d.nq(); ++i) {
            const int64_t rows = std::min(kBlock, d.T - i * kBlock);
            if (key_blocks_seen(d, a.causal, off, i * kBlock + rows - 1) <= j) continue;
            const bool masked = needs_mask(kv, a.causal, off, i, j);
            const float* qs_i = qs.data() + i * kBlock * D;
            const float* do_i = dor.data() + i * kBlock * D;
            // S = (scale Q_i) K_j^T, then P = exp(S - lse) in place, 0 where masked.
            const Extent ext{a.causal, off + (i - j) * kBlock};
            block_scores(qs_i, kv.kt.data() + j * D * kBlock, D, pb.data(), ext);
            for (int64_t r = 0; r < kBlock; ++r) {
              float* row = pb.data() + r * kBlock;
              const __m512 shift = _mm512_set1_ps(lse[i * kBlock + r]);
              for (int64_t c = 0; c < kBlock; c += 16) {
                __m512 pc = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + c), shift));
                if (masked) pc = _mm512_maskz_mov_ps(keys_seen(kv.kvi.data(), j * kBlock + c, a.causal, off + i * kBlock + r), pc);
                _mm512_storeu_ps(row + c, pc);
              }
            }
            // dS = P * (dO_i V_j^T - delta).
            for (int64_t rt = 0; rt < kBlock; rt += kMR)
              for (int64_t p = 0; p < kBlock; p += 32) {
                const float* pbase = pb.data() + rt * kBlock + p;
                float* base = dsb.data() + rt * kBlock + p;
                const float* delta_i = delta.data() + i * kBlock + rt;
                auto dscores = [=](int r, __m512 a0, __m512 a1) {
                  const __m512 dl = _mm512_set1_ps(delta_i[r]);
                  _mm512_storeu_ps(base + r * kBlock, _mm512_mul_ps(_mm512_loadu_ps(pbase + r * kBlock), _mm512_sub_ps(a0, dl)));
                  _mm512_storeu_ps(base + r * kBlock + 16, _mm512_mul_ps(_mm512_loadu_ps(pbase + r * kBlock + 16), _mm512_sub_ps(a1, dl)));
                };
                if (p < ext.keys_upto(rt))
                  tile<kMR>(Seg{do_i + rt * D, D, kv.vt.data() + j * D * kBlock + p, kBlock, D}, kNone, dscores);
                else  // all masked: dS = 0 (the products below read it)
                  for (int64_t r = 0; r < kMR; ++r) std::fill_n(dsb.data() + (rt + r) * kBlock + p, 32, 0.0f);
              }
            auto add_to = [](float* base, int64_t ld) {
              return [base, ld](int r, __m512 a0, __m512 a1) {
                float* row = base + r * ld;
                _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), a0));
                _mm512_storeu_ps(row + 16, _mm512_add_ps(_mm512_loadu_ps(row + 16), a1));
              };
            };
            // dV_j += P^T dO_i and dK_j += dS^T (scale Q_i): [keys, D], P and dS read transposed.
            for (int64_t rt = 0; rt < kBlock; rt += kMR)
              for (int64_t p = 0; p < D; p += 32) {
                auto to_dv = add_to(dv.data() + (j * kBlock + rt) * D + p, D);
                auto to_dk = add_to(dk.data() + (j * kBlock + rt) * D + p, D);
                const int64_t c0 = ext.first_query(rt);  // queries before it see none of these keys
                tile<kMR, true>(Seg{pb.data() + c0 * kBlock + rt, kBlock, do_i + c0 * D + p, D, kBlock - c0}, kNone, to_dv);
                tile<kMR, true>(Seg{dsb.data() + c0 * kBlock + rt, kBlock, qs_i + c0 * D + p, D, kBlock - c0}, kNone, to_dk);
              }
            // dQ_i += dS K_j: [queries, D].
            for (int64_t rt = 0; rt < kBlock; rt += kMR)
              for (int64_t p = 0; p < D; p += 32) {
                auto to_dq = add_to(dq.data() + (i * kBlock + rt) * D + p, D);
                tile<kMR>(Seg{dsb.data() + rt * kBlock, kBlock, kv.kr.data() + j * kBlock * D + p, D, ext.keys_upto(rt)}, kNone, to_dq);
              }
          }
        }
        for (int64_t t = 0; t < d.T; ++t) {  // dQ, or this chunk's part of it
          float* dq_t = chunks > 1 ? dq_parts.data() + ((u * G + h - hk * G) * d.T + t) * D : a.dq + ((b * d.T + t) * d.H + h) * D;
          for (int64_t e = 0; e < D; e += 16) _mm512_storeu_ps(dq_t + e, _mm512_mul_ps(_mm512_loadu_ps(dq.data() + t * D + e), scale));
        }
      }
      for (int64_t s = j0 * kBlock; s < std::min(d.S, j1 * kBlock); ++s) {
        const int64_t at = ((b * d.S + s) * d.Hkv + hk) * D;
        std::copy(dk.data() + s * D, dk.data() + (s + 1) * D, a.dk + at);
        std::copy(dv.data() + s * D, dv.data() + (s + 1) * D, a.dv + at);
      }
    }
  });
  if (chunks == 1) return;
  for (int64_t p = 0; p < pairs; ++p)  // dQ = the sum of the chunks' parts, in chunk order
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t b = p / d.Hkv, h = (p % d.Hkv) * G + g;
        float* dq_t = a.dq + ((b * d.T + t) * d.H + h) * D;
        for (int64_t e = 0; e < D; e += 16) {
          __m512 sum = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks; ++c)
            sum = _mm512_add_ps(sum, _mm512_loadu_ps(dq_parts.data() + (((p * chunks + c) * G + g) * d.T + t) * D + e));
          _mm512_storeu_ps(dq_t + e, sum);
        }
      }
}

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> kvalid, ffi::Buffer<ffi::S32> offset, bool causal, float scale,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto e = dims(q, k, v, kvalid, offset, &d); e.failure()) return e;
  const Inputs in{q.typed_data(), k.typed_data(), v.typed_data(), kvalid.typed_data(), offset.typed_data(), causal, scale};
  forward(pool, d, Forward{in, out->typed_data(), lse->typed_data()});
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> kvalid, ffi::Buffer<ffi::S32> offset, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, bool causal, float scale,
                            ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                            ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (auto e = dims(q, k, v, kvalid, offset, &d); e.failure()) return e;
  const Inputs in{q.typed_data(), k.typed_data(), v.typed_data(), kvalid.typed_data(), offset.typed_data(), causal, scale};
  backward(pool, d, Backward{in, out.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(),
                       dv->typed_data()});
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
using Pred = ffi::Buffer<ffi::PRED>;
using S32 = ffi::Buffer<ffi::S32>;
using Out = ffi::ResultBuffer<ffi::F32>;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqAttentionFwd, AttentionFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<S32>()
                                  .Attr<bool>("causal").Attr<float>("scale")
                                  .Ret<F32>().Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxseqAttentionBwd, AttentionBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<Pred>().Arg<S32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Attr<bool>("causal").Attr<float>("scale")
                                  .Ret<F32>().Ret<F32>().Ret<F32>());

// Shared parts of jaxseq's native CPU kernels (rnn_cpu.cc, attention_cpu.cc): a vector
// exp, the register-tiled matmul with a fused epilogue, threads for one call, and 2 MB pages for large
// outputs.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>
#include <sched.h>
#include <sys/mman.h>

namespace jaxseq_native {

// exp(x) in float32: Cephes' expf (a degree-6 polynomial on [-ln 2 / 2, ln 2 / 2], ~1 ulp) times 2^n by
// scalef. Inputs below -110 give exactly 0: the masked scores (-inf) and the rows whose lse is +inf.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-110.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2 in two parts (Cody-Waite)
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

constexpr int kMR = 8;  // rows of a matmul tile; 8 x 32 outputs = 16 zmm accumulators

// One operand pair of a tile's matmul: rows of A (row stride lda) times B's 32 columns (row stride ldb).
// A tile may read A transposed (template flag AT): element (r, k) at A[k * lda + r]; its elements are
// broadcast one at a time, so the layout of A costs nothing.
struct Seg {
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  int64_t K;
};

template <int MR, bool AT = false>
__attribute__((always_inline)) inline void accumulate(const Seg& s, __m512 (&acc)[MR][2]) {
  for (int64_t k = 0; k < s.K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(s.B + k * s.ldb), b1 = _mm512_loadu_ps(s.B + k * s.ldb + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(AT ? s.A[k * s.lda + r] : s.A[r * s.lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
}

// For r < MR: epilogue(r, acc0, acc1), acc = the sum over the segments of A[r, :] B[:, 0:32] (2 zmm).
// Inlined whole, epilogue included, so the 16 accumulators stay in registers (passed out by
// reference they went through memory: 2.4x slower, measured). s2.K may be 0.
template <int MR, bool AT = false, typename Epilogue>
__attribute__((always_inline)) inline void tile(const Seg& s1, const Seg& s2, Epilogue& epilogue) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  accumulate<MR, AT>(s1, acc);
  accumulate<MR, AT>(s2, acc);
  for (int r = 0; r < MR; ++r) epilogue(r, acc[r][0], acc[r][1]);
}

// `tile` for the last rows of a batch that is not a multiple of kMR.
template <typename Epilogue>
inline void tile_rows(int rows, const Seg& s1, const Seg& s2, Epilogue& epilogue) {
  switch (rows) {
    case 8: return tile<8>(s1, s2, epilogue);
    case 7: return tile<7>(s1, s2, epilogue);
    case 6: return tile<6>(s1, s2, epilogue);
    case 5: return tile<5>(s1, s2, epilogue);
    case 4: return tile<4>(s1, s2, epilogue);
    case 3: return tile<3>(s1, s2, epilogue);
    case 2: return tile<2>(s1, s2, epilogue);
    default: return tile<1>(s1, s2, epilogue);
  }
}

// A spin barrier (a generation counter): the threads of one call meet once a step (~1 us).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    } else {
      // Spin (a step is ~100 us, a futex wake-up costs tens), but yield now and then: a thread of
      // this call that the OS has descheduled must get the core back.
      for (int spins = 1; gen_.load(std::memory_order_acquire) == gen; ++spins) {
        _mm_pause();
        if (spins % 4096 == 0) std::this_thread::yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

// The threads a call may use: the cores this process may run on (its affinity mask, as `taskset` or a
// container's cpuset leave it; not the machine's count, or threads would share a core and spin), or
// JAXSEQ_NATIVE_THREADS when set.
inline int max_threads() {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) n = CPU_COUNT(&cpus);
  if (const char* env = std::getenv("JAXSEQ_NATIVE_THREADS")) n = std::atoi(env);
  return n > 0 ? n : 1;
}

// The RNN kernels' own threads: they meet at a barrier every step, and a pool.h helper that never
// starts would deadlock such a barrier, so they are not handed to XLA's pool.
template <typename Work>
inline void run_threads(int n, Work work) {
  std::vector<std::thread> others;
  for (int i = 1; i < n; ++i) others.emplace_back(work, i);
  work(0);
  for (auto& t : others) t.join();
}

// Asks the kernel for 2 MB pages over the 2 MB-aligned part of [p, p + bytes). The training outputs
// are large (the gates alone are 33.5 MB at hidden 512, batch 32, length 128), and XLA's temporaries
// past glibc's 32 MB mmap threshold are mapped afresh on every call, so each 4 KB page faulted in
// as it was first written: 2 MB pages took the training step at hidden 512 from 212.6 to 191.5 ms
// (and 205.2 -> 185.4 ms in another run). A no-op where transparent huge pages are off.
inline void advise_huge(void* p, int64_t bytes) {
  const uintptr_t huge = uintptr_t{1} << 21, a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + huge - 1) & ~(huge - 1), hi = (a + bytes) & ~(huge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}

}  // namespace jaxseq_native

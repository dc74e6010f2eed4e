// Work for one kernel call spread over XLA's own CPU threads (the FFI ThreadPool), for the kernels whose
// work splits into independent units (attention_cpu.cc).
//
// Why: a kernel that starts threads of its own shares the cores with XLA's intra-op threads, which
// spin for a while after each op waiting for the next one (a kernel's calls ran ~1.9x slower inside a
// train step than alone, benchmarks/README.md, "Measurement history"). Handed to XLA's pool,
// the same work goes to those spinning threads, and starting it costs a queue push, not a thread.
//
// The calling thread claims units too and the helpers only claim what is left, so a call finishes even
// when every pool thread is busy elsewhere (no barrier waits on a helper that may never start), and a
// helper that starts after the call returned finds nothing to claim. Units are set by the shapes, so
// which thread runs one never changes a result.
#pragma once

#include <atomic>
#include <memory>
#include <thread>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace jaxseq_native {

// fn(u) for every u in [0, n), on the calling thread and up to max_threads() - 1 tasks on `pool`;
// returns when all n are done.
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    const Fn* fn;  // read only after a unit is claimed, i.e. while the caller is still waiting
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [state] {
    for (int64_t u; (u = state->next.fetch_add(1, std::memory_order_relaxed)) < state->n;) {
      (*state->fn)(u);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(max_threads() - 1, n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // each task holds the state
  work();
  // The units other threads claimed are running now: wait for them (spin, yielding now and then).
  for (int spins = 1; state->done.load(std::memory_order_acquire) < n; ++spins) {
    _mm_pause();
    if (spins % 1024 == 0) std::this_thread::yield();
  }
}

}  // namespace jaxseq_native

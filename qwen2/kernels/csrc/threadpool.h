// qwen2's thread pool (threadpool.cpp), for the serving kernels.
//
// The serving kernels (f32_linear.cpp, elementwise.cpp, attention.cpp) split their work over
// qwen2's own threads instead of OpenMP's. With OMP_WAIT_POLICY=PASSIVE (what `qwen2 serve` runs
// under, for shared machines), every OpenMP region wakes its sleeping worker and, at the end, the
// waiting caller: in this VM that measured ~0.2 ms a region, ~23 ms of a 70 ms one-row decode step
// (97 regions). Spinning OpenMP threads avoid that on an idle machine but made steps 5-10x slower
// when other processes held the cores (a spinning thread holds a core the caller needs, and a
// static split waits for a descheduled thread's whole half). Here instead:
//   * workers spin between jobs (pause, and sched_yield so that anything else runnable goes
//     first), and sleep after 2 ms without work (between requests);
//   * a job is cut into chunks that participants claim one at a time (one atomic word: job
//     generation | chunk count | next chunk), the caller included: a worker that is not running
//     takes no chunk, the caller does the work itself and waits for at most one chunk in flight.
// Chunks are whole output tiles, each computed by one thread in a fixed order, so results do not
// depend on who ran what. One job at a time (a mutex); workers: torch's intra-op thread count - 1.
#pragma once

#include "common.h"

namespace QWEN2_NS::pool {

using Fn = void (*)(const void*, int64_t, int64_t);

// fn(ctx, b, e) over [b, e) chunks of [0, n) of csize items each, on this thread and the workers
void run(int64_t n, int64_t csize, Fn fn, const void* ctx);

// parallel_for-like: fn(b, e) over [0, n), chunks of at least `grain` items (about 16 per thread)
template <typename F>
void parallel(int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  const int64_t per = (n + 16 * at::get_num_threads() - 1) / (16 * at::get_num_threads());
  run(n, std::max<int64_t>({grain, per, 1}),
      [](const void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); }, &fn);
}

}  // namespace QWEN2_NS::pool

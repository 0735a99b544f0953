// qwen2's thread pool (see threadpool.h).
#include "threadpool.h"

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace QWEN2_NS::pool {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Pool {
  std::atomic<uint64_t> state{0};  // generation (32 bits) | chunks (16) | next chunk (16)
  std::atomic<int64_t> done{0};    // chunks finished in the current job
  std::atomic<Fn> fn{nullptr};
  std::atomic<const void*> ctx{nullptr};
  std::atomic<int64_t> n{0}, csize{1};
  std::atomic<int> sleepers{0}, allowed{0};
  std::mutex m, run_mu;
  std::condition_variable cv;
  int nworkers = 0;
  pid_t pid = getpid();
  uint32_t gen = 0;
};

Pool& get() {
  static Pool* p = new Pool();  // never destroyed: workers may still wait on it at exit
  return *p;
}

// claim and run chunks of job g until none is left (or another job has started)
inline void participate(Pool& p, uint32_t g) {
  for (;;) {
    uint64_t s = p.state.load(std::memory_order_acquire);
    if ((uint32_t)(s >> 32) != g) return;
    const int64_t chunks = (s >> 16) & 0xFFFF, idx = s & 0xFFFF;
    if (idx >= chunks) return;
    const Fn f = p.fn.load(std::memory_order_relaxed);
    const void* c = p.ctx.load(std::memory_order_relaxed);
    const int64_t n = p.n.load(std::memory_order_relaxed), cs = p.csize.load(std::memory_order_relaxed);
    // the fields belong to job g if the claim succeeds: a new job is only posted once every chunk
    // of this one is claimed and finished, which changes the word compared here
    if (!p.state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
    f(c, idx * cs, std::min(n, idx * cs + cs));
    p.done.fetch_add(1, std::memory_order_release);
  }
}

void worker(Pool* p, int id) {
  uint32_t seen = (uint32_t)(p->state.load() >> 32);
  for (;;) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      const uint32_t g = (uint32_t)(p->state.load(std::memory_order_acquire) >> 32);
      if (g != seen) {
        seen = g;
        break;
      }
      if (i % 64 != 63) {
        cpu_relax();
        continue;
      }
      sched_yield();
      // no job for 2 ms, or not one of this job's threads (torch's thread count went down): sleep
      if (std::chrono::steady_clock::now() - t0 > std::chrono::milliseconds(2) ||
          id >= p->allowed.load(std::memory_order_relaxed)) {
        std::unique_lock<std::mutex> lk(p->m);
        p->sleepers.fetch_add(1);
        p->cv.wait(lk, [&] { return (uint32_t)(p->state.load() >> 32) != seen; });
        p->sleepers.fetch_sub(1);
        t0 = std::chrono::steady_clock::now();
      }
    }
    if (id < p->allowed.load(std::memory_order_relaxed)) participate(*p, seen);
  }
}

}  // namespace

void run(int64_t n, int64_t csize, Fn fn, const void* ctx) {
  Pool& p = get();
  csize = std::max<int64_t>(csize, (n + 0xFFFE) / 0xFFFF);
  const int64_t chunks = (n + csize - 1) / csize;
  const int threads = at::get_num_threads();
  if (chunks <= 1 || threads <= 1 || getpid() != p.pid) {
    fn(ctx, 0, n);
    return;
  }
  std::lock_guard<std::mutex> run_lock(p.run_mu);
  while (p.nworkers < threads - 1) std::thread(worker, &p, p.nworkers++).detach();
  p.allowed.store(threads - 1, std::memory_order_relaxed);
  p.fn.store(fn, std::memory_order_relaxed);
  p.ctx.store(ctx, std::memory_order_relaxed);
  p.n.store(n, std::memory_order_relaxed);
  p.csize.store(csize, std::memory_order_relaxed);
  p.done.store(0, std::memory_order_relaxed);
  const uint32_t g = ++p.gen;
  p.state.store(((uint64_t)g << 32) | ((uint64_t)chunks << 16));  // seq_cst: before the sleepers check
  if (p.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lk(p.m);
    p.cv.notify_all();
  }
  participate(p, g);
  for (int i = 0; p.done.load(std::memory_order_acquire) < chunks; ++i) {  // a chunk in flight
    if (i % 64 != 63) cpu_relax();
    else sched_yield();
  }
}

}  // namespace QWEN2_NS::pool

// The cores the kernels may use, and a row-parallel loop over them run by a persistent pool of
// worker threads (started once per process; a thread started per call costs tens of microseconds,
// on kernels that take a few hundred).

#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_aim {

// Threads a kernel may use: the cores this process may run on (its affinity mask), at most
// OMP_NUM_THREADS when that is set (the usual knob, which PyTorch and OpenBLAS honor too). Read
// once.
inline int usable_cores() {
  static const int cores = [] {
    int count = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      count = std::max(1, CPU_COUNT(&set));
    }
    if (const char* limit = std::getenv("OMP_NUM_THREADS")) {
      const int threads = std::atoi(limit);
      if (threads > 0) {
        count = std::min(count, threads);
      }
    }
    return count;
  }();
  return cores;
}

// Worker threads that run the parts of parallel loops. A loop's caller runs parts too, and keeps
// taking them until none is left, so a loop always finishes, even with every worker busy on
// another loop (several CPU streams at once).
class ThreadPool {
 public:
  // The process's pool: usable_cores() - 1 workers, started on first use.
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool(usable_cores() - 1);  // never freed: workers detach
    return *pool;
  }

  // Calls part(i) for every i in [0, parts), on the workers and the calling thread.
  void run(int parts, const std::function<void(int)>& part) {
    if (parts <= 1 || workers_ == 0) {
      for (int i = 0; i < parts; ++i) {
        part(i);
      }
      return;
    }
    Loop loop{&part, parts};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(&loop);
    }
    for (int i = 0; i < std::min(parts - 1, workers_); ++i) {
      wake_.notify_one();
    }
    run_parts(loop);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // from here on no worker takes it up
      const auto found = std::find(queue_.begin(), queue_.end(), &loop);
      if (found != queue_.end()) {
        queue_.erase(found);
      }
    }
    std::unique_lock<std::mutex> lock(loop.mutex);
    loop.finished.wait(lock, [&] { return loop.active == 0; });
  }

 private:
  struct Loop {
    const std::function<void(int)>* part;
    int parts;
    std::atomic<int> next{0};
    int active = 0;  // workers working on it, under `mutex`
    std::mutex mutex;
    std::condition_variable finished;
  };

  explicit ThreadPool(int workers) : workers_(std::max(0, workers)) {
    for (int t = 0; t < workers_; ++t) {
      std::thread([this] { serve(); }).detach();
    }
  }

  // Runs parts of `loop` until none is left to take.
  static void run_parts(Loop& loop) {
    for (int i = loop.next.fetch_add(1); i < loop.parts; i = loop.next.fetch_add(1)) {
      (*loop.part)(i);
    }
  }

  // A worker: joins the oldest loop with parts left, sleeps while there is none. Its caller
  // waits until the workers that joined have left.
  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [&] { return !queue_.empty(); });
      Loop* loop = queue_.front();
      if (loop->next.load() >= loop->parts) {
        queue_.pop_front();  // nothing left to take
        continue;
      }
      {
        std::lock_guard<std::mutex> joining(loop->mutex);
        ++loop->active;
      }
      lock.unlock();
      run_parts(*loop);
      {
        std::lock_guard<std::mutex> leaving(loop->mutex);
        if (--loop->active == 0) {
          loop->finished.notify_all();
        }
      }
      lock.lock();
    }
  }

  int workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Loop*> queue_;
};

// Calls body(begin, end) on consecutive chunks of [0, n) in parallel, one chunk of at least
// `grain` items per thread. Kernels running at once (several CPU streams) share the cores.
template <typename Body>
void parallel_for(int64_t n, int64_t grain, Body body) {
  static std::atomic<int> running{0};
  const int sharing = running.fetch_add(1) + 1;
  const int64_t by_work = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int threads = static_cast<int>(
      std::min<int64_t>(by_work, std::max(1, usable_cores() / sharing)));
  const int64_t chunk = (n + threads - 1) / threads;
  ThreadPool::instance().run(threads, [&](int t) {
    const int64_t begin = std::min(n, t * chunk);
    body(begin, std::min(n, begin + chunk));
  });
  running.fetch_sub(1);
}

}  // namespace mlx_aim

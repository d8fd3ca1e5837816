#include "thread_pool.h"

#include <cstdlib>

namespace protoserve {

int default_num_threads() {
  if (const char* env = std::getenv("PROTOSERVE_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int>(hw) : 1;
}

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::ThreadPool() { start(default_num_threads()); }
ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start(int n) {
  stopping_ = false;
  for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::set_num_threads(int n) {
  if (n < 1) n = 1;
  std::lock_guard<std::mutex> guard(run_mutex_);
  stop();
  start(n);
}

// Takes tasks until none are left; records the first exception.
void ThreadPool::drain() {
  for (;;) {
    int task;
    const std::function<void(int)>* job;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_ >= ntasks_) return;
      task = next_++;
      job = job_;
    }
    try {
      (*job)(task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (++finished_ == ntasks_) done_.notify_all();
    }
  }
}

void ThreadPool::worker_loop() {
  unsigned seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    drain();
  }
}

void ThreadPool::run(int ntasks, const std::function<void(int)>& fn) {
  if (ntasks <= 0) return;
  std::unique_lock<std::mutex> guard(run_mutex_, std::try_to_lock);
  if (!guard.owns_lock() || workers_.empty() || ntasks == 1) {
    for (int t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    ntasks_ = ntasks;
    next_ = 0;
    finished_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  drain();
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return finished_ == ntasks_; });
    error = error_;
    job_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace protoserve

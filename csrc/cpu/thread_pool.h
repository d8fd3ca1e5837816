// A small persistent thread pool for the CPU scan.  run() splits work into
// tasks taken from a shared counter; the calling thread takes part.  If
// another caller already holds the pool (concurrent requests in a server),
// the work runs inline in the calling thread instead of oversubscribing.
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace protoserve {

class ThreadPool {
 public:
  static ThreadPool& instance();
  ~ThreadPool();

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  void set_num_threads(int n);
  void run(int ntasks, const std::function<void(int)>& fn);

 private:
  ThreadPool();
  void start(int n);
  void stop();
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one run() at a time uses the workers
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int ntasks_ = 0, next_ = 0, finished_ = 0;
  unsigned generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

int default_num_threads();

}  // namespace protoserve

// Pins the helper threads of the calling thread's OpenMP team, one per CPU, for steady
// timings (threads that migrate between cores lose their caches; vLLM's CPU backend binds
// its threads the same way). Thread 0 is the caller itself (the user's thread when the
// engine runs in-process): it is left free, so nothing it starts later inherits a pin; with
// every other CPU of the set taken by a pinned helper, the OS keeps it on cpu_ids[0].
// Called from the thread that runs the model: OpenMP teams belong to their caller.
#include "ops_common.h"

#include <omp.h>
#include <sched.h>

namespace {

// Returns how many helper threads were pinned (0 where the OS refused).
int64_t bind_omp_threads(const std::vector<int64_t>& cpu_ids) {
  const int n = static_cast<int>(cpu_ids.size());
  if (n == 0) return 0;
  omp_set_num_threads(n);
  at::set_num_threads(n);
  int pinned = 0;
#pragma omp parallel num_threads(n) reduction(+ : pinned)
  if (omp_get_thread_num() > 0) {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    CPU_SET(static_cast<int>(cpu_ids[omp_get_thread_num()]), &mask);
    if (sched_setaffinity(0, sizeof(mask), &mask) == 0) pinned += 1;
  }
  return pinned;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("bind_omp_threads(int[] cpu_ids) -> int", &bind_omp_threads);
}

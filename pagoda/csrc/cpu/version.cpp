// A trivial op: lets tests and callers check that the extension loaded.
#include "ops_common.h"

namespace {
int64_t kernels_abi_version() { return 1; }
}  // namespace

TORCH_LIBRARY_FRAGMENT(pagoda, m) {
  m.def("kernels_abi_version() -> int", &kernels_abi_version);
}

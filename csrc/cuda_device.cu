// Device discovery for the CUDA module: never throws, so importing eagle2_kernels._cuda on a
// machine without a driver or GPU works and backends() can say why CUDA is unavailable.
#include <cuda_runtime.h>

#include "eagle2_kernels/ops.h"

namespace e2k {
int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}
}  // namespace e2k

// Host-side declarations of the window partition op: input checks and per-device launchers.
#pragma once

#include <torch/types.h>

#include "window_geometry.h"

namespace florence {

// Element strides of the tensor being gathered from.
struct GatherStrides {
  int64_t s0, s1, s2, s3, s4;  // partition: (B, T, H, W, C); reverse: (R, N, C, -, -)
};

struct WindowPartitionParams {
  WindowGeometry geometry;
  GatherStrides src_strides;
  const void* src;
  void* dst;
  int64_t element_size;
  int device_index;  // CUDA device of src and dst; -1 on CPU
};

// Validates sizes and fills the geometry; shared by both directions and both devices.
WindowGeometry make_geometry(at::IntArrayRef shape_bthwc, at::IntArrayRef window_size, at::IntArrayRef shift_size);

void window_partition_cpu(const WindowPartitionParams& params);
void window_reverse_cpu(const WindowPartitionParams& params);
#ifdef WITH_CUDA
void window_partition_cuda(const WindowPartitionParams& params);
void window_reverse_cuda(const WindowPartitionParams& params);
#endif

}  // namespace florence

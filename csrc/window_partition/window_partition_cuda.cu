// CUDA gathers for window partition / reverse.
//
// One warp row per token: blockDim = (32, kTokensPerBlock); the 32 lanes copy the token's C channels as the
// widest vector (up to 16 bytes) that the channel count, strides and pointers allow. The index math is the
// __host__ __device__ code in window_geometry.h, the same the CPU loop runs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "window_partition.h"

namespace florence {

namespace {

constexpr int kLanes = 32;
constexpr int kTokensPerBlock = 8;

template <typename V>
__global__ void partition_kernel(const V* __restrict__ src, V* __restrict__ dst, WindowGeometry g, GatherStrides s,
                                 int64_t channels, int64_t total_tokens) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.y;
  if (token >= total_tokens) return;
  const int64_t N = g.tokens_per_window();
  V* out = dst + token * channels;
  int64_t b, t, h, w;
  if (!partition_source(g, token / N, token % N, &b, &t, &h, &w)) {
    for (int64_t c = threadIdx.x; c < channels; c += kLanes) out[c] = V{};
    return;
  }
  const V* in = src + b * s.s0 + t * s.s1 + h * s.s2 + w * s.s3;
  for (int64_t c = threadIdx.x; c < channels; c += kLanes) out[c] = in[c * s.s4];
}

template <typename V>
__global__ void reverse_kernel(const V* __restrict__ src, V* __restrict__ dst, WindowGeometry g, GatherStrides s,
                               int64_t channels, int64_t total_tokens) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + threadIdx.y;
  if (token >= total_tokens) return;
  const int64_t w = token % g.W, h = (token / g.W) % g.H, t = (token / (g.W * g.H)) % g.T;
  const int64_t b = token / (g.W * g.H * g.T);
  int64_t row, n;
  reverse_source(g, b, t, h, w, &row, &n);
  const V* in = src + row * s.s0 + n * s.s1;
  V* out = dst + token * channels;
  for (int64_t c = threadIdx.x; c < channels; c += kLanes) out[c] = in[c * s.s2];
}

// Widest vector (bytes) that divides the channel bytes, every token stride and both pointers.
int vector_bytes(const WindowPartitionParams& p, int64_t channel_stride, std::initializer_list<int64_t> token_strides) {
  if (channel_stride != 1) return static_cast<int>(p.element_size);
  const int64_t es = p.element_size;
  for (int v : {16, 8, 4, 2}) {
    if (v < es) break;
    bool ok = (p.geometry.C * es) % v == 0 && reinterpret_cast<uintptr_t>(p.src) % v == 0 &&
              reinterpret_cast<uintptr_t>(p.dst) % v == 0;
    for (int64_t st : token_strides) ok = ok && (st * es) % v == 0;
    if (ok) return v;
  }
  return static_cast<int>(es);
}

template <typename V, bool kPartition>
void launch(const WindowPartitionParams& p, int64_t channel_stride) {
  const int64_t es = p.element_size;
  const int64_t per = static_cast<int64_t>(sizeof(V)) / es;  // elements per vector (1 when strided)
  const auto& g = p.geometry;
  // Strides in units of V: token strides scale down with the vector; the channel stride stays in elements
  // when V is one element, and becomes 1 vector when V packs several contiguous elements.
  GatherStrides s = p.src_strides;
  s.s0 /= per;
  s.s1 /= per;
  s.s2 = kPartition ? s.s2 / per : (per > 1 ? 1 : channel_stride);
  s.s3 /= per;
  if (kPartition) s.s4 = per > 1 ? 1 : channel_stride;
  const int64_t channels = g.C / per;
  const int64_t total = kPartition ? g.num_rows() * g.tokens_per_window() : g.B * g.T * g.H * g.W;
  const int64_t blocks = (total + kTokensPerBlock - 1) / kTokensPerBlock;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "window_partition: too many tokens for one launch (", total, ")");
  const dim3 block(kLanes, kTokensPerBlock);
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(p.device_index));
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto* src = static_cast<const V*>(p.src);
  auto* dst = static_cast<V*>(p.dst);
  if (kPartition) {
    partition_kernel<V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(src, dst, g, s, channels, total);
  } else {
    reverse_kernel<V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(src, dst, g, s, channels, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kPartition>
void dispatch(const WindowPartitionParams& p) {
  const auto& s = p.src_strides;
  const int64_t channel_stride = kPartition ? s.s4 : s.s2;
  const int v = kPartition ? vector_bytes(p, channel_stride, {s.s0, s.s1, s.s2, s.s3})
                           : vector_bytes(p, channel_stride, {s.s0, s.s1});
  switch (v) {
    case 16: return launch<uint4, kPartition>(p, channel_stride);
    case 8: return launch<uint2, kPartition>(p, channel_stride);
    case 4: return launch<uint32_t, kPartition>(p, channel_stride);
    case 2: return launch<uint16_t, kPartition>(p, channel_stride);
    default: return launch<uint8_t, kPartition>(p, channel_stride);
  }
}

}  // namespace

void window_partition_cuda(const WindowPartitionParams& p) { dispatch<true>(p); }
void window_reverse_cuda(const WindowPartitionParams& p) { dispatch<false>(p); }

}  // namespace florence

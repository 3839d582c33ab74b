// Modulated deformable convolution (DCNv2) on CUDA, torchvision.ops.deform_conv2d's semantics.
//
// The same plan as the CPU kernel, with the same sampling code (bilinear.h, deform_conv_shape.h): per sample and
// per tile of output positions (tiles of at most kTileBytes of columns, never a whole C_in 9 H W buffer for large
// images), one kernel writes the mask-weighted bilinear columns (C_in K, n), one thread per element, and cuBLAS
// multiplies them by each convolution group's weight. The backward recomputes each tile's columns for the weight
// gradient (cuBLAS), forms the column gradient W^T dOut (cuBLAS), then
//   - scatters it into the input gradient: one thread per (channel, tap, position), atomic adds to the 4 corners;
//   - reduces it into the offset and mask gradients: one thread per (offset group, tap, position), summing the
//     group's channels in order (deterministic).
// fp32 and fp64 here; fp16/bf16 inputs are computed in fp32 by the Python wrapper.
#include <ATen/ATen.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "deform_conv_shape.h"

namespace florence {
namespace {

constexpr int64_t kTileBytes = int64_t{64} << 20;
constexpr int kThreads = 256;

int64_t tile_positions(const Dcn& d, int64_t element_size) {
  const int64_t per_position = d.C_in * d.K() * element_size;
  return std::max<int64_t>(32, std::min(d.P(), kTileBytes / std::max<int64_t>(per_position, 1)));
}

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(b < (int64_t{1} << 31), "modulated_deform_conv2d (cuda): too many elements in one tile (", n, ")");
  return static_cast<int>(std::max<int64_t>(b, 1));
}

// cols[(c K + k) n + q] = mask * bilinear(input[b, c], tap k of c's offset group at position p0 + q).
template <typename T>
__global__ void columns_kernel(Dcn d, const T* __restrict__ in, const T* __restrict__ off,
                               const T* __restrict__ mask, int64_t b, int64_t p0, int64_t n, T* __restrict__ cols) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= d.C_in * d.K() * n) return;
  const int64_t q = e % n, k = (e / n) % d.K(), c = e / (n * d.K());
  const int64_t g = c / d.cpog();
  const auto t = taps_at(d, off, b, g, k, p0 + q);
  cols[e] = mask_at(d, mask, b, g, k, p0 + q) * bilinear_value(in + (b * d.C_in + c) * d.H * d.W, t);
}

// grad_input[b, c] += corner weight * mask * dcols at each valid corner (several taps and positions can hit one
// pixel: atomic adds).
template <typename T>
__global__ void input_grad_kernel(Dcn d, const T* __restrict__ dcols, const T* __restrict__ off,
                                  const T* __restrict__ mask, int64_t b, int64_t p0, int64_t n, T* __restrict__ gin) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= d.C_in * d.K() * n) return;
  const int64_t q = e % n, k = (e / n) % d.K(), c = e / (n * d.K());
  const int64_t g = c / d.cpog();
  const auto t = taps_at(d, off, b, g, k, p0 + q);
  const T v = mask_at(d, mask, b, g, k, p0 + q) * dcols[e];
  T* plane = gin + (b * d.C_in + c) * d.H * d.W;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (scatters(t, i)) gpuAtomicAdd(plane + t.idx[i], t.w[i] * v);
}

// grad_offset (y, x) and grad_mask of one (offset group, tap, position): sums over the group's channels.
template <typename T>
__global__ void offset_mask_grad_kernel(Dcn d, const T* __restrict__ in, const T* __restrict__ dcols,
                                        const T* __restrict__ off, const T* __restrict__ mask, int64_t b, int64_t p0,
                                        int64_t n, T* __restrict__ goff, T* __restrict__ gmask) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= d.G * d.K() * n) return;
  const int64_t q = e % n, k = (e / n) % d.K(), g = e / (n * d.K());
  const auto t = taps_at(d, off, b, g, k, p0 + q);
  const T m = mask_at(d, mask, b, g, k, p0 + q);
  T dm = 0, doy = 0, dox = 0;
  for (int64_t c = g * d.cpog(); c < (g + 1) * d.cpog(); ++c) {
    const T* plane = in + (b * d.C_in + c) * d.H * d.W;
    const T gc = dcols[(c * d.K() + k) * n + q];
    T gy, gx;
    bilinear_coord_grad(plane, t, &gy, &gx);
    dm += gc * bilinear_value(plane, t);
    doy += gc * m * gy;
    dox += gc * m * gx;
  }
  const int64_t ch = 2 * (g * d.K() + k), p = p0 + q;
  goff[(b * 2 * d.G * d.K() + ch) * d.P() + p] = doy;
  goff[(b * 2 * d.G * d.K() + ch + 1) * d.P() + p] = dox;
  if (gmask != nullptr) gmask[(b * d.G * d.K() + g * d.K() + k) * d.P() + p] = dm;
}

void check_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "modulated_deform_conv2d (cuda): input: expected float32 or float64 (fp16/bf16 are upcast by the "
              "Python wrapper), got ",
              input.scalar_type());
}

at::Tensor dcn_forward_cuda(const at::Tensor& input_, const at::Tensor& offset_,
                            const c10::optional<at::Tensor>& mask_, const at::Tensor& weight_,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation) {
  const Dcn d = make_dcn(input_, offset_, mask_, weight_, stride, padding, dilation, c10::DeviceType::CUDA,
                         "modulated_deform_conv2d (cuda)");
  check_dtype(input_);
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const bool has_mask = mask_.has_value() && mask_->defined();
  const auto mask = has_mask ? mask_->contiguous() : at::Tensor();
  auto out = at::empty({d.B, d.C_out, d.P()}, input.options());
  const int64_t tile = tile_positions(d, input.element_size());
  const auto w = weight.view({d.groups, d.copg(), d.cpg() * d.K()});
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_cuda", [&] {
    auto cols = at::empty({d.C_in * d.K(), tile}, input.options());
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t p0 = 0; p0 < d.P(); p0 += tile) {
        const int64_t n = std::min(tile, d.P() - p0);
        auto cv = cols.narrow(1, 0, n);
        if (n != tile) cv = cv.contiguous();  // last tile: a dense (C_in K, n) buffer
        columns_kernel<scalar_t><<<blocks_for(d.C_in * d.K() * n), kThreads, 0, stream>>>(
            d, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), has_mask ? mask.data_ptr<scalar_t>() : nullptr,
            b, p0, n, cv.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        for (int64_t gr = 0; gr < d.groups; ++gr) {
          auto dst = out[b].narrow(0, gr * d.copg(), d.copg()).narrow(1, p0, n);
          dst.copy_(at::mm(w[gr], cv.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K())));
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) out.add_(bias->view({1, -1, 1}));
  return out.view({d.B, d.C_out, d.Ho, d.Wo});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcn_backward_cuda(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& offset_,
    const c10::optional<at::Tensor>& mask_, const at::Tensor& weight_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const Dcn d = make_dcn(input_, offset_, mask_, weight_, stride, padding, dilation, c10::DeviceType::CUDA,
                         "modulated_deform_conv2d (cuda)");
  check_dtype(input_);
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({d.B, d.C_out, d.Ho, d.Wo}), "grad: expected shape [", d.B, ", ",
              d.C_out, ", ", d.Ho, ", ", d.Wo, "], got ", sizes_str(grad_.sizes()));
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const auto grad = grad_.contiguous().view({d.B, d.C_out, d.P()});
  const bool has_mask = mask_.has_value() && mask_->defined();
  const auto mask = has_mask ? mask_->contiguous() : at::Tensor();
  auto grad_input = at::zeros_like(input);
  auto grad_offset = at::empty_like(offset);
  auto grad_mask = has_mask ? at::empty_like(mask) : at::empty({0}, input.options());
  auto grad_weight = at::zeros({d.groups, d.copg(), d.cpg() * d.K()}, input.options());
  const auto w = weight.view({d.groups, d.copg(), d.cpg() * d.K()});
  const int64_t tile = tile_positions(d, input.element_size());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward_cuda", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* off = offset.data_ptr<scalar_t>();
    const scalar_t* mk = has_mask ? mask.data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t p0 = 0; p0 < d.P(); p0 += tile) {
        const int64_t n = std::min(tile, d.P() - p0);
        auto cols = at::empty({d.C_in * d.K(), n}, input.options());
        columns_kernel<scalar_t>
            <<<blocks_for(d.C_in * d.K() * n), kThreads, 0, stream>>>(d, in, off, mk, b, p0, n, cols.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        auto dcols = at::empty({d.C_in * d.K(), n}, input.options());
        const auto g = grad[b].narrow(1, p0, n);
        for (int64_t gr = 0; gr < d.groups; ++gr) {
          const auto g_gr = g.narrow(0, gr * d.copg(), d.copg());
          const auto c_gr = cols.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K());
          grad_weight[gr].addmm_(g_gr, c_gr.t());
          auto dst = dcols.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K());
          at::mm_out(dst, w[gr].t(), g_gr);
        }
        input_grad_kernel<scalar_t><<<blocks_for(d.C_in * d.K() * n), kThreads, 0, stream>>>(
            d, dcols.data_ptr<scalar_t>(), off, mk, b, p0, n, grad_input.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        offset_mask_grad_kernel<scalar_t><<<blocks_for(d.G * d.K() * n), kThreads, 0, stream>>>(
            d, in, dcols.data_ptr<scalar_t>(), off, mk, b, p0, n, grad_offset.data_ptr<scalar_t>(),
            has_mask ? grad_mask.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {grad_input, grad_offset, grad_mask, grad_weight.view(weight.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(florence_kernels_C, CUDA, m) {
  m.impl("deform_conv2d_fwd", &dcn_forward_cuda);
  m.impl("deform_conv2d_bwd", &dcn_backward_cuda);
}

}  // namespace florence

// Modulated deformable convolution (DCNv2) on the CPU, torchvision.ops.deform_conv2d's semantics.
//
// Per sample and per tile of output positions, the sampled, mask-weighted columns (C_in kh kw, tile) are built with
// the shared bilinear code (bilinear.h) and multiplied by the weight of each convolution group. Tiles hold ~4 MB of
// columns whatever the image size (no per-sample C_in 9 H W buffer). The backward recomputes each tile's columns
// for the weight gradient, forms the column gradient W^T dOut, then scatters it to the input (parallel over input
// channels: each thread owns whole planes, no atomics) and reduces it into the offset and mask gradients (parallel
// over taps and positions, summing the group's channels in order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "deform_conv_shape.h"

namespace florence {
namespace {

constexpr int64_t kTileBytes = 4 << 20;

int64_t tile_positions(const Dcn& d, int64_t element_size) {
  const int64_t per_position = d.C_in * d.K() * element_size;
  return std::max<int64_t>(16, std::min(d.P(), kTileBytes / std::max<int64_t>(per_position, 1)));
}

// The sampling taps and mask values of every (offset group, tap, position) of a tile, computed once and shared by
// all the group's channels: index (g K + k) n + q.
template <typename T>
struct TileTaps {
  std::vector<BilinearTaps<T>> taps;
  std::vector<T> mask;
};

template <typename T>
TileTaps<T> tile_taps(const Dcn& d, const T* off, const T* mask, int64_t b, int64_t p0, int64_t n) {
  TileTaps<T> tt;
  tt.taps.resize(d.G * d.K() * n);
  tt.mask.resize(d.G * d.K() * n);
  at::parallel_for(0, d.G * d.K() * n, 256, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t q = e % n, k = (e / n) % d.K(), g = e / (n * d.K());
      tt.taps[e] = taps_at(d, off, b, g, k, p0 + q);
      tt.mask[e] = mask_at(d, mask, b, g, k, p0 + q);
    }
  });
  return tt;
}

// cols[(c K + k) n + q] for positions p0 + q, q < n.
template <typename T>
void build_columns(const Dcn& d, const T* in, const TileTaps<T>& tt, int64_t b, int64_t n, T* cols) {
  at::parallel_for(0, d.C_in, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* plane = in + (b * d.C_in + c) * d.H * d.W;
      const int64_t g = c / d.cpog();
      for (int64_t k = 0; k < d.K(); ++k) {
        T* row = cols + (c * d.K() + k) * n;
        const BilinearTaps<T>* t = tt.taps.data() + (g * d.K() + k) * n;
        const T* m = tt.mask.data() + (g * d.K() + k) * n;
        for (int64_t q = 0; q < n; ++q) row[q] = m[q] * bilinear_value(plane, t[q]);
      }
    }
  });
}

at::Tensor dcn_forward(const at::Tensor& input_, const at::Tensor& offset_, const c10::optional<at::Tensor>& mask_,
                       const at::Tensor& weight_, const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Dcn d = make_dcn(input_, offset_, mask_, weight_, stride, padding, dilation, c10::DeviceType::CPU,
                         "modulated_deform_conv2d (cpp)");
  const auto input = input_.contiguous(), offset = offset_.contiguous(), weight = weight_.contiguous();
  const bool has_mask = mask_.has_value() && mask_->defined();
  const auto mask = has_mask ? mask_->contiguous() : at::Tensor();
  auto out = at::empty({d.B, d.C_out, d.P()}, input.options());
  const int64_t tile = tile_positions(d, input.element_size());
  const auto w = weight.view({d.groups, d.copg(), d.cpg() * d.K()});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_forward_cpu", [&] {
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t p0 = 0; p0 < d.P(); p0 += tile) {
        const int64_t n = std::min(tile, d.P() - p0);
        auto cv = at::empty({d.C_in * d.K(), n}, input.options());
        const auto tt = tile_taps<scalar_t>(d, offset.data_ptr<scalar_t>(),
                                            has_mask ? mask.data_ptr<scalar_t>() : nullptr, b, p0, n);
        build_columns<scalar_t>(d, input.data_ptr<scalar_t>(), tt, b, n, cv.data_ptr<scalar_t>());
        for (int64_t gr = 0; gr < d.groups; ++gr) {
          auto res = at::mm(w[gr], cv.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K()));
          out[b].narrow(0, gr * d.copg(), d.copg()).narrow(1, p0, n).copy_(res);
        }
      }
    }
  });
  if (bias.has_value() && bias->defined()) out.add_(bias->view({1, -1, 1}));
  return out.view({d.B, d.C_out, d.Ho, d.Wo});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcn_backward(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& offset_,
    const c10::optional<at::Tensor>& mask_, const at::Tensor& weight_, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const Dcn d = make_dcn(input_, offset_, mask_, weight_, stride, padding, dilation, c10::DeviceType::CPU,
                         "modulated_deform_conv2d (cpp)");
  TORCH_CHECK(grad_.sizes() == at::IntArrayRef({d.B, d.C_out, d.Ho, d.Wo}), "grad: expected shape [", d.B, ", ",
              d.C_out, ", ", d.Ho, ", ", d.Wo, "], got ", sizes_str(grad_.sizes()));
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
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcn_backward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* off = offset.data_ptr<scalar_t>();
    const scalar_t* mk = has_mask ? mask.data_ptr<scalar_t>() : nullptr;
    scalar_t* gin = grad_input.data_ptr<scalar_t>();
    scalar_t* goff = grad_offset.data_ptr<scalar_t>();
    scalar_t* gmk = has_mask ? grad_mask.data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t p0 = 0; p0 < d.P(); p0 += tile) {
        const int64_t n = std::min(tile, d.P() - p0);
        auto cols = at::empty({d.C_in * d.K(), n}, input.options());
        const auto tt = tile_taps<scalar_t>(d, off, mk, b, p0, n);
        build_columns<scalar_t>(d, in, tt, b, n, cols.data_ptr<scalar_t>());
        auto dcols = at::empty({d.C_in * d.K(), n}, input.options());
        const auto g = grad[b].narrow(1, p0, n);
        for (int64_t gr = 0; gr < d.groups; ++gr) {
          const auto g_gr = g.narrow(0, gr * d.copg(), d.copg());
          const auto c_gr = cols.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K());
          grad_weight[gr].addmm_(g_gr, c_gr.t());
          dcols.narrow(0, gr * d.cpg() * d.K(), d.cpg() * d.K()).copy_(at::mm(w[gr].t(), g_gr));
        }
        const scalar_t* dc = dcols.data_ptr<scalar_t>();
        // Input: each thread owns whole input planes (channels): no two threads add to the same element.
        at::parallel_for(0, d.C_in, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            scalar_t* gplane = gin + (b * d.C_in + c) * d.H * d.W;
            const int64_t og = c / d.cpog();
            for (int64_t k = 0; k < d.K(); ++k) {
              const scalar_t* row = dc + (c * d.K() + k) * n;
              const auto* taps = tt.taps.data() + (og * d.K() + k) * n;
              const scalar_t* m = tt.mask.data() + (og * d.K() + k) * n;
              for (int64_t q = 0; q < n; ++q) {
                const auto& t = taps[q];
                const scalar_t v = m[q] * row[q];
                for (int i = 0; i < 4; ++i)
                  if (scatters(t, i)) gplane[t.idx[i]] += t.w[i] * v;
              }
            }
          }
        });
        // Offsets and mask: one (offset group, tap, position) each, summing the group's channels in order.
        at::parallel_for(0, d.G * d.K() * n, 64, [&](int64_t e0, int64_t e1) {
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t q = e % n, k = (e / n) % d.K(), og = e / (n * d.K());
            const auto& t = tt.taps[e];
            const scalar_t m = tt.mask[e];
            scalar_t dm = 0, doy = 0, dox = 0;
            for (int64_t c = og * d.cpog(); c < (og + 1) * d.cpog(); ++c) {
              const scalar_t* plane = in + (b * d.C_in + c) * d.H * d.W;
              const scalar_t gc = dc[(c * d.K() + k) * n + q];
              scalar_t gy, gx;
              bilinear_coord_grad(plane, t, &gy, &gx);
              dm += gc * bilinear_value(plane, t);
              doy += gc * m * gy;
              dox += gc * m * gx;
            }
            const int64_t ch = 2 * (og * d.K() + k);
            goff[(b * 2 * d.G * d.K() + ch) * d.P() + p0 + q] = doy;
            goff[(b * 2 * d.G * d.K() + ch + 1) * d.P() + p0 + q] = dox;
            if (gmk != nullptr) gmk[(b * d.G * d.K() + og * d.K() + k) * d.P() + p0 + q] = dm;
          }
        });
      }
    }
  });
  return {grad_input, grad_offset, grad_mask, grad_weight.view(weight.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(florence_kernels_C, CPU, m) {
  m.impl("deform_conv2d_fwd", &dcn_forward);
  m.impl("deform_conv2d_bwd", &dcn_backward);
}

}  // namespace florence

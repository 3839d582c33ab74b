// The geometry of one modulated deformable convolution, its argument checks, and where tap k of offset group g
// samples at output position p: shared by the CPU kernel (deform_conv_cpu.cpp) and the CUDA kernel
// (deform_conv_cuda.cu). The sampling functions are __host__ __device__ (FK_HD from bilinear.h).
#pragma once

#include <ATen/ATen.h>

#include "../common/format.h"
#include "bilinear.h"

namespace florence {

struct Dcn {
  int64_t B, C_in, H, W, C_out, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, G, groups;
  FK_HD int64_t K() const { return kh * kw; }
  FK_HD int64_t P() const { return Ho * Wo; }
  FK_HD int64_t cpg() const { return C_in / groups; }   // input channels per convolution group
  FK_HD int64_t copg() const { return C_out / groups; }  // output channels per convolution group
  FK_HD int64_t cpog() const { return C_in / G; }       // input channels per offset group
};

// Checks every argument (naming it, its shape and what was expected) and returns the geometry. `device` is the
// device type the calling kernel runs on; `who` names it in messages.
inline Dcn make_dcn(const at::Tensor& input, const at::Tensor& offset, const c10::optional<at::Tensor>& mask,
                    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    c10::DeviceType device, const char* who) {
  TORCH_CHECK(input.dim() == 4, "input: expected (B, C_in, H, W), got ", sizes_str(input.sizes()));
  TORCH_CHECK(weight.dim() == 4, "weight: expected (C_out, C_in / groups, kh, kw), got ", sizes_str(weight.sizes()));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding, dilation: expected 2 values each");
  Dcn d;
  d.B = input.size(0);
  d.C_in = input.size(1);
  d.H = input.size(2);
  d.W = input.size(3);
  d.C_out = weight.size(0);
  d.kh = weight.size(2);
  d.kw = weight.size(3);
  d.sh = stride[0];
  d.sw = stride[1];
  d.ph = padding[0];
  d.pw = padding[1];
  d.dh = dilation[0];
  d.dw = dilation[1];
  TORCH_CHECK(weight.size(1) > 0 && d.C_in % weight.size(1) == 0, "weight: ", sizes_str(weight.sizes()),
              " does not divide the ", d.C_in, " input channels into groups");
  d.groups = d.C_in / weight.size(1);
  TORCH_CHECK(d.C_out % d.groups == 0, "weight: C_out ", d.C_out, " is not divisible by groups ", d.groups);
  d.Ho = (d.H + 2 * d.ph - d.dh * (d.kh - 1) - 1) / d.sh + 1;
  d.Wo = (d.W + 2 * d.pw - d.dw * (d.kw - 1) - 1) / d.sw + 1;
  TORCH_CHECK(offset.dim() == 4 && offset.size(0) == d.B && offset.size(1) % (2 * d.K()) == 0 &&
                  offset.size(2) == d.Ho && offset.size(3) == d.Wo,
              "offset: expected (B=", d.B, ", 2 * offset_groups * ", d.K(), ", ", d.Ho, ", ", d.Wo, "), got ",
              sizes_str(offset.sizes()));
  d.G = offset.size(1) / (2 * d.K());
  TORCH_CHECK(d.G > 0 && d.C_in % d.G == 0, "offset: ", d.G, " offset groups do not divide the ", d.C_in,
              " input channels");
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({d.B, d.G * d.K(), d.Ho, d.Wo}), "mask: expected shape [", d.B,
                ", ", d.G * d.K(), ", ", d.Ho, ", ", d.Wo, "], got ", sizes_str(mask->sizes()));
    TORCH_CHECK(mask->device().type() == device && mask->scalar_type() == input.scalar_type(), "mask: expected a ",
                c10::DeviceTypeName(device), " ", input.scalar_type(), " tensor like input, got ", mask->device(), " ",
                mask->scalar_type());
  }
  for (const auto* t : {&input, &offset, &weight}) {
    TORCH_CHECK(t->device().type() == device, who, ": expected ", c10::DeviceTypeName(device), " tensors, got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), "offset, weight: expected dtype ", input.scalar_type(),
                " like input, got ", t->scalar_type());
  }
  return d;
}

// Sampling point of tap k of offset group g at output position p (flattened), sample b; off is (B, 2 G K, P).
template <typename T>
FK_HD BilinearTaps<T> taps_at(const Dcn& d, const T* off, int64_t b, int64_t g, int64_t k, int64_t p) {
  const int64_t ho = p / d.Wo, wo = p % d.Wo, i = k / d.kw, j = k % d.kw;
  const int64_t ch = 2 * (g * d.K() + k);
  const T oy = off[((b * 2 * d.G * d.K() + ch) * d.P()) + p];
  const T ox = off[((b * 2 * d.G * d.K() + ch + 1) * d.P()) + p];
  const T y = static_cast<T>(ho * d.sh - d.ph + i * d.dh) + oy;
  const T x = static_cast<T>(wo * d.sw - d.pw + j * d.dw) + ox;
  return bilinear_taps<T>(d.H, d.W, y, x);
}

// Mask of tap k of offset group g at position p (1 without a mask); mask is (B, G K, P).
template <typename T>
FK_HD T mask_at(const Dcn& d, const T* mask, int64_t b, int64_t g, int64_t k, int64_t p) {
  return mask == nullptr ? T(1) : mask[((b * d.G * d.K() + g * d.K() + k) * d.P()) + p];
}

}  // namespace florence

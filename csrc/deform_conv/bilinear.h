// Bilinear sampling with torchvision's deform_conv2d rules, and its derivatives.
//
// Shared by the C++ CPU kernel (which CI runs) and a CUDA kernel: every function is __host__ __device__.
// Rules (torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp, bilinear_interpolate / get_coordinate_weight):
// - value: 0 for a point with y <= -1, y >= H, x <= -1 or x >= W (infinite coordinates included); otherwise the
//   four neighbours blended, neighbours outside the image counting as 0; a NaN coordinate reads NaN (NaN weights);
// - input gradient (torchvision's col2im): each neighbour inside the image and strictly less than one pixel away
//   on both axes gets its weight; non-finite points give nothing;
// - coordinate gradient: the derivative on the cell [floor(y), floor(y) + 1] x [floor(x), floor(x) + 1], i.e. the
//   one-sided derivative towards the increasing coordinate at integer positions, y = -1 included (value 0 there,
//   slope towards row 0), with no outside test; at a non-finite coordinate it is 0 for that coordinate and NaN
//   (0 x inf) for the other one, as torchvision's formula gives.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#else
#define FK_HD inline
#endif

namespace florence {

template <typename T>
FK_HD bool fk_isfinite(T v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// The four neighbours (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) of (y, x) and their weights; valid[i]
// false for neighbours outside the image and for every neighbour of a non-finite point (whose idx is then 0).
template <typename T>
struct BilinearTaps {
  int64_t idx[4];
  T w[4];
  bool valid[4];
  T ly, lx;         // fractional parts y - floor(y), x - floor(x) (NaN for a non-finite coordinate)
  bool outside;     // y <= -1, y >= H, x <= -1 or x >= W: the point reads 0
};

template <typename T>
FK_HD BilinearTaps<T> bilinear_taps(int64_t H, int64_t W, T y, T x) {
  using std::floor;
  BilinearTaps<T> t;
  t.outside = y <= T(-1) || y >= T(H) || x <= T(-1) || x >= T(W);  // false for NaN
  const bool finite = fk_isfinite(y) && fk_isfinite(x);
  const T yf = floor(y), xf = floor(x);
  t.ly = y - yf;
  t.lx = x - xf;
  const T hy = T(1) - t.ly, hx = T(1) - t.lx;
  const T ys[4] = {yf, yf, yf + T(1), yf + T(1)}, xs[4] = {xf, xf + T(1), xf, xf + T(1)};
  const T ws[4] = {hy * hx, hy * t.lx, t.ly * hx, t.ly * t.lx};
  for (int i = 0; i < 4; ++i) {
    // compared as floating point: a huge or non-finite coordinate is never converted to an integer
    t.valid[i] = finite && ys[i] >= T(0) && ys[i] <= T(H - 1) && xs[i] >= T(0) && xs[i] <= T(W - 1);
    t.idx[i] = t.valid[i] ? static_cast<int64_t>(ys[i]) * W + static_cast<int64_t>(xs[i]) : 0;
    t.w[i] = ws[i];
  }
  return t;
}

template <typename T>
FK_HD T corner(const T* plane, const BilinearTaps<T>& t, int i) {
  return t.valid[i] ? plane[t.idx[i]] : T(0);
}

// Whether neighbour i receives input gradient: inside the image and closer than one pixel on both axes (its weight is
// then > 0; a neighbour at distance exactly 1 has weight 0 and is skipped, as torchvision's |y - yp| < 1 test does).
template <typename T>
FK_HD bool scatters(const BilinearTaps<T>& t, int i) {
  return t.valid[i] && t.w[i] > T(0);
}

// The sampled value: 0 outside, NaN for a NaN coordinate (NaN weights), else the blend.
template <typename T>
FK_HD T bilinear_value(const T* plane, const BilinearTaps<T>& t) {
  if (t.outside) return T(0);
  T v = 0;
  for (int i = 0; i < 4; ++i) v += t.w[i] * corner(plane, t, i);
  return v;
}

// d value / d y and d value / d x on the cell of the point, in torchvision's order of operations.
template <typename T>
FK_HD void bilinear_coord_grad(const T* plane, const BilinearTaps<T>& t, T* dy, T* dx) {
  const T v00 = corner(plane, t, 0), v01 = corner(plane, t, 1), v10 = corner(plane, t, 2), v11 = corner(plane, t, 3);
  *dy = t.lx * (v11 - v01) + (T(1) - t.lx) * (v10 - v00);
  *dx = t.ly * (v11 - v10) + (T(1) - t.ly) * (v01 - v00);
}

}  // namespace florence

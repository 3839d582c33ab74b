// Bilinear sampling with torchvision's deform_conv2d border rule, and its derivatives.
//
// Shared by the C++ CPU kernel (which CI runs) and a CUDA kernel: every function is __host__ __device__.
// Rule (torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp): a point with y <= -1, y >= H, x <= -1 or x >= W reads 0;
// otherwise the four neighbours are blended and neighbours outside the image count as 0.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HD __host__ __device__ __forceinline__
#else
#define FK_HD inline
#endif

namespace florence {

// The four neighbours of (y, x) and their weights; valid[i] false for neighbours outside the image (or when the
// point reads 0 altogether).
template <typename T>
struct BilinearTaps {
  int64_t idx[4];
  T w[4];
  bool valid[4];
  T ly, lx;  // fractional parts
};

template <typename T>
FK_HD BilinearTaps<T> bilinear_taps(int64_t H, int64_t W, T y, T x) {
  using std::floor;
  BilinearTaps<T> t;
  const bool inside = y > T(-1) && y < T(H) && x > T(-1) && x < T(W);
  const T yf = floor(y), xf = floor(x);
  const int64_t y0 = static_cast<int64_t>(yf), x0 = static_cast<int64_t>(xf);
  t.ly = y - yf;
  t.lx = x - xf;
  const T hy = T(1) - t.ly, hx = T(1) - t.lx;
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1}, xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const T ws[4] = {hy * hx, hy * t.lx, t.ly * hx, t.ly * t.lx};
  for (int i = 0; i < 4; ++i) {
    t.valid[i] = inside && ys[i] >= 0 && ys[i] < H && xs[i] >= 0 && xs[i] < W;
    t.idx[i] = t.valid[i] ? ys[i] * W + xs[i] : 0;
    t.w[i] = ws[i];
  }
  return t;
}

template <typename T>
FK_HD T bilinear_value(const T* plane, const BilinearTaps<T>& t) {
  T v = 0;
  for (int i = 0; i < 4; ++i)
    if (t.valid[i]) v += t.w[i] * plane[t.idx[i]];
  return v;
}

// d value / d y and d value / d x at the sampling point.
template <typename T>
FK_HD void bilinear_coord_grad(const T* plane, const BilinearTaps<T>& t, T* dy, T* dx) {
  const T v00 = t.valid[0] ? plane[t.idx[0]] : T(0), v01 = t.valid[1] ? plane[t.idx[1]] : T(0);
  const T v10 = t.valid[2] ? plane[t.idx[2]] : T(0), v11 = t.valid[3] ? plane[t.idx[3]] : T(0);
  const T hy = T(1) - t.ly, hx = T(1) - t.lx;
  const bool any = t.valid[0] || t.valid[1] || t.valid[2] || t.valid[3];
  *dy = any ? hx * (v10 - v00) + t.lx * (v11 - v01) : T(0);
  *dx = any ? hy * (v01 - v00) + t.ly * (v11 - v10) : T(0);
}

}  // namespace florence

// Index arithmetic of the fused cyclic shift + window partition (Swin / Video Swin).
//
// Shared by the CUDA kernel and the C++ CPU loop: every function here is __host__ __device__, so the
// CPU path, which CI runs, tests the exact arithmetic the GPU executes.
//
// Semantics (the reference in florence_kernels/ops/window_partition.py):
//   x (B, T, H, W, C) -> zero-pad T, H, W at their ends to multiples of the window
//                     -> roll by minus the shift on each axis
//                     -> windows (B * nT * nH * nW, Wt * Wh * Ww, C) in Video Swin's order.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif

namespace florence {

// Resolved geometry: windows already shrunk and shifts zeroed on axes where the input is <= the window
// (done once in Python, florence_kernels/ops/window_partition.py::resolve_geometry).
struct WindowGeometry {
  int64_t B, T, H, W, C;     // unpadded input sizes
  int64_t wt, wh, ww;        // window size
  int64_t st, sh, sw;        // shift size, 0 <= s < w
  int64_t nT, nH, nW;        // windows per axis (padded size / window)

  FK_HOST_DEVICE int64_t windows_per_sample() const { return nT * nH * nW; }
  FK_HOST_DEVICE int64_t tokens_per_window() const { return wt * wh * ww; }
  FK_HOST_DEVICE int64_t num_rows() const { return B * windows_per_sample(); }
};

// Source of padded-and-shifted position j on one axis: rolling by -s means shifted[j] = padded[(j + s) mod P].
FK_HOST_DEVICE int64_t shifted_source(int64_t j, int64_t shift, int64_t padded) { return (j + shift) % padded; }

// Shifted position of unpadded coordinate i on one axis: the inverse of shifted_source.
FK_HOST_DEVICE int64_t shifted_position(int64_t i, int64_t shift, int64_t padded) {
  return (i - shift + padded) % padded;
}

// Where output token (row, n) of the partition reads from. Returns false when it falls in padding
// (the output is zero there). row in [0, B * nWin), n in [0, Wt * Wh * Ww).
FK_HOST_DEVICE bool partition_source(const WindowGeometry& g, int64_t row, int64_t n, int64_t* b, int64_t* t,
                                     int64_t* h, int64_t* w) {
  const int64_t n_win = g.windows_per_sample();
  const int64_t win = row % n_win;
  *b = row / n_win;
  const int64_t iw = win % g.nW;
  const int64_t ih = (win / g.nW) % g.nH;
  const int64_t it = win / (g.nW * g.nH);
  const int64_t q = n % g.ww;
  const int64_t p = (n / g.ww) % g.wh;
  const int64_t a = n / (g.ww * g.wh);
  *t = shifted_source(it * g.wt + a, g.st, g.nT * g.wt);
  *h = shifted_source(ih * g.wh + p, g.sh, g.nH * g.wh);
  *w = shifted_source(iw * g.ww + q, g.sw, g.nW * g.ww);
  return *t < g.T && *h < g.H && *w < g.W;
}

// Where unpadded token (t, h, w) of sample b sits in the windows: the inverse of partition_source.
FK_HOST_DEVICE void reverse_source(const WindowGeometry& g, int64_t b, int64_t t, int64_t h, int64_t w,
                                   int64_t* row, int64_t* n) {
  const int64_t Tp = g.nT * g.wt, Hp = g.nH * g.wh, Wp = g.nW * g.ww;
  const int64_t ts = shifted_position(t, g.st, Tp);
  const int64_t hs = shifted_position(h, g.sh, Hp);
  const int64_t ws = shifted_position(w, g.sw, Wp);
  *row = b * g.windows_per_sample() + ((ts / g.wt) * g.nH + hs / g.wh) * g.nW + ws / g.ww;
  *n = ((ts % g.wt) * g.wh + hs % g.wh) * g.ww + ws % g.ww;
}

}  // namespace florence

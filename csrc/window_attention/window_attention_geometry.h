// Index arithmetic of shifted-window attention beyond the partition itself: Video Swin's shift regions (the -100
// mask) and the relative position bias row of a (query, key) pair.
//
// Every function is __host__ __device__: the C++ CPU kernel, which CI runs, executes the same arithmetic a CUDA
// kernel would. Reference: florence_kernels/ops/window_attention.py (attention_masks, relative_position_index).
#pragma once

#include "../window_partition/window_geometry.h"

namespace florence {

// The window_size the bias table was built for. The effective window (WindowGeometry::wt/wh/ww) shrinks on axes
// where the input is smaller; relative offsets keep indexing the nominal table.
struct NominalWindow {
  int64_t wt, wh, ww;
};

FK_HOST_DEVICE int64_t bias_table_rows(const NominalWindow& nom) {
  return (2 * nom.wt - 1) * (2 * nom.wh - 1) * (2 * nom.ww - 1);
}

// Shift region of window-frame position j on one axis: Video Swin's slices (0, P-w), (P-w, P-s), (P-s, P) of the
// padded extent P; a single region when the axis is not shifted.
FK_HOST_DEVICE int64_t axis_region(int64_t j, int64_t window, int64_t shift, int64_t padded) {
  return shift == 0 ? 0 : (j >= padded - window) + (j >= padded - shift);
}

// Region id (0..26) of in-window token n of window win (0 <= win < nT * nH * nW). Tokens of different regions of
// one window were not neighbours before the cyclic shift: their scores get the -100 mask.
FK_HOST_DEVICE int64_t token_region(const WindowGeometry& g, int64_t win, int64_t n) {
  const int64_t iw = win % g.nW, ih = (win / g.nW) % g.nH, it = win / (g.nW * g.nH);
  const int64_t q = n % g.ww, p = (n / g.ww) % g.wh, a = n / (g.ww * g.wh);
  return axis_region(it * g.wt + a, g.wt, g.st, g.nT * g.wt) * 9 +
         axis_region(ih * g.wh + p, g.wh, g.sh, g.nH * g.wh) * 3 + axis_region(iw * g.ww + q, g.ww, g.sw, g.nW * g.ww);
}

// Row of the bias table for query token ni and key token nj of the effective window: Video Swin's
// relative_position_index, (dt + Wt - 1) (2Wh - 1)(2Ww - 1) + (dh + Wh - 1)(2Ww - 1) + (dw + Ww - 1).
FK_HOST_DEVICE int64_t relative_bias_row(const WindowGeometry& g, const NominalWindow& nom, int64_t ni, int64_t nj) {
  const int64_t qi = ni % g.ww, pi = (ni / g.ww) % g.wh, ai = ni / (g.ww * g.wh);
  const int64_t qj = nj % g.ww, pj = (nj / g.ww) % g.wh, aj = nj / (g.ww * g.wh);
  return (ai - aj + nom.wt - 1) * ((2 * nom.wh - 1) * (2 * nom.ww - 1)) + (pi - pj + nom.wh - 1) * (2 * nom.ww - 1) +
         (qi - qj + nom.ww - 1);
}

}  // namespace florence

// Training-mode batch norm fused with the 2x2 max-pool after it, float32 NCHW-contiguous, one
// thread per call (task threads call it at once: the GIL is released). engine/fused_cpu.py builds
// and loads it; engine/batch_norm.py's batch_norm_pool node calls it.
//
// Forward, per channel: the batch mean and 1/sqrt(var + eps) (two passes, as torch, sums in
// double across planes), then y = (x - mean) * invstd * w + b for each 2x2 window, keeping the
// first maximum in scan order (a later element wins only when strictly greater, torch's rule),
// its value and its code: the offset from the window's top-left element, 0, 1, W or W + 1, as
// engine/max_pool.py (W < 255). Nothing full-size is written.
// Backward, given the gradient g of the pooled output: gy is g at each window's maximum and zero
// elsewhere, so gb = sum g and gw = sum g * xh over the pooled quarter (xh read at the maxima),
// and gx = w s (gy - gb / M - xh gw / M) is one pass over x plus the pooled terms.

#include <torch/extension.h>
#include <cmath>
#include <pybind11/pybind11.h>
static inline double lanes_sum(const float* p, int64_t n, float shift, bool square) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) { float d = p[i + l] - shift; acc[l] += square ? d * d : d; }
  double s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; i < n; ++i) { float d = p[i] - shift; s += square ? d * d : d; }
  return s;
}
std::vector<torch::Tensor> bn_pool_forward(torch::Tensor x, torch::Tensor w, torch::Tensor b, double eps) {
  pybind11::gil_scoped_release no_gil;  // task threads run it at once
  x = x.contiguous(); w = w.contiguous(); b = b.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t OH = H / 2, OW = W / 2;
  auto out = torch::empty({N, C, OH, OW}, x.options());
  auto codes = torch::empty({N, C, OH, OW}, x.options().dtype(torch::kUInt8));
  auto mean = torch::empty({C}, x.options()), invstd = torch::empty({C}, x.options());
  const float* xp = x.data_ptr<float>(); const float* wp = w.data_ptr<float>(); const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>(); uint8_t* cp = codes.data_ptr<uint8_t>();
  for (int64_t c = 0; c < C; ++c) {
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += lanes_sum(xp + (n * C + c) * HW, HW, 0.f, false);
    const float m = (float)(s / (N * HW));
    double v = 0;
    for (int64_t n = 0; n < N; ++n) v += lanes_sum(xp + (n * C + c) * HW, HW, m, true);
    const float is = (float)(1.0 / std::sqrt(v / (N * HW) + eps));
    mean.data_ptr<float>()[c] = m; invstd.data_ptr<float>()[c] = is;
    const float scale = wp[c] * is, shift = bp[c];  // (x - mean) first, as torch: no cancellation
    for (int64_t n = 0; n < N; ++n) {
      const float* p = xp + (n * C + c) * HW;
      float* o = op + (n * C + c) * OH * OW; uint8_t* k = cp + (n * C + c) * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const float* r0 = p + 2 * oh * W; const float* r1 = r0 + W;
        for (int64_t ow = 0; ow < OW; ++ow) {
          float y0 = (r0[2*ow] - m) * scale + shift, y1 = (r0[2*ow+1] - m) * scale + shift;
          float y2 = (r1[2*ow] - m) * scale + shift, y3 = (r1[2*ow+1] - m) * scale + shift;
          float mx = y0; uint8_t code = 0;
          if (y1 > mx) { mx = y1; code = 1; }
          if (y2 > mx) { mx = y2; code = (uint8_t)W; }
          if (y3 > mx) { mx = y3; code = (uint8_t)(W + 1); }
          o[oh * OW + ow] = mx; k[oh * OW + ow] = code;
        }
      }
    }
  }
  return {out, mean, invstd, codes};
}
std::vector<torch::Tensor> bn_pool_backward(torch::Tensor g, torch::Tensor x, torch::Tensor w, torch::Tensor mean, torch::Tensor invstd, torch::Tensor codes) {
  pybind11::gil_scoped_release no_gil;
  g = g.contiguous(); x = x.contiguous(); w = w.contiguous(); mean = mean.contiguous();
  invstd = invstd.contiguous(); codes = codes.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t OH = H / 2, OW = W / 2, OHW = OH * OW, M = N * HW;
  auto gx = torch::empty_like(x);
  auto gw = torch::empty({C}, x.options()), gb = torch::empty({C}, x.options());
  const float* xp = x.data_ptr<float>(); const float* gp = g.data_ptr<float>(); const uint8_t* cp = codes.data_ptr<uint8_t>();
  float* gxp = gx.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float m = mean.data_ptr<float>()[c], s = invstd.data_ptr<float>()[c], wc = w.data_ptr<float>()[c];
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < N; ++n) {
      const float* p = xp + (n * C + c) * HW; const float* gg = gp + (n * C + c) * OHW; const uint8_t* k = cp + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh) for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t j = oh * OW + ow; const float gv = gg[j];
        sg += gv; sgx += gv * (p[2 * oh * W + 2 * ow + k[j]] - m);
      }
    }
    const float gbc = (float)sg, gwc = (float)(sgx * s);
    gb.data_ptr<float>()[c] = gbc; gw.data_ptr<float>()[c] = gwc;
    const float ws = wc * s, k1 = -ws * s * gwc / M, k0 = -ws * gbc / M;
    for (int64_t n = 0; n < N; ++n) {
      const float* p = xp + (n * C + c) * HW; float* q = gxp + (n * C + c) * HW;
      for (int64_t i = 0; i < HW; ++i) q[i] = (p[i] - m) * k1 + k0;
      const float* gg = gp + (n * C + c) * OHW; const uint8_t* k = cp + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh) for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t j = oh * OW + ow;
        q[2 * oh * W + 2 * ow + k[j]] += ws * gg[j];
      }
    }
  }
  return {gx, gw, gb};
}

/* Training-mode batch norm fused with the 2x2 max-pool after it, float32 NCHW-contiguous, one
   thread per call, over channels [c0, c1). Plain C on raw arrays: engine/fused_cpu.py compiles
   it (about a second), allocates the outputs and calls it through ctypes, which releases the
   GIL, so task threads call it at once and one call's channels can be split across threads;
   engine/batch_norm.py's batch_norm_pool node uses it.

   Forward, per channel: the batch mean and 1/sqrt(var + eps) (two passes, as torch, sums in
   double across planes), then y = (x - mean) * invstd * w + b for each 2x2 window, keeping the
   first maximum in scan order (a later element wins only when strictly greater, torch's rule),
   its value and its code: the offset from the window's top-left element, 0, 1, W or W + 1, as
   engine/max_pool.py (W < 255). Nothing full-size is written.
   Backward, given the gradient g of the pooled output: gy is g at each window's maximum and zero
   elsewhere, so gb = sum g and gw = sum g * xh over the pooled quarter (xh read at the maxima),
   and gx = w s (gy - gb / M - xh gw / M) is one pass over x plus the pooled terms.
   Second derivative of that backward (second-order MAML), given the gradients ggx (full size),
   ggw and ggb (per channel, NULL for none) of (gx, gw, gb): engine/batch_norm.py's closed form
   (its docstring names A-E and a, b, c, d0), in two passes over x and ggx, the first for the
   sums C, D and E (E = <ggx gy>, read at the maxima), the second writing d_x and, at each
   window's maximum, d_gy (the gradient for g, pooled) and d_x's gy term. */

#include <math.h>
#include <stdint.h>

static double lanes_sum(const float* p, int64_t n, float shift, int square) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) {
      float d = p[i + l] - shift;
      acc[l] += square ? d * d : d;
    }
  double s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; i < n; ++i) {
    float d = p[i] - shift;
    s += square ? d * d : d;
  }
  return s;
}

void bn_pool_forward(const float* x, const float* w, const float* b, int64_t N, int64_t C,
                     int64_t H, int64_t W, double eps, float* out, uint8_t* codes, float* mean,
                     float* invstd, int64_t c0, int64_t c1) {
  const int64_t HW = H * W, OH = H / 2, OW = W / 2;
  for (int64_t c = c0; c < c1; ++c) {
    double s = 0, v = 0;
    for (int64_t n = 0; n < N; ++n) s += lanes_sum(x + (n * C + c) * HW, HW, 0.f, 0);
    const float m = (float)(s / (N * HW));
    for (int64_t n = 0; n < N; ++n) v += lanes_sum(x + (n * C + c) * HW, HW, m, 1);
    const float is = (float)(1.0 / sqrt(v / (N * HW) + eps));
    mean[c] = m;
    invstd[c] = is;
    const float scale = w[c] * is, shift = b[c];  /* (x - mean) first, as torch */
    for (int64_t n = 0; n < N; ++n) {
      const float* p = x + (n * C + c) * HW;
      float* o = out + (n * C + c) * OH * OW;
      uint8_t* k = codes + (n * C + c) * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const float* r0 = p + 2 * oh * W;
        const float* r1 = r0 + W;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const float y0 = (r0[2 * ow] - m) * scale + shift;
          const float y1 = (r0[2 * ow + 1] - m) * scale + shift;
          const float y2 = (r1[2 * ow] - m) * scale + shift;
          const float y3 = (r1[2 * ow + 1] - m) * scale + shift;
          float mx = y0;
          uint8_t code = 0;
          if (y1 > mx) { mx = y1; code = 1; }
          if (y2 > mx) { mx = y2; code = (uint8_t)W; }
          if (y3 > mx) { mx = y3; code = (uint8_t)(W + 1); }
          o[oh * OW + ow] = mx;
          k[oh * OW + ow] = code;
        }
      }
    }
  }
}

void bn_pool_backward(const float* g, const float* x, const float* w, const float* mean,
                      const float* invstd, const uint8_t* codes, int64_t N, int64_t C,
                      int64_t H, int64_t W, float* gx, float* gw, float* gb, int64_t c0,
                      int64_t c1) {
  const int64_t HW = H * W, OH = H / 2, OW = W / 2, OHW = OH * OW, M = N * HW;
  for (int64_t c = c0; c < c1; ++c) {
    const float m = mean[c], s = invstd[c];
    double sg = 0, sgx = 0;
    for (int64_t n = 0; n < N; ++n) {
      const float* p = x + (n * C + c) * HW;
      const float* gg = g + (n * C + c) * OHW;
      const uint8_t* k = codes + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t j = oh * OW + ow;
          sg += gg[j];
          sgx += gg[j] * (p[2 * oh * W + 2 * ow + k[j]] - m);
        }
    }
    const float gbc = (float)sg, gwc = (float)(sgx * s);
    gb[c] = gbc;
    gw[c] = gwc;
    const float ws = w[c] * s, k1 = -ws * s * gwc / M, k0 = -ws * gbc / M;
    for (int64_t n = 0; n < N; ++n) {
      const float* p = x + (n * C + c) * HW;
      float* q = gx + (n * C + c) * HW;
      for (int64_t i = 0; i < HW; ++i) q[i] = (p[i] - m) * k1 + k0;
      const float* gg = g + (n * C + c) * OHW;
      const uint8_t* k = codes + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t j = oh * OW + ow;
          q[2 * oh * W + 2 * ow + k[j]] += ws * gg[j];
        }
    }
  }
}

/* sum q and sum q (p - shift) over n elements, float lanes added in double, as lanes_sum */
static void lanes_sum2(const float* p, const float* q, int64_t n, float shift, double* sq,
                       double* sqp) {
  float a[16] = {0}, b[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) {
      a[l] += q[i + l];
      b[l] += q[i + l] * (p[i + l] - shift);
    }
  double s = 0, t = 0;
  for (int l = 0; l < 16; ++l) {
    s += a[l];
    t += b[l];
  }
  for (; i < n; ++i) {
    s += q[i];
    t += q[i] * (p[i] - shift);
  }
  *sq += s;
  *sqp += t;
}

void bn_pool_backward2(const float* g, const float* x, const float* w, const float* mean,
                       const float* invstd, const uint8_t* codes, const float* gw,
                       const float* gb, const float* ggx, const float* ggw, const float* ggb,
                       int64_t N, int64_t C, int64_t H, int64_t W, float* d_g, float* d_x,
                       float* d_w, int64_t c0, int64_t c1) {
  const int64_t HW = H * W, OH = H / 2, OW = W / 2, OHW = OH * OW, M = N * HW;
  for (int64_t c = c0; c < c1; ++c) {
    const float m = mean[c];
    const double s = invstd[c], wc = w[c];
    double sc = 0, sd = 0, se = 0;
    for (int64_t n = 0; n < N; ++n) {
      const float* q = ggx + (n * C + c) * HW;
      lanes_sum2(x + (n * C + c) * HW, q, HW, m, &sc, &sd);
      const float* gg = g + (n * C + c) * OHW;
      const uint8_t* k = codes + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t j = oh * OW + ow;
          se += gg[j] * q[2 * oh * W + 2 * ow + k[j]];
        }
    }
    const double A = gb[c] / M, B = gw[c] / M, Cm = sc / M, D = sd * s / M, E = se / M;
    const double ws2 = wc * s * s, gws = ggw ? ggw[c] * s : 0.0, gbc = ggb ? ggb[c] : 0.0;
    d_w[c] = (float)(M * s * (E - A * Cm - B * D));
    /* d_x = a xh + b gy + c ggx + d0, with xh = (x - m) s */
    const float a = (float)((-ws2 * (E - A * Cm - 3 * B * D) - gws * B) * s);
    const float b = (float)(-ws2 * D + gws), cc = (float)(-ws2 * B);
    const float d0 = (float)(ws2 * (A * D + B * Cm) - gws * A);
    /* d_gy = w s (ggx - C - xh D) + ggw xh + ggb, read at the maxima */
    const float gq = (float)(wc * s), gp = (float)(gws - wc * s * s * D);
    const float g0 = (float)(gbc - wc * s * Cm);
    for (int64_t n = 0; n < N; ++n) {
      const float* p = x + (n * C + c) * HW;
      const float* q = ggx + (n * C + c) * HW;
      float* r = d_x + (n * C + c) * HW;
      for (int64_t i = 0; i < HW; ++i) r[i] = (p[i] - m) * a + q[i] * cc + d0;
      const float* gg = g + (n * C + c) * OHW;
      const uint8_t* k = codes + (n * C + c) * OHW;
      float* o = d_g + (n * C + c) * OHW;
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t j = oh * OW + ow, at = 2 * oh * W + 2 * ow + k[j];
          r[at] += b * gg[j];
          o[j] = q[at] * gq + (p[at] - m) * gp + g0;
        }
    }
  }
}

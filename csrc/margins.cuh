// Margin functions psi(c, a) of every loss family and their first derivatives, as
// torch-free __host__ __device__ float functions.
//
// This file mirrors magloss/margins.py line by line (that module is the contract; keep
// the two in step). Everything is float32: the CUDA engine runs all margin, softmax and
// reduction math in fp32 whatever the input dtype (docs/math.md §1).
//
// Families (MarginParams::kind, the same integers as magloss.margins):
//   0 COMBINED  psi = cos(m1*theta + m2) - m3   (m1 == 1 uses the acos-free closed form)
//   1 MAGFACE   psi = cos(theta + m(a))          (m2 := m(a), m3 := 0)
//   2 MAGCOS    psi = c - m(a)
//   3 SPHERE    psi = (lam*c + (-1)^k T_m(c) - 2k) / (1 + lam), theta in [k*pi/m, (k+1)*pi/m]
// Boundary policies (MarginParams::boundary, the same integers as magloss.margins):
//   0 THRESHOLD (COMBINED/MAGFACE, default): theta >= theta_t = (pi - m2)/m1 falls back to c - m3 - mm
//   1 EASY      (COMBINED/MAGFACE): the margin only where c > 0 (and theta < theta_t); elsewhere psi = c
//   2 CLIP      (COMBINED only; AdaFace): psi = cos(clamp(m1*acos(clamp(c, -1+eps, 1-eps)) + m2, eps, pi-eps)) - m3,
//               eps = CLIP_EPS; dpsi/dc = 0 where either clamp is active (autograd of the upstream formula)
//   3 NONE      (COMBINED only; ElasticFace): psi = cos(m1*theta + m2) - m3 on all of [0, pi], no fallback
// Per-row margins (row_margins) replace m2, m3 of COMBINED row by row: the row stage hands
// margin_terms a copy of the parameters with that row's m2_i, m3_i.
// Numerics: c is clamped to [-1, 1]; sin(theta) = sqrt(max(1 - c^2, 0)) in values and
// sqrt(max(1 - c^2, SIN_EPS)) where it divides; straight_through sets dpsi/dc := 1.
// NaN in, NaN out: every max, min and clamp here keeps a NaN operand (maximum/minimum, as
// torch.maximum/torch.clamp; fmaxf/fminf would return the other operand), and every branch
// chosen by a comparison sends a NaN to the formula, never to a constant branch, so psi and
// its derivatives are NaN when c (or a, where it is used) is NaN. The only constants kept
// are those of the definition: straight_through's dpsi/dc = 1, MAGCOS's dpsi/dc = 1, and
// dpsi/da = 0 of the families without a magnitude term.
//
// No torch, no CUDA runtime calls: compiles with nvcc alone and, on the host, with any
// C++17 compiler (tests/cpp/test_margins.cpp).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MAGLOSS_HD __host__ __device__ __forceinline__
#else
#define MAGLOSS_HD inline
#endif

namespace magloss {

enum MarginKind : int { COMBINED = 0, MAGFACE = 1, MAGCOS = 2, SPHERE = 3 };
enum Boundary : int { THRESHOLD = 0, EASY = 1, CLIP = 2, NONE = 3 };

/// Lower bound of 1 - c^2 wherever sin(theta) divides (margins.SIN_EPS).
constexpr float SIN_EPS = 1e-12f;
/// Lower bound of ||x_i|| and ||w_j|| when normalizing (margins.NORM_EPS, as F.normalize).
constexpr float NORM_EPS = 1e-12f;
/// pi rounded to float.
constexpr float PI_F = 3.14159265358979323846f;
/// The CLIP policy's clamp margin of the cosine and of the margined angle (margins.CLIP_EPS, AdaFace's eps).
constexpr float CLIP_EPS = 1e-3f;

/// The op's hyperparameters, as MarginSpec.op_args() (kind, scale, m1, m2, m3, l_a, u_a,
/// l_m, u_m, boundary, straight_through). scale == 0 with kind SPHERE means "scale the
/// logits of row i by a_i = ||x_i||" (original SphereFace).
struct MarginParams {
  int kind;
  float scale;
  float m1, m2, m3;
  float l_a, u_a, l_m, u_m;
  int boundary;  // Boundary
  bool straight_through;
};

/// psi and its derivatives for one row.
struct MarginTerms {
  float psi;   // psi(c, a)
  float dc;    // dpsi/dc (1 when straight_through)
  float da;    // dpsi/da
};

/// max(a, b) that keeps a NaN operand (torch.maximum); fmaxf(NaN, b) would be b.
MAGLOSS_HD float maximum(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }
/// min(a, b) that keeps a NaN operand (torch.minimum).
MAGLOSS_HD float minimum(float a, float b) { return (a != a || b != b) ? a + b : fminf(a, b); }
/// clamp(v, lo, hi) that keeps a NaN v (torch.clamp).
MAGLOSS_HD float clampf_(float v, float lo, float hi) { return minimum(maximum(v, lo), hi); }

/// MagFace's magnitude margin m(a) = l_m + k*(clamp(a, l_a, u_a) - l_a), k = (u_m-l_m)/(u_a-l_a);
/// *dm = dm/da = k inside [l_a, u_a], 0 outside (the clamp's gradient, as upstream); NaN for a NaN a.
MAGLOSS_HD float magnitude_margin(float a, float l_a, float u_a, float l_m, float u_m, float* dm) {
  const float k = (u_m - l_m) / (u_a - l_a);
  const float a_c = clampf_(a, l_a, u_a);
  const bool outside = (a < l_a) || (a > u_a);
  *dm = outside ? 0.0f : k + 0.0f * a;  // 0 * a: 0, or NaN for a NaN a
  return l_m + k * (a_c - l_a);
}

/// MagFace's regularizer g(a~) = a~/u_a^2 + 1/a~, a~ = clamp(a, l_a, u_a);
/// *dg = dg/da = 1/u_a^2 - 1/a~^2 inside [l_a, u_a], 0 outside; NaN for a NaN a.
MAGLOSS_HD float regularizer(float a, float l_a, float u_a, float* dg) {
  const float a_c = clampf_(a, l_a, u_a);
  const bool outside = (a < l_a) || (a > u_a);
  *dg = outside ? 0.0f : (1.0f / (u_a * u_a) - 1.0f / (a_c * a_c));
  return a_c / (u_a * u_a) + 1.0f / a_c;
}

/// The margin formula psi = cos(m1*theta + m2) - m3 on its own (no boundary policy), for a c
/// already clamped to [-1, 1]: *dc = dpsi/dc (sin(theta) bounded below by sqrt(SIN_EPS) where it
/// divides), *sin_body = sin(m1*theta + m2) (dpsi/dm2 = -sin_body). m1 == 1 uses the acos-free
/// closed form.
MAGLOSS_HD float margin_formula(float c, float m1, float m2, float m3, float* dc, float* sin_body_out) {
  const float one_minus_c2 = 1.0f - c * c;
  const float sin_t = sqrtf(maximum(one_minus_c2, 0.0f));
  const float sin_div = sqrtf(maximum(one_minus_c2, SIN_EPS));
  float body, sin_body;
  if (m1 == 1.0f) {
    const float cos_m2 = cosf(m2), sin_m2 = sinf(m2);
    body = c * cos_m2 - sin_t * sin_m2;      // cos(theta + m2)
    sin_body = sin_t * cos_m2 + c * sin_m2;  // sin(theta + m2)
  } else {
    const float arg = m1 * acosf(c) + m2;
    body = cosf(arg);
    sin_body = sinf(arg);
  }
  *dc = m1 * sin_body / sin_div;
  *sin_body_out = sin_body;
  return body - m3;
}

/// psi = cos(m1*theta + m2) - m3 with the THRESHOLD or EASY boundary policy (margins._combined_terms).
/// c must already be clamped to [-1, 1]. Returns psi; *dc = dpsi/dc, *dm2 = dpsi/dm2
/// (used by MagFace's chain dpsi/da = dpsi/dm2 * dm/da).
MAGLOSS_HD float combined_terms(float c, float m1, float m2, float m3, bool easy, float* dc, float* dm2) {
  float dc_m, sin_body;
  const float psi_m = margin_formula(c, m1, m2, m3, &dc_m, &sin_body);
  const float dm2_m = -sin_body;

  // theta_t = (pi - m2)/m1 <= pi (MarginSpec validation); the margin branch is theta < theta_t.
  const float theta_t = (PI_F - m2) / m1;
  const float cos_t = cosf(theta_t), sin_tt = sinf(theta_t);
  const bool in_margin = !(c <= cos_t);  // a NaN c takes the margin branch (its formula keeps the NaN)
  if (easy) {
    const bool keep = in_margin && !(c <= 0.0f);
    *dc = keep ? dc_m : 1.0f;
    *dm2 = keep ? dm2_m : 0.0f;
    return keep ? psi_m : c;
  }
  const float a_term = (PI_F - theta_t) * sin_tt;
  const float b_term = 1.0f + cos_t;
  const bool use_a = a_term >= b_term;
  const float mm = use_a ? a_term : b_term;
  const float dmm_dtheta = use_a ? (-sin_tt + (PI_F - theta_t) * cos_t) : -sin_tt;
  const float dmm_dm2 = -dmm_dtheta / m1;
  *dc = in_margin ? dc_m : 1.0f;
  *dm2 = in_margin ? dm2_m : -dmm_dm2;
  return in_margin ? psi_m : (c - m3 - mm);
}

/// The CLIP policy (AdaFace upstream): theta = acos(clamp(c, -1+eps, 1-eps)),
/// psi = cos(clamp(m1*theta + m2, eps, pi-eps)) - m3, eps = CLIP_EPS. dpsi/dc is the derivative
/// of that formula: 0 where either clamp is active (as autograd of the clamps), else
/// m1*sin(m1*theta + m2)/sin(theta) (sin(theta) >= sqrt(2*eps - eps^2) here, no SIN_EPS needed).
/// A NaN c reaches the formula (no clamp is "active" for NaN) and gives NaN.
MAGLOSS_HD float clip_terms(float c, float m1, float m2, float m3, float* dc) {
  const float lo = -1.0f + CLIP_EPS, hi = 1.0f - CLIP_EPS;
  const bool c_clamped = (c < lo) || (c > hi);
  const float cc = clampf_(c, lo, hi);
  const float arg = m1 * acosf(cc) + m2;
  const bool arg_clamped = (arg < CLIP_EPS) || (arg > PI_F - CLIP_EPS);
  const float argc = clampf_(arg, CLIP_EPS, PI_F - CLIP_EPS);
  const float sin_c = sqrtf(1.0f - cc * cc);
  *dc = (c_clamped || arg_clamped) ? 0.0f : m1 * sinf(argc) / sin_c;
  return cosf(argc) - m3;
}

/// psi = cos(m1*theta + m2) - m3 for the COMBINED family with any boundary policy.
MAGLOSS_HD float combined_policy_terms(float c, float m1, float m2, float m3, int boundary, float* dc) {
  if (boundary == CLIP) return clip_terms(c, m1, m2, m3, dc);
  if (boundary == NONE) {
    float sin_body;
    return margin_formula(c, m1, m2, m3, dc, &sin_body);
  }
  float dm2;
  return combined_terms(c, m1, m2, m3, boundary == EASY, dc, &dm2);
}

/// Chebyshev T_m(c) = cos(m*acos c) and its derivative m*U_{m-1}(c), by recurrence.
MAGLOSS_HD float chebyshev(float c, int m, float* dt) {
  if (m <= 0) {
    *dt = 0.0f;
    return 1.0f;
  }
  float t_prev = 1.0f, t = c;     // T_0, T_1
  float u_prev = 0.0f, u = 1.0f;  // U_{-1}, U_0
  for (int i = 0; i < m - 1; ++i) {
    const float t_next = 2.0f * c * t - t_prev;
    const float u_next = 2.0f * c * u - u_prev;
    t_prev = t; t = t_next;
    u_prev = u; u = u_next;
  }
  *dt = static_cast<float>(m) * u;
  return t;
}

/// psi(c, a), dpsi/dc, dpsi/da for one label cosine (margins.margin_terms).
/// c: the label cosine (clamped here), a: ||x_i||, lam: SphereFace's annealing weight
/// (ignored by the other families).
MAGLOSS_HD MarginTerms margin_terms(float c, float a, const MarginParams& p, float lam) {
  c = clampf_(c, -1.0f, 1.0f);
  MarginTerms out;
  out.da = 0.0f;
  if (p.kind == COMBINED) {
    out.psi = combined_policy_terms(c, p.m1, p.m2, p.m3, p.boundary, &out.dc);
  } else if (p.kind == MAGFACE) {
    float dm, dm2;
    const float m = magnitude_margin(a, p.l_a, p.u_a, p.l_m, p.u_m, &dm);
    out.psi = combined_terms(c, 1.0f, m, 0.0f, p.boundary == EASY, &out.dc, &dm2);
    out.da = dm2 * dm;
  } else if (p.kind == MAGCOS) {
    float dm;
    const float m = magnitude_margin(a, p.l_a, p.u_a, p.l_m, p.u_m, &dm);
    out.psi = c - m;
    out.dc = 1.0f;
    out.da = -dm;
  } else {  // SPHERE
    const int mi = static_cast<int>(p.m1);
    float dt;
    const float t = chebyshev(c, mi, &dt);
    float k = floorf(static_cast<float>(mi) * acosf(c) / PI_F);
    k = clampf_(k, 0.0f, static_cast<float>(mi > 1 ? mi - 1 : 0));
    const float sign = 1.0f - 2.0f * fmodf(k, 2.0f);  // (-1)^k for k >= 0; NaN for a NaN k (no int cast)
    out.psi = (lam * c + sign * t - 2.0f * k) / (1.0f + lam);
    out.dc = (lam + sign * dt) / (1.0f + lam);
  }
  if (p.straight_through) out.dc = 1.0f;
  return out;
}

/// CurricularFace's modulation of a cosine c that is not the row's label cosine (hard-example
/// weighting): f = c*(t + c) where c > tau, else c; the logit is scale_i * f. *df = df/dc
/// (t + 2c, or 1). A NaN c is not > tau and stays NaN; tau = +inf leaves every c unchanged.
MAGLOSS_HD float curricular(float c, float tau, float t, float* df) {
  if (c > tau) {
    *df = t + 2.0f * c;
    return c * (t + c);
  }
  *df = 1.0f;
  return c;
}

/// Whether `cand` replaces `best` in a running maximum that keeps the first NaN and, among
/// equal values, the first (lowest index) candidate: the sub-center rule of torch.max(dim).
MAGLOSS_HD bool replaces_max(float cand, float best) { return !(best != best) && (cand > best || cand != cand); }

/// True when row i's logits are scaled by a_i instead of s (original SphereFace).
MAGLOSS_HD bool scale_by_norm(const MarginParams& p) { return p.kind == SPHERE && p.scale == 0.0f; }
/// True for MagFace and Mag-CosFace, whose loss adds lambda_g * g(a).
MAGLOSS_HD bool has_regularizer(const MarginParams& p) { return p.kind == MAGFACE || p.kind == MAGCOS; }

}  // namespace magloss

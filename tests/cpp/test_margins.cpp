// Host test of the __host__ __device__ margin functions in csrc/margins.cuh: each family is
// evaluated at hand-chosen angles and compared with closed-form values worked out by hand
// (comments give the arithmetic). Built and run by CMakeLists.txt / ctest; no GPU, no torch.
#include <cmath>
#include <cstdio>

#include "margins.cuh"

namespace {

int g_failures = 0;
int g_checks = 0;

void expect_true(const char* what, bool ok) {
  ++g_checks;
  std::printf("%s %s\n", ok ? "  ok  " : "FAIL  ", what);
  if (!ok) ++g_failures;
}

void expect_near(const char* what, double got, double want, double tol = 2e-5) {
  ++g_checks;
  const double err = std::fabs(got - want);
  const bool ok = err <= tol * (1.0 + std::fabs(want));
  std::printf("%s %-58s got % .7f want % .7f\n", ok ? "  ok  " : "FAIL  ", what, got, want);
  if (!ok) ++g_failures;
}

constexpr double kPi = 3.14159265358979323846;

magloss::MarginParams combined(float s, float m1, float m2, float m3, int boundary = magloss::THRESHOLD,
                               bool st = false) {
  magloss::MarginParams p{};
  p.kind = magloss::COMBINED;
  p.scale = s;
  p.m1 = m1;
  p.m2 = m2;
  p.m3 = m3;
  p.boundary = boundary;
  p.straight_through = st;
  return p;
}

magloss::MarginParams magnitude(int kind, float l_m, float u_m, bool easy) {
  magloss::MarginParams p{};
  p.kind = kind;
  p.scale = 64.0f;
  p.m1 = 1.0f;
  p.l_a = 10.0f;
  p.u_a = 110.0f;
  p.l_m = l_m;
  p.u_m = u_m;
  p.boundary = easy ? magloss::EASY : magloss::THRESHOLD;
  return p;
}

magloss::MarginParams sphere(int m) {
  magloss::MarginParams p{};
  p.kind = magloss::SPHERE;
  p.scale = 0.0f;
  p.m1 = static_cast<float>(m);
  return p;
}

}  // namespace

int main() {
  using magloss::margin_terms;
  const float a = 30.0f;  // magnitude, unused by the fixed-margin families

  // ArcFace m = 0.5 at theta = pi/3 (c = 0.5): psi = cos(pi/3 + 0.5), dpsi/dc = sin(theta + m)/sin(theta).
  {
    const double th = kPi / 3, m = 0.5;
    const auto t = margin_terms(0.5f, a, combined(64, 1, 0.5f, 0), 0.0f);
    expect_near("arcface psi(theta=pi/3) = cos(pi/3+0.5)", t.psi, std::cos(th + m));
    expect_near("arcface dpsi/dc = sin(theta+m)/sin(theta)", t.dc, std::sin(th + m) / std::sin(th));
    expect_near("arcface dpsi/da = 0", t.da, 0.0);
  }
  // Threshold branch: theta = 3.0 > pi - 0.5. theta_t = pi - m, (pi - theta_t) sin(theta_t) = m sin m
  // = 0.2397 > 1 + cos(theta_t) = 1 - cos(0.5) = 0.1224, so psi = cos(3) - m sin m, dpsi/dc = 1.
  {
    const double th = 3.0, m = 0.5;
    const auto t = margin_terms(static_cast<float>(std::cos(th)), a, combined(64, 1, 0.5f, 0), 0.0f);
    expect_near("arcface threshold psi(theta=3) = cos 3 - m sin m", t.psi, std::cos(th) - m * std::sin(m));
    expect_near("arcface threshold dpsi/dc = 1", t.dc, 1.0);
  }
  // Easy margin: no margin where c <= 0 (theta = 2.0, c = cos 2 < 0); margin where c > 0.
  {
    const auto t = margin_terms(static_cast<float>(std::cos(2.0)), a, combined(64, 1, 0.5f, 0, magloss::EASY), 0.0f);
    expect_near("arcface easy psi(theta=2) = c", t.psi, std::cos(2.0));
    expect_near("arcface easy dpsi/dc = 1", t.dc, 1.0);
    const auto u = margin_terms(0.5f, a, combined(64, 1, 0.5f, 0, magloss::EASY), 0.0f);
    expect_near("arcface easy psi(theta=pi/3) = cos(pi/3+0.5)", u.psi, std::cos(kPi / 3 + 0.5));
  }
  // CosFace m = 0.35: psi = c - 0.35, dpsi/dc = 1 (m2 = 0 never reaches the threshold: theta_t = pi).
  {
    const auto t = margin_terms(0.3f, a, combined(64, 1, 0, 0.35f), 0.0f);
    expect_near("cosface psi = c - m", t.psi, 0.3 - 0.35);
    expect_near("cosface dpsi/dc = 1", t.dc, 1.0);
  }
  // NormFace: psi = c, also at c = -1 (theta = pi = theta_t: threshold branch, mm = 1 + cos(pi) = 0).
  {
    const auto t = margin_terms(-1.0f, a, combined(64, 1, 0, 0), 0.0f);
    expect_near("normface psi(c=-1) = -1", t.psi, -1.0);
    const auto u = margin_terms(0.25f, a, combined(64, 1, 0, 0), 0.0f);
    expect_near("normface psi(c=0.25) = 0.25", u.psi, 0.25);
    expect_near("normface dpsi/dc = 1", u.dc, 1.0);
  }
  // Combined (0.9, 0.4, 0.15) at theta = 1: psi = cos(0.9 + 0.4) - 0.15, dpsi/dc = 0.9 sin(1.3)/sin(1).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(1.0)), a, combined(64, 0.9f, 0.4f, 0.15f), 0.0f);
    expect_near("combined(0.9,0.4,0.15) psi(theta=1)", t.psi, std::cos(1.3) - 0.15);
    expect_near("combined(0.9,0.4,0.15) dpsi/dc", t.dc, 0.9 * std::sin(1.3) / std::sin(1.0));
  }
  // m1 = 2, m2 = 0: theta_t = pi/2, (pi - theta_t) sin(theta_t) = pi/2 > 1 + cos(pi/2) = 1, so the
  // generalized threshold mm = pi/2: psi(theta = 2) = cos 2 - pi/2.
  {
    const auto t = margin_terms(static_cast<float>(std::cos(2.0)), a, combined(64, 2, 0, 0), 0.0f);
    expect_near("combined(2,0,0) threshold psi(theta=2) = cos2 - pi/2", t.psi, std::cos(2.0) - kPi / 2);
    const auto u = margin_terms(static_cast<float>(std::cos(0.5)), a, combined(64, 2, 0, 0), 0.0f);
    expect_near("combined(2,0,0) psi(theta=0.5) = cos(1)", u.psi, std::cos(1.0));
  }
  // Clamp: c = 1.0000001 is treated as 1 (theta = 0): ArcFace psi = cos(0.5).
  {
    const auto t = margin_terms(1.0000001f, a, combined(64, 1, 0.5f, 0), 0.0f);
    expect_near("arcface psi(c=1+eps) = cos(0.5) (clamped)", t.psi, std::cos(0.5));
    expect_near("arcface dpsi/dc finite at c=1", std::isfinite(t.dc) ? 1.0 : 0.0, 1.0);
  }
  // Straight-through: dpsi/dc := 1, psi unchanged.
  {
    const auto t = margin_terms(0.5f, a, combined(64, 1, 0.5f, 0, magloss::THRESHOLD, true), 0.0f);
    expect_near("straight-through psi = cos(pi/3+0.5)", t.psi, std::cos(kPi / 3 + 0.5));
    expect_near("straight-through dpsi/dc = 1", t.dc, 1.0);
  }
  // SphereFace m = 4 at theta = pi/3, lambda = 0: k = floor(4/3) = 1,
  // psi = (-1)^1 cos(4 pi/3) - 2 = 0.5 - 2 = -1.5; dpsi/dc = -T_4'(0.5) = -4 U_3(0.5) = -4 (8/8 - 2) = 4.
  {
    const auto t = margin_terms(0.5f, a, sphere(4), 0.0f);
    expect_near("sphereface m=4 psi(theta=pi/3) = -1.5", t.psi, -1.5);
    expect_near("sphereface m=4 dpsi/dc(theta=pi/3) = 4", t.dc, 4.0);
    // lambda = 5: (5 c + psi0)/6 = (2.5 - 1.5)/6, dpsi/dc = (5 + 4)/6.
    const auto u = margin_terms(0.5f, a, sphere(4), 5.0f);
    expect_near("sphereface m=4 lambda=5 psi = (2.5-1.5)/6", u.psi, 1.0 / 6.0);
    expect_near("sphereface m=4 lambda=5 dpsi/dc = 9/6", u.dc, 9.0 / 6.0);
    // theta = 0.3 < pi/4: k = 0, psi = cos(1.2).
    const auto v = margin_terms(static_cast<float>(std::cos(0.3)), a, sphere(4), 0.0f);
    expect_near("sphereface m=4 psi(theta=0.3) = cos(1.2)", v.psi, std::cos(1.2));
    // c = -1 (theta = pi): k = 4 clamped to 3: psi = -cos(4 pi) - 6 = -7.
    const auto w = margin_terms(-1.0f, a, sphere(4), 0.0f);
    expect_near("sphereface m=4 psi(theta=pi) = -7", w.psi, -7.0);
    // m = 1: psi = c.
    const auto z = margin_terms(0.2f, a, sphere(1), 0.0f);
    expect_near("sphereface m=1 psi = c", z.psi, 0.2);
  }
  // MagFace (10, 110, 0.45, 0.8), a = 60: k = 0.35/100, m = 0.45 + 0.0035*50 = 0.625;
  // psi(theta = pi/3) = cos(pi/3 + 0.625), dpsi/da = -sin(pi/3 + 0.625) * k.
  {
    const double k = 0.35 / 100.0, m = 0.625, th = kPi / 3;
    const auto t = margin_terms(0.5f, 60.0f, magnitude(magloss::MAGFACE, 0.45f, 0.8f, true), 0.0f);
    expect_near("magface psi(a=60, theta=pi/3)", t.psi, std::cos(th + m));
    expect_near("magface dpsi/dc", t.dc, std::sin(th + m) / std::sin(th));
    expect_near("magface dpsi/da = -sin(theta+m) k", t.da, -std::sin(th + m) * k);
    // a = 5 < l_a: m = l_m = 0.45 and dm/da = 0.
    const auto u = margin_terms(0.5f, 5.0f, magnitude(magloss::MAGFACE, 0.45f, 0.8f, true), 0.0f);
    expect_near("magface psi(a=5) uses m = l_m", u.psi, std::cos(th + 0.45));
    expect_near("magface dpsi/da(a=5) = 0", u.da, 0.0);
    float dm = -1.0f;
    const float mm = magloss::magnitude_margin(150.0f, 10.0f, 110.0f, 0.45f, 0.8f, &dm);
    expect_near("magface m(a=150) = u_m", mm, 0.8);
    expect_near("magface dm/da(a=150) = 0", dm, 0.0);
  }
  // Mag-CosFace (10, 110, 0.35, 0.8), a = 60: m = 0.35 + 0.0045*50 = 0.575, psi = c - m, dpsi/da = -0.0045.
  {
    const auto t = margin_terms(0.4f, 60.0f, magnitude(magloss::MAGCOS, 0.35f, 0.8f, false), 0.0f);
    expect_near("magcos psi(a=60) = c - 0.575", t.psi, 0.4 - 0.575);
    expect_near("magcos dpsi/da = -0.0045", t.da, -0.0045);
    expect_near("magcos dpsi/dc = 1", t.dc, 1.0);
  }
  // Regularizer g(a) = a/u_a^2 + 1/a at a = 50, u_a = 110; dg/da = 1/u_a^2 - 1/a^2; 0 outside.
  {
    float dg = 0.0f;
    const float g = magloss::regularizer(50.0f, 10.0f, 110.0f, &dg);
    expect_near("regularizer g(50)", g, 50.0 / 12100.0 + 1.0 / 50.0);
    expect_near("regularizer g'(50)", dg, 1.0 / 12100.0 - 1.0 / 2500.0, 1e-4);
    const float g2 = magloss::regularizer(200.0f, 10.0f, 110.0f, &dg);
    expect_near("regularizer g(200) = g(110)", g2, 110.0 / 12100.0 + 1.0 / 110.0);
    expect_near("regularizer g'(200) = 0", dg, 0.0);
  }
  // ---- boundary policies CLIP (AdaFace) and NONE (ElasticFace), per-row margins, curricular, sub-center max ----
  // CLIP, AdaFace m = 0.4 at z = 0.5: m2 = -0.2, m3 = 0.4*0.5 + 0.4 = 0.6. theta = 1: the angle 0.8 is inside
  // [eps, pi - eps], so psi = cos(0.8) - 0.6, dpsi/dc = sin(0.8)/sin(1).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(1.0)), a, combined(64, 1, -0.2f, 0.6f, magloss::CLIP), 0.0f);
    expect_near("clip psi(theta=1, m2=-0.2, m3=0.6) = cos(0.8) - 0.6", t.psi, std::cos(0.8) - 0.6);
    expect_near("clip dpsi/dc = sin(0.8)/sin(1)", t.dc, std::sin(0.8) / std::sin(1.0));
  }
  // CLIP with m1 = 0.9, m2 = 0.4, m3 = 0.15 at theta = 1: angle 1.3, psi = cos(1.3) - 0.15, dpsi/dc = 0.9 sin(1.3)/sin(1).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(1.0)), a, combined(64, 0.9f, 0.4f, 0.15f, magloss::CLIP), 0.0f);
    expect_near("clip m1=0.9 psi(theta=1) = cos(1.3) - 0.15", t.psi, std::cos(1.3) - 0.15);
    expect_near("clip m1=0.9 dpsi/dc = 0.9 sin(1.3)/sin(1)", t.dc, 0.9 * std::sin(1.3) / std::sin(1.0));
  }
  // CLIP, the angle clamp active below: z = 1 (m2 = -0.4, m3 = 0.8) at theta = 0.3: angle -0.1 -> eps = 1e-3,
  // psi = cos(1e-3) - 0.8, dpsi/dc = 0 (the clamp's gradient).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(0.3)), a, combined(64, 1, -0.4f, 0.8f, magloss::CLIP), 0.0f);
    expect_near("clip angle -0.1 -> eps: psi = cos(1e-3) - 0.8", t.psi, std::cos(1e-3) - 0.8);
    expect_near("clip angle clamped below: dpsi/dc = 0", t.dc, 0.0);
  }
  // CLIP, the angle clamp active above: m2 = 0.5 at theta = 3: angle 3.5 -> pi - 1e-3, psi = cos(pi - 1e-3), dpsi/dc = 0.
  {
    const auto t = margin_terms(static_cast<float>(std::cos(3.0)), a, combined(64, 1, 0.5f, 0, magloss::CLIP), 0.0f);
    expect_near("clip angle 3.5 -> pi - eps: psi = cos(pi - 1e-3)", t.psi, std::cos(kPi - 1e-3));
    expect_near("clip angle clamped above: dpsi/dc = 0", t.dc, 0.0);
  }
  // CLIP, the cosine clamp active: c = 1 -> 0.999 (theta = acos 0.999 = 0.044725), m2 = 0.5:
  // psi = cos(acos(0.999) + 0.5), dpsi/dc = 0; c = -1 -> -0.999, m2 = -0.4: psi = cos(acos(-0.999) - 0.4), 0.
  {
    const auto t = margin_terms(1.0f, a, combined(64, 1, 0.5f, 0, magloss::CLIP), 0.0f);
    expect_near("clip c=1 -> 0.999: psi = cos(acos(0.999) + 0.5)", t.psi, std::cos(std::acos(0.999) + 0.5));
    expect_near("clip c=1 (cosine clamped): dpsi/dc = 0", t.dc, 0.0);
    const auto u = margin_terms(-1.0f, a, combined(64, 1, -0.4f, 0.0f, magloss::CLIP), 0.0f);
    expect_near("clip c=-1 -> -0.999: psi = cos(acos(-0.999) - 0.4)", u.psi, std::cos(std::acos(-0.999) - 0.4));
    expect_near("clip c=-1 (cosine clamped): dpsi/dc = 0", u.dc, 0.0);
  }
  // NONE (ElasticArcFace, m2 = 0.55): no fallback past pi. theta = 3: psi = cos(3.55) = -0.9182,
  // dpsi/dc = sin(3.55)/sin(3) < 0 (THRESHOLD would give c - m sin m, dpsi/dc = 1).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(3.0)), a, combined(64, 1, 0.55f, 0, magloss::NONE), 0.0f);
    expect_near("none psi(theta=3, m2=0.55) = cos(3.55)", t.psi, std::cos(3.55));
    expect_near("none dpsi/dc = sin(3.55)/sin(3)", t.dc, std::sin(3.55) / std::sin(3.0), 1e-4);
    const auto u = margin_terms(static_cast<float>(std::cos(1.0)), a, combined(64, 1, 0.55f, 0, magloss::NONE), 0.0f);
    expect_near("none psi(theta=1) = cos(1.55)", u.psi, std::cos(1.55));
    expect_near("none dpsi/dc(theta=1) = sin(1.55)/sin(1)", u.dc, std::sin(1.55) / std::sin(1.0));
  }
  // NONE with m1 = 0.9, m2 = 0.4, m3 = 0.15 at theta = 3: angle 3.1, psi = cos(3.1) - 0.15,
  // dpsi/dc = 0.9 sin(3.1)/sin(3); ElasticCosFace (m2 = 0, m3 = 0.37) at theta = 2.5: psi = c - 0.37, dpsi/dc = 1.
  {
    const auto t = margin_terms(static_cast<float>(std::cos(3.0)), a, combined(64, 0.9f, 0.4f, 0.15f, magloss::NONE), 0.0f);
    expect_near("none m1=0.9 psi(theta=3) = cos(3.1) - 0.15", t.psi, std::cos(3.1) - 0.15);
    expect_near("none m1=0.9 dpsi/dc = 0.9 sin(3.1)/sin(3)", t.dc, 0.9 * std::sin(3.1) / std::sin(3.0), 1e-4);
    const auto u = margin_terms(static_cast<float>(std::cos(2.5)), a, combined(64, 1, 0, 0.37f, magloss::NONE), 0.0f);
    expect_near("elastic cosface none psi(theta=2.5) = cos 2.5 - 0.37", u.psi, std::cos(2.5) - 0.37);
    expect_near("elastic cosface none dpsi/dc = 1", u.dc, 1.0);
  }
  // The per-row (m2_i, m3_i) of the THRESHOLD policy: m2_i = 0.3 at theta = 3 > theta_t = pi - 0.3, so
  // psi = c - m3_i - mm, mm = max(0.3 sin 0.3, 1 - cos 0.3) = 0.3 sin 0.3 (the row's own theta_t).
  {
    const auto t = margin_terms(static_cast<float>(std::cos(3.0)), a, combined(64, 1, 0.3f, 0.1f), 0.0f);
    expect_near("threshold with m2_i=0.3, m3_i=0.1: psi = cos 3 - 0.1 - 0.3 sin 0.3", t.psi,
                std::cos(3.0) - 0.1 - 0.3 * std::sin(0.3));
  }
  // Curricular modulation f(c) = c (t + c) above tau, else c; df/dc = t + 2c or 1.
  {
    float df = 0.0f;
    const float f = magloss::curricular(0.6f, 0.5f, 0.2f, &df);
    expect_near("curricular f(0.6; tau=0.5, t=0.2) = 0.6*0.8", f, 0.48);
    expect_near("curricular df/dc = t + 2c = 1.4", df, 1.4);
    const float g = magloss::curricular(0.4f, 0.5f, 0.2f, &df);
    expect_true("curricular below tau: f = c, df/dc = 1", g == 0.4f && df == 1.0f);
    const float h = magloss::curricular(0.5f, 0.5f, 0.2f, &df);
    expect_true("curricular at c == tau: not modulated (strict >)", h == 0.5f && df == 1.0f);
    const float k = magloss::curricular(0.99f, INFINITY, 0.7f, &df);
    expect_true("curricular tau = +inf (ignored row): f = c", k == 0.99f && df == 1.0f);
    const float n = magloss::curricular(-0.3f, -0.5f, -0.1f, &df);
    expect_near("curricular f(-0.3; tau=-0.5, t=-0.1) = -0.3*(-0.4)", n, 0.12);
    expect_near("curricular df/dc = -0.1 - 0.6", df, -0.7);
    expect_true("curricular f(NaN) is NaN", std::isnan(magloss::curricular(std::nanf(""), 0.5f, 0.2f, &df)));
  }
  // Sub-center running max: ties keep the first (lowest k), a NaN candidate wins and then stays.
  {
    const float nan = std::nanf("");
    expect_true("replaces_max: larger replaces", magloss::replaces_max(0.5f, 0.4f));
    expect_true("replaces_max: a tie keeps the lowest k", !magloss::replaces_max(0.4f, 0.4f));
    expect_true("replaces_max: smaller does not replace", !magloss::replaces_max(0.3f, 0.4f));
    expect_true("replaces_max: a NaN candidate replaces", magloss::replaces_max(nan, 0.4f));
    expect_true("replaces_max: nothing replaces a NaN", !magloss::replaces_max(0.9f, nan) && !magloss::replaces_max(nan, nan));
  }
  // NaN in, NaN out: a NaN cosine gives NaN psi and dpsi/dc in every family and boundary policy
  // (fmaxf/fminf would clamp it to -1, and a comparison would pick the constant branch); a NaN
  // magnitude gives NaN m(a), dm/da, g, dg/da and, for the magnitude families, NaN psi and
  // dpsi/da. Constants of the definitions stay: straight-through and MAGCOS dpsi/dc = 1.
  {
    const float nan = std::nanf("");
    const struct { const char* name; magloss::MarginParams p; float lam; } fams[] = {
        {"arcface", combined(64, 1, 0.5f, 0), 0.0f},
        {"arcface easy", combined(64, 1, 0.5f, 0, true), 0.0f},
        {"normface", combined(64, 1, 0, 0), 0.0f},
        {"cosface", combined(64, 1, 0, 0.35f), 0.0f},
        {"combined(0.9,0.4,0.15)", combined(64, 0.9f, 0.4f, 0.15f), 0.0f},
        {"combined(2,0,0)", combined(64, 2, 0, 0), 0.0f},
        {"adaface clip", combined(64, 1, -0.2f, 0.6f, magloss::CLIP), 0.0f},
        {"clip m1=0.9", combined(64, 0.9f, 0.4f, 0.15f, magloss::CLIP), 0.0f},
        {"elastic arcface none", combined(64, 1, 0.55f, 0, magloss::NONE), 0.0f},
        {"none m1=0.9", combined(64, 0.9f, 0.4f, 0.15f, magloss::NONE), 0.0f},
        {"sphereface m=4", sphere(4), 5.0f},
        {"sphereface m=1", sphere(1), 0.0f},
        {"magface easy", magnitude(magloss::MAGFACE, 0.45f, 0.8f, true), 0.0f},
        {"magface threshold", magnitude(magloss::MAGFACE, 0.45f, 0.8f, false), 0.0f},
        {"magcos", magnitude(magloss::MAGCOS, 0.35f, 0.8f, false), 0.0f},
    };
    char what[160];
    for (const auto& f : fams) {
      const auto t = margin_terms(nan, 60.0f, f.p, f.lam);
      const bool dc_const = f.p.kind == magloss::MAGCOS;
      std::snprintf(what, sizeof what, "%s: psi(c=NaN) is NaN", f.name);
      expect_true(what, std::isnan(t.psi));
      std::snprintf(what, sizeof what, "%s: dpsi/dc(c=NaN) is %s", f.name, dc_const ? "1" : "NaN");
      expect_true(what, dc_const ? t.dc == 1.0f : std::isnan(t.dc));
      auto st = f.p;
      st.straight_through = true;
      std::snprintf(what, sizeof what, "%s straight-through: psi(c=NaN) NaN, dpsi/dc = 1", f.name);
      const auto u = margin_terms(nan, 60.0f, st, f.lam);
      expect_true(what, std::isnan(u.psi) && u.dc == 1.0f);
      if (f.p.kind == magloss::MAGFACE || f.p.kind == magloss::MAGCOS) {
        const auto v = margin_terms(0.5f, nan, f.p, f.lam);
        std::snprintf(what, sizeof what, "%s: psi and dpsi/da at a=NaN are NaN", f.name);
        expect_true(what, std::isnan(v.psi) && std::isnan(v.da));
      }
    }
    float d = 0.0f;
    expect_true("magnitude_margin(a=NaN) and dm/da are NaN",
                std::isnan(magloss::magnitude_margin(nan, 10.0f, 110.0f, 0.45f, 0.8f, &d)) && std::isnan(d));
    expect_true("regularizer(a=NaN) and dg/da are NaN",
                std::isnan(magloss::regularizer(nan, 10.0f, 110.0f, &d)) && std::isnan(d));
    expect_true("maximum/minimum keep a NaN in either operand",
                std::isnan(magloss::maximum(nan, 1.0f)) && std::isnan(magloss::maximum(-1.0f, nan)) &&
                    std::isnan(magloss::minimum(nan, 1.0f)) && std::isnan(magloss::minimum(1.0f, nan)));
    expect_true("maximum/minimum of numbers as fmaxf/fminf",
                magloss::maximum(-2.0f, 3.0f) == 3.0f && magloss::minimum(-2.0f, 3.0f) == -2.0f &&
                    magloss::maximum(-INFINITY, 1e-12f) == 1e-12f);
    expect_true("clampf_(NaN, -1, 1) is NaN, clampf_(2, -1, 1) is 1",
                std::isnan(magloss::clampf_(nan, -1.0f, 1.0f)) && magloss::clampf_(2.0f, -1.0f, 1.0f) == 1.0f);
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

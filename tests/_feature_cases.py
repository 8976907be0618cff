"""Inputs exercising the engine's general features, shared by the reference and chunked-engine
tests: per-row margins (AdaFace's and ElasticFace's, with the CLIP/NONE boundaries and with
the classic ones), CurricularFace's non-label columns, K sub-centers, and combinations."""

import math

import torch

from conftest import make_inputs
from magloss.margins import CLIP, NONE, SPHERE, MarginSpec

# name -> (spec, kind of row margins or None, curricular columns?, K sub-centers)
FEATURES = {
    "adaface": (MarginSpec.combined(8, 1, 0, 0, boundary=CLIP), "adaface", False, 1),
    "elastic arc": (MarginSpec.combined(8, 1, 0, 0, boundary=NONE), "elastic_arc", False, 1),
    "elastic cos": (MarginSpec.combined(8, 1, 0, 0, boundary=NONE), "elastic_cos", False, 1),
    "threshold row margins": (MarginSpec.combined(8, 1, 0.5, 0), "elastic_arc", False, 1),
    "curricular": (MarginSpec.combined(8, 1, 0.5, 0), None, True, 1),
    "subcenter arcface": (MarginSpec.combined(8, 1, 0.5, 0), None, False, 3),
    "subcenter magface": (MarginSpec.magface(8.0), None, False, 2),
    "subcenter adaface curricular": (MarginSpec.combined(8, 1, 0, 0, boundary=CLIP), "adaface", True, 3),
    "sphere feature-norm curricular": (MarginSpec.sphere(3), None, True, 2),
}


def row_margins(kind, B, g, dtype=torch.float64):
    """[B, 2] per-row (m2_i, m3_i) as AdaFace (ẑ uniform in [−1, 1], m = 0.4) or ElasticFace
    (N(0.5, 0.05) angular / N(0.35, 0.05) additive) would pass them; None for kind None."""
    if kind is None:
        return None
    zero = torch.zeros(B, dtype=torch.float64)
    if kind == "adaface":
        zhat = torch.rand(B, generator=g, dtype=torch.float64) * 2 - 1
        rm = torch.stack([-0.4 * zhat, 0.4 * zhat + 0.4], 1)
    elif kind == "elastic_arc":
        rm = torch.stack([0.5 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64), zero], 1)
    else:
        rm = torch.stack([zero, 0.35 + 0.05 * torch.randn(B, generator=g, dtype=torch.float64)], 1)
    return rm.to(dtype).contiguous()


def feature_case(name, B, C, D, *, seed=0, dtype=torch.float64, ignored=(2,)):
    """float64-made inputs for FEATURES[name], cast to ``dtype``: x [B, D], w [K·C, D], labels
    in [0, C) (rows ``ignored`` set to −1), the spec with K sub-centers, SphereFace's λ, and
    the op's row_margins, neg_threshold (τ_i random in [−0.6, 0.6], +inf on the ignored rows,
    as CurricularFace's Python layer passes them), neg_t (0.35); extras in the compute dtype."""
    spec, rm_kind, curr, K = FEATURES[name]
    norm_range = (0.5, 3.0) if spec.scale_by_norm else (15.0, 60.0)
    x, w, y = make_inputs(B, C * K, D, norm_range=norm_range, ignored=[i for i in ignored if i < B], seed=seed)
    y = torch.where(y >= 0, y % C, y)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    spec = spec.with_subcenters(K)
    rm = row_margins(rm_kind, B, g, ct)
    lam = torch.tensor(2.0, dtype=ct) if spec.kind == SPHERE else None
    if curr:
        tau = torch.rand(B, generator=g, dtype=torch.float64) * 1.2 - 0.6
        tau[y < 0] = math.inf
        nt, t = tau.to(ct), torch.tensor(0.35, dtype=ct)
    else:
        nt = t = None
    return x.to(dtype), w.to(dtype), y, spec, lam, rm, nt, t

"""SphereFace's λ schedule: the counter advances before λ is computed, as face.evoLVe, the
SphereFace port and the Caffe layer do, and λ is computed in the compute dtype. Expected values:
face.evoLVe's forward re-implemented here in float64."""

import torch
import torch.nn.functional as F

import magloss
import magloss.functional as MF
from cases import make_inputs


class UpstreamSphereFace:
    """face.evoLVe's SphereFace forward, re-implemented in float64: the counter advances
    *before* λ is computed; piece index floor(m·θ/3.14159265) as the ports write it."""

    def __init__(self, weight, m=4):
        self.weight, self.m, self.iter = weight, m, 0

    def __call__(self, x, label):
        self.iter += 1
        lamb = max(5.0, 1000.0 * (1 + 0.12 * self.iter) ** -1)
        cos = F.linear(F.normalize(x), F.normalize(self.weight)).clamp(-1, 1)
        cos_m = 8 * cos ** 4 - 8 * cos ** 2 + 1                     # cos(4θ)
        theta = cos.acos()
        k = torch.floor(self.m * theta / 3.14159265)
        phi = (-1.0) ** k * cos_m - 2 * k
        one_hot = F.one_hot(label, cos.shape[1]).to(cos.dtype)
        out = (one_hot * (phi - cos) / (1 + lamb) + cos) * x.norm(dim=1, keepdim=True)
        return F.cross_entropy(out, label)


def test_sphereface_lambda_follows_upstream_step_by_step():
    x, w, y = make_inputs(7, 11, 9, norm_range=(1.0, 4.0), seed=3)
    crit = magloss.SphereFaceLoss(9, 11, dtype=torch.float64)
    crit.weight.data.copy_(w)
    up = UpstreamSphereFace(w)
    for step in range(1, 4):
        expected = up(x, y)
        assert float(crit.current_lambda(torch.float64)) == 1000.0 / (1 + 0.12 * step)
        # float64 end to end: a λ built in float32 leaves ~1e-10 here
        torch.testing.assert_close(crit(x, y), expected, rtol=1e-14, atol=1e-14)
        assert int(crit.iteration) == step


def test_sphereface_lambda_is_computed_in_the_compute_dtype():
    crit = magloss.SphereFaceLoss(4, 3, dtype=torch.float64)
    lam = crit.current_lambda(torch.float64)
    assert lam.dtype == torch.float64 and float(lam) == 1000.0 / 1.12
    x, w, y = make_inputs(5, 6, 8, norm_range=(1.0, 2.0))
    a = MF.sphereface_loss(x, w, y, iteration=1)
    b = MF.sphereface_loss(x, w, y, lambda_=1000.0 / 1.12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

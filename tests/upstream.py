"""Independent float64 re-implementations of the papers and the upstream code they name.

Written from the published formulas and the upstream projects' documented behaviour
(insightface's ArcFace/CosFace/combined margin, the MagFace code's MagLinear + MagLoss,
the A-Softmax layer of SphereFace), with plain autograd. They share nothing with
magloss' implementation: they build the full logit matrix, use acos/cos or the
cos(θ+m) identity over it, and call F.cross_entropy. Tests compare magloss against
them in value and gradient.
"""

import math

import torch
import torch.nn.functional as F


def cosine_matrix(x, w):
    return F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))


def _ce(logits, labels, reduction="mean"):
    return F.cross_entropy(logits, labels, ignore_index=-1, reduction=reduction)


def insightface_arcface(x, w, labels, s=64.0, m=0.5, easy_margin=False, reduction="mean"):
    """insightface's classic ArcFace head (cos(θ+m) by the sum identity, threshold c − m·sin m)."""
    cos = cosine_matrix(x, w).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos * cos)
    phi = cos * math.cos(m) - sin * math.sin(m)
    if easy_margin:
        phi = torch.where(cos > 0, phi, cos)
    else:
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
    one_hot = torch.zeros_like(cos)
    valid = labels != -1
    one_hot[valid.nonzero().squeeze(1), labels[valid]] = 1.0
    logits = s * (one_hot * phi + (1 - one_hot) * cos)
    return _ce(logits, labels, reduction)


def insightface_arcface_no_grad(x, w, labels, s=64.0, m=0.5):
    """insightface's current ArcFace: the margin is applied in place under no_grad, so the
    gradient flows as if ψ(c) = c (straight-through). Only rows with θ + m < π."""
    logits = cosine_matrix(x, w).clamp(-1, 1)
    idx = (labels != -1).nonzero().squeeze(1)
    with torch.no_grad():
        target = logits[idx, labels[idx]]
        new = torch.cos(torch.acos(target) + m)
    logits = logits.clone()
    # add (new − target) as a constant: the value becomes cos(θ+m), the gradient stays that of c
    bump = torch.zeros_like(logits)
    bump[idx, labels[idx]] = new - target
    return _ce(s * (logits + bump), labels)


def cosface(x, w, labels, s=64.0, m=0.35, reduction="mean"):
    cos = cosine_matrix(x, w)
    one_hot = torch.zeros_like(cos)
    valid = labels != -1
    one_hot[valid.nonzero().squeeze(1), labels[valid]] = 1.0
    return _ce(s * (cos - m * one_hot), labels, reduction)


def mxnet_combined(x, w, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0):
    """insightface's original (mxnet) combined margin cos(m1·θ + m2) − m3, no boundary
    handling: valid only where m1·θ + m2 < π."""
    cos = cosine_matrix(x, w)
    valid = labels != -1
    idx = valid.nonzero().squeeze(1)
    t = torch.acos(cos[idx, labels[idx]])
    body = torch.cos(m1 * t + m2) - m3
    logits = cos.clone()
    logits[idx, labels[idx]] = body
    return _ce(s * logits, labels)


def magface_official(x, w_dc, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                     easy_margin=True):
    """The MagFace code: MagLinear (weight [D, C], columns normalized) + MagLoss.

    Returns (loss, loss_id, loss_g) with loss = loss_id + λ_g·loss_g (means over rows).
    """
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = torch.mm(F.normalize(x), F.normalize(w_dc, dim=0)).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - cos_theta ** 2)
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    if easy_margin:
        cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        mm = torch.sin(math.pi - ada_margin) * ada_margin
        threshold = torch.cos(math.pi - ada_margin)
        cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    loss_g = (x_norm / (u_a ** 2) + 1.0 / x_norm).mean()
    one_hot = torch.zeros_like(cos_theta)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0)
    output = one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta
    loss_id = F.cross_entropy(output * s, labels)
    return loss_id + lambda_g * loss_g, loss_id, loss_g


def sphereface_asoftmax(x, w, labels, m=4, lamb=0.0):
    """A-Softmax (SphereFace): W normalized, x not; logits ‖x‖·cos θ, target
    ‖x‖·(λ·cos θ + (−1)^k cos(mθ) − 2k)/(1 + λ); cos(mθ) by its closed-form polynomial."""
    cheb = {1: lambda c: c, 2: lambda c: 2 * c ** 2 - 1, 3: lambda c: 4 * c ** 3 - 3 * c,
            4: lambda c: 8 * c ** 4 - 8 * c ** 2 + 1, 5: lambda c: 16 * c ** 5 - 20 * c ** 3 + 5 * c}[m]
    xlen = x.norm(dim=1, keepdim=True)
    cos = (F.linear(x, F.normalize(w, dim=1)) / xlen).clamp(-1, 1)
    cos_m = cheb(cos)
    k = torch.floor(m * torch.acos(cos.detach()) / math.pi)
    phi = (-1.0) ** k * cos_m - 2 * k
    one_hot = torch.zeros_like(cos)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0)
    target = (lamb * cos + phi) / (1 + lamb)
    logits = xlen * (one_hot * target + (1 - one_hot) * cos)
    return F.cross_entropy(logits, labels)

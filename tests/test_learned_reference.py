"""LTMP and DiffRate against small, independent re-implementations of their reference code's steps
(Mxbonn/ltmp ``LTMPBlock.forward``, OpenGVLab/DiffRate ``ddp.DiffRate`` and ``merge.get_merge_func``), written
here loop by loop from the papers' pseudo-code, on tiny random inputs."""

import math

import pytest
import torch
from conftest import infer, wide_model

from vitcompress import compress_
from vitcompress.models import model_info
from vitcompress.transforms import LearnedMergeConfig
from vitcompress.transforms.token_merge import learned_ops as lo
from vitcompress.transforms.token_merge.relaxed import DiffRateCounts, masked_forward


def _ltmp_reference(x, size, mask, metric, imp, t_merge, t_prune):
    """LTMP's block step, one image and one token at a time (CLS at position 0)."""
    b, n, _ = x.shape
    xs = x * size
    out_x, out_s, out_m = [], [], []
    for i in range(b):
        m = metric[i] / metric[i].norm(dim=-1, keepdim=True) * mask[i][:, None]
        src, dst = list(range(0, n, 2)), list(range(1, n, 2))
        dx, ds, di = xs[i, dst].clone(), size[i, dst].clone(), imp[i, dst].clone()
        src_mask = []
        for j, s in enumerate(src):
            sims = [(-math.inf if j == 0 else float(m[s] @ m[d])) for d in dst]
            best = max(range(len(dst)), key=lambda k: sims[k])
            merged = sims[best] > t_merge and mask[i, s] > 0
            if merged:
                dx[best] += xs[i, s]
                ds[best] += size[i, s]
                di[best] = max(di[best], imp[i, s] if j else 0.0)
            src_mask.append(0.0 if merged or mask[i, s] == 0 else 1.0)
        x_i = torch.cat([xs[i, src], dx]) / torch.cat([size[i, src], ds])
        m_i = torch.cat([torch.tensor(src_mask), mask[i, dst]])
        imp_i = torch.cat([imp[i, src], di])
        m_i = torch.where(m_i > 0, (imp_i > t_prune).float(), m_i)
        out_x.append(x_i)
        out_s.append(torch.cat([size[i, src], ds]))
        out_m.append(m_i)
    return torch.stack(out_x), torch.stack(out_s), torch.stack(out_m)


@pytest.mark.parametrize("seed", range(4))
def test_ltmp_step_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 2, 11
    x, metric = torch.randn(b, n, 6, generator=g), torch.randn(b, n, 5, generator=g)
    size = 1 + torch.randint(0, 3, (b, n, 1), generator=g).float()
    mask = (torch.rand(b, n, generator=g) > 0.2).float()
    mask[:, 0] = 1
    imp = torch.rand(b, n, generator=g) * mask  # a removed token receives no attention
    imp[:, 0] = math.inf
    got_x, got_s, got_m, _ = lo.ltmp_reduce(x, size, mask, metric, imp, lo.threshold_gate(0.1, 1.0),
                                            lo.threshold_gate(0.3, 1.0), protected=1)
    ref_x, ref_s, ref_m = _ltmp_reference(x, size, mask, metric, imp, 0.1, 0.3)
    assert torch.equal(got_m, ref_m)
    torch.testing.assert_close(got_s, ref_s)
    torch.testing.assert_close(got_x, ref_x)
    assert 0 < got_m.sum() < mask.sum()  # the case merges and prunes something


def test_ltmp_thresholds_get_gradients_through_the_masks():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(1, 9, 4, generator=g), torch.randn(1, 9, 4, generator=g)
    imp = torch.rand(1, 9, generator=g)
    theta = torch.tensor([0.0, 0.5], requires_grad=True)
    _, _, mask, _ = lo.ltmp_reduce(x, torch.ones(1, 9, 1), torch.ones(1, 9), metric, imp,
                                   lo.threshold_gate(theta[0], 0.1), lo.threshold_gate(theta[1], 0.1), 1)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert theta.grad[0] > 0 and theta.grad[1] < 0  # a higher merge threshold keeps more, a higher prune one fewer


def _ddp_reference(logits, n_patch):
    """DiffRate's differentiable discrete proxy: kept count and per-position keep probability (with CLS)."""
    cand = torch.arange(n_patch, 0, -1).float()
    p = logits.softmax(-1)
    kept = math.ceil(float(cand @ p)) + 1
    prob = torch.zeros(n_patch + 1)
    for c, pc in zip(cand, p):
        prob[: int(c) + 1] += pc
    return kept, prob


def test_diffrate_proxy_matches_the_reference():
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    kept, prob = lo.kept_probability(logits, 12)
    ref_kept, ref_prob = _ddp_reference(logits.detach(), 12)
    assert int(kept) + 1 == ref_kept
    torch.testing.assert_close(prob.detach(), ref_prob[1:])  # ours counts patch positions, CLS excluded
    mask = lo.count_mask(prob, int(kept), 12, protected=1)
    hard = torch.ones(13)
    hard[ref_kept:] = 0
    assert torch.equal(mask.detach(), hard)
    mask.sum().backward()  # straight through: the gradient of the keep probabilities
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(3))
def test_diffrate_merge_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x, size = torch.randn(2, 10, 4, generator=g), 1 + torch.rand(2, 10, 1, generator=g)
    keep, upto = 4, 8
    got_x, got_s, _ = lo.diffrate_merge(x, size, keep, upto, protected=1)
    for i in range(2):  # the reference: plain mean with the destination, sizes max(1, size x similarity)
        m = x[i, :upto] / x[i, :upto].norm(dim=-1, keepdim=True)
        dx, cnt, ds = x[i, :keep].clone(), torch.ones(keep), size[i, :keep].clamp(min=1).clone()
        for s in range(keep, upto):
            sims = [(-math.inf if d == 0 else float(m[s] @ m[d])) for d in range(keep)]
            d = max(range(keep), key=lambda k: sims[k])
            dx[d] += x[i, s]
            cnt[d] += 1
            ds[d] += max(1.0, float(size[i, s]) * sims[d])
        torch.testing.assert_close(got_x[i, :keep], dx / cnt[:, None])
        torch.testing.assert_close(got_s[i, :keep], ds)
        torch.testing.assert_close(got_x[i, keep:], x[i, keep:])  # the merged sources stay (masked in training)


def test_diffrate_training_forward_is_the_inference_forward():
    """With the learned counts fixed, the masked training forward gives the deployed model's logits."""
    model = wide_model()
    compress_(model, LearnedMergeConfig(method="diffrate", target_flops=0.6, data="digits", limit=64,
                                        batch_size=32))
    state = model_info(model).transforms[-1]["state"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    base = wide_model()
    n_patch = base.patch_embed.num_patches
    logits = torch.full((len(base.blocks), 2, n_patch), -1e4)  # one-hot candidates: the learned kept counts
    for i, (kp, km) in enumerate(state["values"]["kept"]):
        logits[i, 0, n_patch - kp] = logits[i, 1, n_patch - km] = 0.0
    counter = DiffRateCounts(logits, {i: i for i in range(len(base.blocks))}, 1)
    with torch.no_grad():
        got, _ = masked_forward(base.eval(), x, counter.step, set(range(len(base.blocks))), "cls")
    torch.testing.assert_close(got, infer(model, x), atol=1e-4, rtol=1e-4)

"""Structured (heads, MLP) and block-structured pruning, and distillation recovery."""

import copy

import pytest
import torch
import torch_pruning as tp
from conftest import FAMILIES, TINY

from vitcompress import apply_stack, compress_, create_model, load_artifact, save_artifact
from vitcompress.data import load_data
from vitcompress.errors import ConfigError
from vitcompress.models import data_config, model_info
from vitcompress.pipeline import Calibration
from vitcompress.transforms import BlockSparseConfig, PruneConfig
from vitcompress.transforms.prune.block_sparse_linear import BlockSparseLinear
from vitcompress.transforms.prune.structured import keep_heads
from vitcompress.transforms.recovery import RecoveryConfig, distill_loss, finetune_


def _x(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _fwd(model, x):
    with torch.inference_mode():
        return model(x)


def _model(**kw):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", **{**TINY, "num_heads": 4, **kw})


def _calib(model, n=8):
    return load_data("digits", data_config(model), purpose="calib", limit=n).loader(4)


@pytest.mark.parametrize("cfg", [PruneConfig(), BlockSparseConfig()], ids=["prune", "block_sparse"])
def test_zero_strength_is_bit_exact(cfg):
    m = _model()
    ref = _fwd(m, _x())
    compress_(m, cfg)
    assert torch.equal(_fwd(m, _x()), ref)


@pytest.mark.parametrize("family", ["vit", "qk_norm", "deit3_layerscale", "registers_gap"])
def test_removed_heads_equal_zeroed_heads(family):
    """Pruning heads h gives the same function as zeroing their proj columns; shapes and scale are consistent."""
    arch, kw = FAMILIES[family]
    torch.manual_seed(0)
    m = create_model(arch, **{**TINY, "num_heads": 4, **kw})
    scales = [b.attn.scale for b in m.blocks]
    ref = copy.deepcopy(m)
    compress_(m, PruneConfig(heads=0.5, scope="per_layer"))
    for blk, rblk in zip(m.blocks, ref.blocks):
        a, d = blk.attn, blk.attn.head_dim
        assert a.num_heads == 2 and a.attn_dim == 2 * d and a.qkv.out_features == 3 * 2 * d
        assert a.proj.in_features == 2 * d
        kept = [h for h in range(4) if torch.equal(rblk.attn.proj.weight[:, h * d:(h + 1) * d],
                                                   a.proj.weight[:, : d]) or
                torch.equal(rblk.attn.proj.weight[:, h * d:(h + 1) * d], a.proj.weight[:, d:])]
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                rblk.attn.proj.weight[:, h * d:(h + 1) * d] = 0
    assert [b.attn.scale for b in m.blocks] == scales
    torch.testing.assert_close(_fwd(m, _x()), _fwd(ref, _x()), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters")
def test_mlp_pruning_matches_torch_pruning_group_and_zeroed_channels():
    m = _model()
    ref = copy.deepcopy(m)
    compress_(m, PruneConfig(mlp=0.5))
    for blk, rblk in zip(m.blocks, ref.blocks):
        w = blk.mlp.fc1.weight
        assert w.shape[0] % 8 == 0 and blk.mlp.fc2.in_features == w.shape[0]
        kept = [int((rblk.mlp.fc1.weight == row).all(1).nonzero()[0]) for row in w]
        drop = sorted(set(range(rblk.mlp.fc1.out_features)) - set(kept))
        with torch.no_grad():
            rblk.mlp.fc2.weight[:, drop] = 0
    torch.testing.assert_close(_fwd(m, _x()), _fwd(ref, _x()), atol=1e-5, rtol=1e-5)
    # the group torch-pruning's dependency graph builds for fc1's outputs is exactly fc1 rows + fc2 columns
    base = _model()
    dg = tp.DependencyGraph().build_dependency(base, example_inputs=_x(1))
    group = dg.get_pruning_group(base.blocks[0].mlp.fc1, tp.prune_linear_out_channels, idxs=[0, 1])
    touched = {(dep.target.module, dep.handler.__name__ if hasattr(dep.handler, "__name__") else str(dep.handler))
               for dep, _ in group if isinstance(dep.target.module, torch.nn.Linear)}
    assert {mod for mod, _ in touched} == {base.blocks[0].mlp.fc1, base.blocks[0].mlp.fc2}


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "hessian", "output"])
def test_criteria_prune_and_reload_bit_exact(criterion, tmp_path):
    m = _model()
    calib = None if criterion == "magnitude" else _calib(m)
    compress_(m, PruneConfig(heads=0.25, mlp=0.5, criterion=criterion), calib=calib)
    criterion = "taylor" if criterion == "output" else criterion  # block sparsity ranks tiles by weight criteria
    compress_(m, BlockSparseConfig(sparsity=0.5, block_size=16, criterion=criterion, speed_tokens=64), calib=calib)
    state = model_info(m).transforms[-1]["state"]
    assert 0.45 <= state["sparsity"] <= 0.55
    assert all(isinstance(m.get_submodule(n), BlockSparseLinear) for n in state["layers"])
    save_artifact(m, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert torch.equal(_fwd(back, _x()), _fwd(m, _x()))
    assert [b.attn.num_heads for b in back.blocks] == [b.attn.num_heads for b in m.blocks]


def test_global_head_ranking_keeps_a_head_per_layer():
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 100.0])]
    kept = keep_heads(scores, 0.5, "global")
    assert all(len(k) >= 1 for k in kept) and sum(len(k) for k in kept) == 4
    assert 3 in kept[1]


def test_block_sparse_linear_matches_masked_dense_and_trains_only_kept_blocks():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    bsl = BlockSparseLinear.from_linear(lin, block_sparsity=0.5, block_size=16)
    mask = bsl.mask()
    full = mask.repeat_interleave(16, 0).repeat_interleave(16, 1)
    x = torch.randn(5, 7, 64)
    ref = torch.nn.functional.linear(x, lin.weight * full, lin.bias)
    torch.testing.assert_close(bsl(x), ref)
    bsl.cpu_impl = "bsr"
    with torch.no_grad():
        torch.testing.assert_close(bsl(x), ref, atol=1e-5, rtol=1e-5)
    bsl.cpu_impl = "dense"
    bsl(x).sum().backward()
    assert bsl.values.grad is not None and bsl.values.grad.shape == (int(mask.sum()), 16, 16)
    assert abs(bsl.density - 0.5) < 1e-6


@pytest.mark.parametrize("cfg, msg", [
    (lambda: PruneConfig(heads=1.0), "must be in"),
    (lambda: PruneConfig(mlp=-0.1), "must be in"),
    (lambda: BlockSparseConfig(sparsity=1.0), "must be in"),
    (lambda: BlockSparseConfig(sparsity=0.5, criterion="output"), "heads and MLP"),
    (lambda: PruneConfig(mlp=0.5, refit=True, refit_size=0), "refit_size"),
])
def test_bad_settings_are_config_errors(cfg, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg()


def test_impossible_prunes_are_clean_errors():
    m = _model(num_heads=2)
    with pytest.raises(ConfigError, match="removes all"):
        compress_(m, PruneConfig(heads=0.9, scope="per_layer"))
    with pytest.raises(ConfigError, match="does not divide"):
        compress_(_model(), BlockSparseConfig(sparsity=0.5, block_size=48))
    with pytest.raises(ConfigError, match="calibration"):
        compress_(_model(), PruneConfig(mlp=0.5, criterion="taylor"))
    for cfg in (PruneConfig(mlp=0.5, criterion="output"), PruneConfig(heads=0.5, refit=True)):
        assert cfg.needs_calibration
        m = _model()
        with pytest.raises(ConfigError, match="calibration"):
            compress_(m, cfg)
        assert [b.attn.num_heads for b in m.blocks] == [4, 4]  # refused before the in-place pruning


def _silence(m, heads: int, channels: int) -> None:
    """Zero the proj columns of the first ``heads`` heads and the fc2 columns of the first ``channels`` hidden
    channels of every block: they add nothing to the stream."""
    with torch.no_grad():
        for b in m.blocks:
            b.attn.proj.weight[:, : heads * b.attn.head_dim] = 0
            b.mlp.fc2.weight[:, :channels] = 0


def test_output_criterion_removes_what_adds_nothing_to_the_stream():
    """The output criterion scores what reaches the residual stream (LayerScale included): silent heads and
    channels go first, so removing them leaves the model's output as it was; magnitude keeps the large-weight
    silent structures instead."""
    m = _model(init_values=0.1)
    _silence(m, heads=1, channels=32)
    with torch.no_grad():  # make the silent structures the largest by weight magnitude
        for b in m.blocks:
            a, d = b.attn.attn_dim, b.attn.head_dim
            for part in range(3):
                b.attn.qkv.weight[part * a: part * a + d] *= 100
            b.mlp.fc1.weight[:32] *= 100
    ref = _fwd(m, _x())
    out = copy.deepcopy(m)
    compress_(out, PruneConfig(heads=0.25, mlp=0.125, criterion="output", scope="per_layer"), calib=_calib(m))
    assert [b.attn.num_heads for b in out.blocks] == [3, 3]
    torch.testing.assert_close(_fwd(out, _x()), ref, rtol=1e-5, atol=1e-5)
    mag = copy.deepcopy(m)
    compress_(mag, PruneConfig(mlp=0.125, scope="per_layer"))
    assert not torch.allclose(_fwd(mag, _x()), ref, atol=1e-3)


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_refit_brings_the_pruned_stream_back_to_the_dense_one(layer_scale, tmp_path):
    m = _model(init_values=layer_scale)
    ref, calib = _fwd(m, _x()), _calib(m, 32)
    plain, refit = copy.deepcopy(m), copy.deepcopy(m)
    compress_(plain, PruneConfig(heads=0.25, mlp=0.5))
    compress_(refit, PruneConfig(heads=0.25, mlp=0.5, refit=True, refit_size=32), calib=calib)
    state = model_info(refit).transforms[-1]["state"]
    assert state["refit_images"] == 32 and state["stream_error_after"] < 0.5 * state["stream_error_before"]
    assert [b.mlp.fc1.out_features for b in refit.blocks] == [b.mlp.fc1.out_features for b in plain.blocks]
    err = lambda mm: float((_fwd(mm, _x()) - ref).norm() / ref.norm())  # noqa: E731
    assert err(refit) < err(plain)
    save_artifact(refit, tmp_path / "a")
    assert torch.equal(_fwd(load_artifact(tmp_path / "a"), _x()), _fwd(refit, _x()))


def test_distill_loss_and_recovery_levels():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert distill_loss(s, s, y, RecoveryConfig(alpha=1.0)).abs() < 1e-6  # KL(s || s) = 0
    assert distill_loss(s, t, y, RecoveryConfig(alpha=1.0)) > 0
    assert RecoveryConfig(epochs=0).level == "none" and RecoveryConfig(epochs=3).level == "short"
    assert RecoveryConfig(epochs=30).level == "full"
    with pytest.raises(ConfigError):
        RecoveryConfig(alpha=2.0)


def test_feature_distillation_brings_the_pruned_features_toward_the_teacher(trained_artifact):
    """distill: features matches the classifier's input (what a linear probe reads), and leaves no hook behind."""
    from vitcompress.transforms import distill

    teacher = create_model(str(trained_artifact)).eval()
    student = copy.deepcopy(teacher)
    compress_(student, PruneConfig(mlp=0.5))
    x = load_data("digits", data_config(teacher), purpose="calib", limit=32).loader(32)
    images = next(iter(x))[0]

    def gap() -> float:
        with torch.no_grad(), distill.capture_features(student) as s, distill.capture_features(teacher) as t:
            student(images), teacher(images)
            return float(distill.feature_loss(s["features"], t["features"]))

    before = gap()
    finetune_(student, RecoveryConfig(data="digits", epochs=2, limit=128, batch_size=32, lr=1e-3, distill="features",
                                      alpha=1.0), teacher=teacher)
    assert gap() < before
    assert not student.get_classifier()._forward_pre_hooks and not teacher.get_classifier()._forward_pre_hooks


def test_attn_only_recovery_changes_only_attention(trained_artifact):
    m = create_model(str(trained_artifact))
    compress_(m, PruneConfig(mlp=0.5))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_stack(m, [RecoveryConfig(epochs=1, limit=64, batch_size=32, attn_only=True)])  # teacher: the base
    assert model_info(m).provenance["recovery"]["level"] == "short"
    assert model_info(m).transforms[-1]["name"] == "recovery"
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".attn." in n for n in changed)
    assert all(p.requires_grad for p in m.parameters())  # flags restored


def test_prune_cli_end_to_end(cli, trained_artifact, tmp_path):
    out = tmp_path / "pruned"
    rc, stdout, err = cli("prune", trained_artifact, "--out", out, "--heads", "0.5", "--mlp", "0.5",
                          "--criterion", "taylor", "--calib-data", "digits", "--calib-size", "8",
                          "--epochs", "1", "--data", "digits", "--distill", "soft")
    assert rc == 0, err
    assert "short" in stdout
    m = load_artifact(out)
    assert model_info(m).provenance["recovery"]["config"]["distill"] == "soft"
    rc, stdout, err = cli("eval", out, "--data", "digits", "--limit", "32", "--no-speed")
    assert rc == 0, err
    assert "agreement" in stdout


@pytest.mark.parametrize("args, msg", [
    (["--heads", "1.0"], "--heads is the fraction removed"),
    (["--mlp", "0.5", "--criterion", "taylor"], "needs --calib-data"),
    (["--block-size", "16"], "--block-size needs --sparsity"),
    ([], "give --heads"),
    (["--mlp", "0.5", "--distill", "bogus"], "distill must be one of"),
])
def test_prune_cli_errors_are_one_line(cli, trained_artifact, tmp_path, args, msg):
    rc, _, err = cli("prune", trained_artifact, "--out", tmp_path / "x", *args)
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_recovery_leaves_the_teacher_trainable_and_trains_every_student_weight(trained_artifact):
    base = create_model(str(trained_artifact))
    m = copy.deepcopy(base)
    compress_(m, PruneConfig(mlp=0.5))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    finetune_(m, RecoveryConfig(epochs=1, limit=64, batch_size=32), teacher=base)
    assert all(p.requires_grad for p in base.parameters())
    assert not torch.equal(m.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_global_keep_drops_exactly_the_requested_count_under_ties():
    from vitcompress.transforms.prune.importance import global_keep

    scores = [torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, 3.0, 5.0])]  # tied zeros across layers
    keeps = global_keep(scores, 0.5)
    assert sum(int((~k).sum()) for k in keeps) == 4
    zero_ties = [torch.zeros(8), torch.zeros(8)]  # zero Taylor scores: a "> cut" threshold dropped all 16
    assert sum(int((~k).sum()) for k in global_keep(zero_ties, 0.25)) == 4


def test_hessian_scores_use_every_micro_batch_of_unlabelled_batches(tiny_model, monkeypatch):
    from vitcompress.transforms.prune import importance as imp

    calls = []
    real = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda x: calls.append(len(x)) or real(x))
    batches = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]  # bare tensors: no labels
    imp.scores(tiny_model, imp.Criterion.HESSIAN, lambda term: {"w": term(tiny_model.head.weight)},
                       batches, 16)
    assert calls == [4, 4, 4, 4]  # before: only the first micro-batch of each batch ([4, 4])


def test_deit_hard_distillation_supervises_each_head_with_its_own_target():
    from vitcompress.transforms.recovery import distill_loss

    cfg = RecoveryConfig(distill="hard", label_smoothing=0.0)
    g = torch.Generator().manual_seed(0)
    cls_logits, dist_logits, teacher = (torch.randn(6, 10, generator=g) for _ in range(3))
    labels = torch.randint(0, 10, (6,), generator=g)
    expected = 0.5 * torch.nn.functional.cross_entropy(cls_logits, labels) + \
        0.5 * torch.nn.functional.cross_entropy(dist_logits, teacher.argmax(-1))
    torch.testing.assert_close(distill_loss(cls_logits, teacher, labels, cfg, student_dist=dist_logits), expected)
    model = create_model("deit_tiny_distilled_patch16_224", **TINY)
    teacher_model = copy.deepcopy(model)
    seen = []
    real = model.forward_head
    model.forward_head = lambda x, pre_logits=False: seen.append(model.distilled_training) or real(x, pre_logits)
    finetune_(model, RecoveryConfig(epochs=1, limit=32, batch_size=16, distill="hard"), teacher=teacher_model)
    assert seen and all(seen) and model.distilled_training is False  # both heads trained, then restored


def test_stacks_that_would_silently_lie_are_refused():
    from vitcompress.errors import ConfigError
    from vitcompress.transforms import BlockSparseConfig, QuantConfig

    calib = [(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))]
    fake = create_model("vit_tiny_patch16_224", **TINY)
    compress_(fake, QuantConfig(w_bits=4, a_bits=8), calib=calib)
    with pytest.raises(ConfigError, match="block sparsity after simulated quantization"):
        compress_(fake, BlockSparseConfig(sparsity=0.5, block_size=16))
    with pytest.raises(ConfigError, match="fine-tuning a simulated-quantized model"):
        apply_stack(fake, [RecoveryConfig(epochs=1, limit=16, distill="none")])


def test_a_stack_draws_the_images_the_refit_asks_for():
    """refit_size above calib_size: apply_stack draws the larger (it drew calib_size, and the refit silently used
    fewer images than asked)."""
    m = _model()
    apply_stack(m, [{"name": "prune", "mlp": 0.5, "calib_size": 8, "refit": True, "refit_size": 24}],
                calib=Calibration(data="digits", size=8))
    assert model_info(m).transforms[-1]["state"]["refit_images"] == 24
    assert PruneConfig(mlp=0.5, calib_size=8).calibration_images == 8


def test_refit_head_brings_the_logits_toward_the_dense_ones():
    m = _model(init_values=0.1)
    ref, calib = _fwd(m, _x()), _calib(m, 32)
    stream, head = copy.deepcopy(m), copy.deepcopy(m)
    compress_(stream, PruneConfig(heads=0.25, mlp=0.5, refit=True, refit_size=32), calib=calib)
    compress_(head, PruneConfig(heads=0.25, mlp=0.5, refit=True, refit_size=32, refit_head=True), calib=calib)
    state = model_info(head).transforms[-1]["state"]
    assert state["logit_error_after_head_refit"] < state["logit_error_before_head_refit"]
    assert torch.equal(stream.blocks[-1].mlp.fc2.weight, head.blocks[-1].mlp.fc2.weight)  # the blocks' refit: same
    assert (_fwd(head, _x()) - ref).norm() < (_fwd(stream, _x()) - ref).norm()  # on images it did not fit
    with pytest.raises(ConfigError, match="refit_head .* needs refit"):
        PruneConfig(mlp=0.5, refit_head=True)
    headless = _model(num_classes=0)
    with pytest.raises(ConfigError, match="no Linear classifier head"):
        compress_(headless, PruneConfig(mlp=0.5, refit=True, refit_head=True), calib=_calib(headless, 8))

"""Eventful Transformers: bit-exact at full strength, nothing re-processed on a static clip, the gates against a
step-by-step reference, the stream protocol and its refusals, round trips, the synthetic video data."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import wide_model

from vitcompress.artifact import save_artifact
from vitcompress.data.video import SyntheticClips
from vitcompress.errors import ConfigError, DataError
from vitcompress.evaluate import forward
from vitcompress.export import export_model
from vitcompress.pipeline import load_artifact
from vitcompress.transforms import EventfulConfig, compress_
from vitcompress.transforms.eventful import ops


def _clips(b: int = 2, t: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _per_frame(model, clips: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([model(clips[:, t]) for t in range(clips.shape[1])], 1)


def _eventful(cfg: EventfulConfig, family: str = "vit"):
    model = wide_model(family)
    return model, compress_(copy.deepcopy(model), cfg)


@pytest.mark.parametrize("family", ["vit", "deit3_layerscale", "qk_norm", "registers_gap"])
def test_every_token_every_frame_is_the_per_frame_model_bit_for_bit(family):
    dense, model = _eventful(EventfulConfig(fraction=1.0), family)
    clips = _clips()
    with torch.inference_mode():
        assert torch.equal(model(clips), _per_frame(dense, clips))


def test_a_static_clip_reprocesses_no_token_after_its_first_frame():
    dense, model = _eventful(EventfulConfig(policy="threshold", threshold=0.0))
    clip = _clips(2, 1).expand(-1, 6, -1, -1, -1).contiguous()
    with torch.inference_mode():
        out = model(clip)
    assert model.eventful_stats().picked == {"qkv": 0, "proj": 0, "mlp": 0}
    assert model.eventful_stats().total["qkv"] > 0
    assert torch.equal(out, _per_frame(dense, clip))  # the first frame is whole, the rest reuse it exactly


def test_threshold_zero_reprocesses_what_changed_and_matches_the_per_frame_model():
    dense, model = _eventful(EventfulConfig(policy="threshold", threshold=0.0))
    clips = _clips()
    clips[:, 2:, :, :16] = clips[:, 1:2, :, :16]  # the top half freezes from frame 1
    with torch.inference_mode():
        torch.testing.assert_close(model(clips), _per_frame(dense, clips), atol=1e-4, rtol=1e-4)
    assert 0 < model.eventful_stats().fractions()["qkv"] < 1


def test_top_k_reprocesses_its_share_and_stays_close():
    dense, model = _eventful(EventfulConfig(fraction=0.5))
    base = _clips(2, 1).expand(-1, 5, -1, -1, -1)
    clips = base + 0.05 * _clips(2, 5, seed=1)  # a slowly changing clip
    with torch.inference_mode():
        out, ref = model(clips), _per_frame(dense, clips)
    n = 65  # 64 patches + CLS
    assert model.eventful_stats().fractions()["qkv"] == pytest.approx(round(0.5 * n) / n)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_gate_ops_against_a_loop_reference():
    err = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sorted(ops.top_k(err, 2)[0].tolist()) == [1, 3]
    idx = ops.above(err, 0.5)  # 3 tokens change in stream 0, 1 in stream 1: both take 3
    assert idx.shape == (2, 3) and sorted(idx[0].tolist()) == [1, 2, 3] and 0 in idx[1].tolist()
    assert ops.above(torch.zeros(2, 4), 0.0).shape == (2, 0)
    buf = torch.zeros(2, 4, 3)
    vals = torch.arange(12.0).view(2, 2, 3)
    ops.scatter_(buf, torch.tensor([[3, 0], [1, 2]]), vals)
    for b, picks in enumerate([[3, 0], [1, 2]]):
        for j, i in enumerate(picks):
            assert torch.equal(buf[b, i], vals[b, j])
    assert torch.equal(ops.gather(buf, torch.tensor([[3, 0], [1, 2]])), vals)


def test_the_stream_protocol_refuses_other_streams_and_sizes():
    _, model = _eventful(EventfulConfig(fraction=0.5))
    x = _clips(3, 1)[:, 0]
    with torch.inference_mode():
        model(x, stream_ids=torch.tensor([0, 1, 2]))
        model(x, stream_ids=torch.tensor([0, 1, 2]))
        with pytest.raises(DataError, match="shuffled batch"):
            model(x, stream_ids=torch.tensor([2, 0, 1]))
        with pytest.raises(DataError, match="frames of shape"):
            model(x[:2], stream_ids=torch.tensor([0, 1]))
        model.reset()
        model(x[:2])  # after a reset: new streams
        with pytest.raises(DataError, match="frames of shape"):
            model(torch.randn(2, 3, 48, 48))


def test_a_batch_of_separate_images_is_refused_by_evaluation():
    _, model = _eventful(EventfulConfig(fraction=0.5))
    with pytest.raises(DataError, match="stateful"):
        forward(model, _clips(2, 1)[:, 0])
    assert forward(model, _clips()).shape == (2, 10)  # clips: the mean of the frames' logits


@pytest.mark.parametrize("bad", [dict(fraction=0.0), dict(fraction=1.5), dict(policy="threshold", threshold=-0.1),
                                 dict(policy="bogus")])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        EventfulConfig(**bad)


def test_artifact_round_trip_and_a_clean_export_refusal(tmp_path):
    _, model = _eventful(EventfulConfig(fraction=0.4))
    clips = _clips()
    with torch.inference_mode():
        out = model(clips)
    save_artifact(model, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    with torch.inference_mode():
        assert torch.equal(loaded(clips), out)
    with pytest.raises(ConfigError, match="per-stream state"):
        export_model(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="already Eventful"):
        compress_(model, EventfulConfig())


def test_synthetic_clips_are_deterministic_and_redundant():
    src = torch.utils.data.TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 10, torch.zeros(20))
    clips = SyntheticClips(src, 4)
    a, label, group = clips[1]
    b, _, _ = clips[1]
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b) and group == 1 and label == int(src[7919 % 20][1])
    static, _, g0 = clips[0]
    assert g0 == 0
    same = (static[1:] == static[:-1]).flatten(1).float().mean(1)
    assert same.mean() > 0.3  # consecutive frames share much of their pixels


def test_a_sweep_scores_eventful_on_video_and_times_it_on_a_changing_stream(tmp_path):
    from vitcompress.sweep import run_sweep

    recipe = {"base": {"model": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 64,
                                                                   "depth": 2, "num_heads": 2, "num_classes": 10}},
              "eval_data": ["video:4:digits"], "accuracy": "video:4:digits:agreement", "calib_size": 8,
              "bench": {"device": "cpu", "dtype": "fp32", "batch_sizes": [2], "repeat": 2, "warmup": 1},
              "points": [{"name": "eventful", "stack": [{"name": "eventful", "fraction": 0.5}]}]}
    records = {r["name"]: r for r in run_sweep(recipe, tmp_path / "s", log=lambda line: None)}
    ev, base = records["eventful"], records["base (uncompressed)"]
    assert ev["status"] == "ok", ev.get("error")
    assert ev["accuracy"]["video:4:digits"]["n_images"] == 4
    n, k = 65, round(0.5 * 65)
    assert ev["gflops"] < base["gflops"] * (1 - 0.8 * (n - k) / n)  # the gated linear layers' share, roughly
    assert ev["latency_ms"]["2"]["median"] > 0


def test_a_stream_that_changes_precision_is_refused():
    _, model = _eventful(EventfulConfig(fraction=0.5))
    x = _clips(2, 1)[:, 0]
    with torch.inference_mode():
        model(x)
        with pytest.raises(DataError, match="precision"), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)


def test_video_specs_load_and_bad_ones_fail_in_one_line():
    from vitcompress.data import load_data

    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0,
           "interpolation": "bilinear"}
    data = load_data("video:6:digits", cfg)
    assert len(data) == 6 and data.groups == ["static", "panning"] and data.provenance["synthetic"]
    clip, label, group = data.dataset[3]
    assert clip.shape == (16, 3, 32, 32) and group == 1 and 0 <= label < 10
    with pytest.raises(DataError, match="video:"):
        load_data("video:0:digits", cfg)
    with pytest.raises(DataError, match="not for training"):
        load_data("video:6:digits", cfg, purpose="train")
    with pytest.raises(DataError, match="labelled SOURCE"):
        load_data("video:4:synthetic:8", cfg)


def test_an_unpicked_token_keeps_its_reference_so_slow_drift_accumulates():
    """The reference is the input a token had when it was last processed (the paper's error accumulation): under
    a slow linear drift, block 0's tokens stay unpicked until t x their per-frame change passes the threshold, and
    only then does their reference move. A gate that reset its reference every frame (or compared frame to frame)
    would never pick them, or would hold the last frame for all."""
    dense, model = _eventful(EventfulConfig(policy="threshold", threshold=0.0))
    base, step = _clips(1, 1)[:, 0], 0.01 * _clips(1, 1, seed=3)[:, 0]
    frames = torch.stack([base + t * step for t in range(4)], 1)  # [1, 4, 3, 32, 32]

    def block0_input(img: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(img))))

    x0, x3 = block0_input(frames[:, 0]), block0_input(frames[:, 3])
    per_frame = torch.linalg.vector_norm(block0_input(frames[:, 1]) - x0, dim=-1)[0]  # [N]
    tau = 2.5 * float(per_frame.max())
    for blk in model.blocks:
        blk._vc_threshold = tau
    with torch.inference_mode():
        for t in range(4):  # frame by frame: the streams' state stays readable afterwards
            model(frames[:, t])
    ref = model.blocks[0]._vc_mem["ref_qkv"][0]
    picked = 3 * per_frame > tau  # crossed the threshold at frame 3 (1x and 2x stay below it)
    assert 0 < int(picked.sum()) < len(picked)
    torch.testing.assert_close(ref[picked], x3[0][picked], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref[~picked], x0[0][~picked], atol=1e-5, rtol=1e-5)  # still frame 0's
    assert float((x3[0][~picked] - x0[0][~picked]).abs().max()) > 1e-3  # the two hypotheses differ here

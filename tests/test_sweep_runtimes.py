"""The sweep as the one runner: points in a runtime, peers, dense baselines and the fastest of them, speed-only and
accuracy-only sweeps, recipe variables and goals."""

import json
import re
from pathlib import Path

import pytest

from vitcompress.errors import ConfigError
from vitcompress.goals import check_goals, judge
from vitcompress.sweep import expand, load_sweep, run_sweep

TINY_BASE = {"model": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64,
                                                          "depth": 2, "num_heads": 2, "num_classes": 10}}
FAST = {"device": "cpu", "dtype": "fp32", "batch_sizes": [1, 2], "warmup": 0, "warmup_s": 0, "repeat": 1}


def _speed_only(**extra):
    return {"sweep": {"base": TINY_BASE, "eval_data": [], "calib_data": "synthetic:8", "calib_size": 4,
                      "bench": FAST, **extra}}


def test_variables_fill_placeholders_and_a_missing_one_names_its_flag():
    recipe = {"sweep": {"base": {"artifact": "${testbed}"}, "variables": {"testbed": "runs/tb"},
                        "eval_data": ["${data}"], "accuracy": "${data}:top1", "calib_data": "${data}"}}
    with pytest.raises(ConfigError, match=r"\$\{data\}: give it with --data PATH"):
        load_sweep(recipe)
    cfg = load_sweep(recipe, {"data": "digits"})
    assert cfg.base == {"artifact": "runs/tb"} and cfg.eval_data == ["digits"] and cfg.accuracy == "digits:top1"
    assert load_sweep(recipe, {"data": "digits", "testbed": "other"}).base == {"artifact": "other"}


def test_shipped_recipes_name_no_local_path_and_all_load():
    from vitcompress.recipes import recipe_path

    for name in ("cifar10_sweep", "cifar10_lowbit", "export_vit_b16", "export_cifar10", "gpu_speed",
                 "cpu_int8_speed", "headline", "demo", "vit_b16_gpu"):
        text = Path(recipe_path(name)).read_text()
        assert "../shared" not in text, name
        assert len(expand(load_sweep(name, {"data": "digits"}))) > 1, name


@pytest.mark.parametrize("point, msg", [
    ({"name": "p", "peer": "nncf", "runtime": "openvino", "stack": [{"name": "token_merge", "r": 1}]}, "no stack"),
    ({"name": "p", "peer": "nncf"}, "runtime onnxruntime or openvino"),
    ({"name": "p", "export": {"qdq_activations": "uint8"}, "stack": []}, "export settings need runtime"),
    ({"name": "p", "runtime": "openvino", "dtype": "bf16", "stack": []}, "runs in float32"),
    ({"name": "p", "runtime": "tensorrt", "stack": []}, "runtime must be one of"),
    ({"name": "p", "stack": [], "speed": 1}, "unknown field"),
])
def test_bad_points_are_config_errors(point, msg):
    with pytest.raises(ConfigError, match=msg):
        expand(load_sweep(_speed_only(points=[point])))


def test_dense_baselines_are_points_and_old_ids_keep_their_key():
    pts = expand(load_sweep(_speed_only(dense=["torch:bf16", "onnxruntime"])))
    assert [(p.name, p.family, p.dense) for p in pts] == [
        ("base (uncompressed)", "base", True), ("dense (torch:bf16)", "dense", True),
        ("dense (onnxruntime)", "dense", True)]
    assert pts[0].key() == {"stack": []}  # a plain torch point hashes as before runtimes existed
    with pytest.raises(ConfigError, match="a dtype is for torch"):
        load_sweep(_speed_only(dense=["openvino:bf16"]))


def test_a_speed_only_sweep_with_a_peer_finds_the_fastest_dense_row(tmp_path):
    pytest.importorskip("onnxruntime")
    recipe = _speed_only(dense=["onnxruntime"], points=[
        {"name": "W8A8 QDQ in ORT", "runtime": "onnxruntime", "stack": [{"name": "quantize", "mode": "deploy"}]},
        {"name": "ORT static", "runtime": "onnxruntime", "peer": "ort_quantize_static"}])
    run_sweep(recipe, tmp_path, log=lambda m: None)
    res = json.loads((tmp_path / "pareto.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"base (uncompressed)", "dense (onnxruntime)", "W8A8 QDQ in ORT", "ORT static"}
    assert rows["ORT static"]["family"] == "peer" and rows["ORT static"]["runtime"] == "onnxruntime"
    for bs in ("1", "2"):  # every speed-up is against the fastest dense row at that batch, which is 1.0x itself
        best = res["best_dense"][bs]
        assert best in ("base (uncompressed)", "dense (onnxruntime)")
        assert rows[best]["vs_best_dense_by_batch"][bs] == pytest.approx(1.0)
        assert all(r["vs_best_dense_by_batch"][bs] <= 1.0 + 1e-9 for r in rows.values() if r["family"] in
                   ("base", "dense"))
    report = (tmp_path / "report.md").read_text()
    assert "Speed only." in report and "× best dense" in report and "accuracy |" not in report


def test_an_accuracy_only_sweep_times_nothing(trained_artifact, tmp_path):
    recipe = {"sweep": {"base": {"artifact": str(trained_artifact)}, "eval_data": ["digits"], "eval_limit": 16,
                        "accuracy": "digits:top1", "calib_size": 8, "speed": False, "bench": FAST,
                        "points": [{"name": "W6A6", "stack": [{"name": "quantize", "w_bits": 6, "a_bits": 6}]}],
                        "goals": [{"name": "W6A6 loss", "value": "loss", "point": "W6A6", "target": "<= 100"}]}}
    run_sweep(recipe, tmp_path, log=lambda m: None)
    recs = [json.loads(p.read_text()) for p in (tmp_path / "points").glob("*.json")]
    assert all(r["status"] == "ok" and "speedup" not in r and r["accuracy_dtype"] == "fp32" for r in recs)
    res = json.loads((tmp_path / "pareto.json").read_text())
    assert res["goals"][0]["met"] is True and res["bits_front"][0]["w_bits"] == 6
    assert "Accuracy only" in (tmp_path / "report.md").read_text()


def _pt(name, top1, gflops=1.0, family="quant"):
    return {"name": name, "status": "ok", "family": family, "gflops": gflops, "accuracy": {"d": {"top1": top1}}}


def test_goals_judge_losses_gains_and_selectors():
    pts = [_pt("base", 80.0, family="base"), _pt("ToMe r=2", 79.5, 0.8, "token"), _pt("ToMe r=4", 78.0, 0.6, "token"),
           _pt("ToMe + X", 79.9, 0.5, "stacked"), _pt("res 24", 75.0, 0.61, "token"), _pt("W4 mse", 70.0),
           _pt("W4 mse + brecq", 72.0), _pt("W4 minmax", 69.0)]
    goals = [
        {"name": "a", "value": "loss", "point": {"prefix": "ToMe", "exclude": ["+"], "max_gflops": 0.7},
         "target": "<= 1.0"},
        {"name": "b", "value": "gain", "point": {"prefix": "ToMe", "exclude": ["+"], "nearest_gflops": "res 24"},
         "versus": "res 24", "target": ">= 2"},
        {"name": "c", "value": "gain", "point": {"prefix": "W4", "skip": ["W4 mse", "W4 minmax"]},
         "versus": {"names": ["W4 mse", "W4 minmax"]}, "target": "> 1.5"},
        {"name": "d", "value": "metric", "point": "missing", "target": "> 0"},
    ]
    check_goals(goals)
    rows = {r["goal"]: r for r in judge(goals, pts, "d:top1")}
    assert rows["a"]["measured"] == 2.0 and rows["a"]["met"] is False and "ToMe r=4" in rows["a"]["detail"]
    assert rows["b"]["measured"] == 3.0 and rows["b"]["met"] is True
    assert rows["c"]["measured"] == 2.0 and rows["c"]["met"] is True
    assert rows["d"]["measured"] is None and rows["d"]["met"] is None


@pytest.mark.parametrize("goal, msg", [
    ({"name": "x", "value": "gain", "point": "a"}, "needs versus"),
    ({"name": "x", "point": "a", "target": "about 1"}, "target must be like"),
    ({"name": "x", "point": {"prefixes": "a"}}, "selector keys"),
    ({"point": "a"}, "needs name and point"),
])
def test_bad_goals_are_config_errors(goal, msg):
    with pytest.raises(ConfigError, match=msg):
        check_goals([goal])


@pytest.mark.parametrize("args, msg", [
    (["--var", "no-equals"], "--var takes NAME=VALUE"),
    ([], "${data}: give it with --data PATH"),
])
def test_sweep_cli_variables_fail_in_one_line(cli, tmp_path, args, msg):
    rc, _, err = cli("sweep", "cifar10_sweep", "--out", tmp_path / "s", *args)
    assert rc == 2 and err.count("\n") == 1 and msg in err


def test_heldout_train_images_are_outside_every_calibration_and_training_subset():
    from vitcompress.data import even_subset
    from vitcompress.data.registry import HELDOUT_DISJOINT_FROM, heldout_indices

    held = heldout_indices(50000, 5000)
    assert len(held) == len(set(held)) == 5000
    for k in HELDOUT_DISJOINT_FROM:
        assert not set(held) & set(even_subset(50000, k)), k


def test_a_sweep_scores_on_heldout_data_and_refuses_steps_that_could_see_it(trained_artifact, tmp_path):
    recipe = {"sweep": {"base": {"artifact": str(trained_artifact)}, "eval_data": ["heldout:40:digits", "digits"],
                        "accuracy": "heldout:40:digits:top1", "calib_size": 8, "speed": False, "bench": FAST,
                        "points": [{"name": "p", "stack": [{"name": "quantize", "w_bits": 6, "a_bits": 6}]}]}}
    run_sweep(recipe, tmp_path, log=lambda m: None)
    rec = next(json.loads(p.read_text()) for p in (tmp_path / "points").glob("*.json")
               if json.loads(p.read_text())["name"] == "p")
    assert set(rec["accuracy"]) == {"heldout:40:digits", "digits"}
    recipe["sweep"]["points"][0]["stack"] = [{"name": "prune", "mlp": 0.5}, {"name": "recovery", "epochs": 1}]
    with pytest.raises(ConfigError, match="recovery limit None"):
        load_sweep(recipe)


def test_one_runtime_word_for_export_sweeps_and_the_search():
    """Export, sweeps and the search share one Runtime enum; cuda is a search target only, and a compiled runtime
    does not run an exported file."""
    import vitcompress
    from vitcompress.export import Runtime, RuntimeModel
    from vitcompress.search import SearchConfig
    from vitcompress.sweep import SweepConfig
    from vitcompress.sweep.config import make_point

    root = Path(vitcompress.__file__).parent
    enums = [str(p) for p in root.rglob("*.py") if re.search(r"class \w*Runtime\w*\((Str)?Enum\)", p.read_text())]
    assert len(enums) == 1
    assert SearchConfig(model="m", data="d", target="cuda").target is Runtime.CUDA
    assert SweepConfig(base={"model": "x"}, eval_data=[], runtime="openvino").runtime is Runtime.OPENVINO
    with pytest.raises(ConfigError, match="cuda is a search target"):
        make_point("p", {"stack": [], "runtime": "cuda"})
    with pytest.raises(ConfigError, match="compiles torch models"):
        RuntimeModel(root / "missing.onnx", runtime="torch-compile")

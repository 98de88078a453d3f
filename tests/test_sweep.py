"""Sweeps (resume, failures, ids), Pareto fronts and reports."""

import json
import random

import pytest
import yaml

from vitcompress.errors import ConfigError
from vitcompress.report import pareto_front
from vitcompress.sweep import SweepContext, expand, load_sweep, run_sweep


def _recipe(artifact, **extra):
    return {"sweep": {
        "base": {"artifact": str(artifact)}, "eval_data": ["digits"], "eval_limit": 24, "accuracy": "digits:top1",
        "calib_size": 8, "bench": {"device": "cpu", "batch_sizes": [1, 2], "warmup": 0, "warmup_s": 0, "repeat": 1},
        "points": [
            {"name": "tome", "stack": [{"name": "token_merge", "r": 1}]},
            {"name": "w8a8", "stack": [{"name": "quantize", "mode": "deploy", "a_granularity": "per_token"}]},
            {"name": "mlp", "stack": [{"name": "prune", "mlp": 0.5}, {"name": "recovery", "epochs": 1, "limit": 32}]},
            {"name": "impossible", "stack": [{"name": "token_merge", "method": "evit", "schedule": [99, 0]}]},
        ],
        "grid": [{"name": "W{w_bits}A8", "stack": [{"name": "quantize", "a_bits": 8}],
                  "product": {"0.w_bits": [4, 8]}}],
        **extra}}


def test_pareto_front_has_no_dominated_point():
    rng = random.Random(0)
    for _ in range(50):
        xs = [rng.choice([1, 2, 3, 4]) + rng.random() * 0.1 * rng.randint(0, 1) for _ in range(12)]
        ys = [rng.choice([90, 95, 97, 99]) for _ in range(12)]
        front = pareto_front(xs, ys)
        assert front
        for i in front:
            assert not any(xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(12))
        for i in set(range(12)) - set(front):  # everything off the front is dominated by someone
            assert any(xs[j] <= xs[i] and ys[j] >= ys[i] and (xs[j] < xs[i] or ys[j] > ys[i]) for j in range(12))


def test_expand_builds_base_points_and_grid(trained_artifact):
    pts = expand(load_sweep(_recipe(trained_artifact)))
    assert [p.name for p in pts] == ["base (uncompressed)", "tome", "w8a8", "mlp", "impossible", "W4A8", "W8A8"]
    assert [p.family for p in pts][:4] == ["base", "token", "quant", "prune"]
    assert pts[2].deployable and not pts[5].deployable and pts[3].recovery == "short"


@pytest.mark.parametrize("change, msg", [
    ({"accuracy": "imagenet:top1"}, "accuracy must be"),
    ({"points": [{"name": "x", "stack": [{"name": "nope"}]}]}, "unknown transform 'nope'"),
    ({"points": [{"name": "x", "stack": [{"name": "prune", "heads": 1.5}]}]}, "fraction removed"),
    ({"grid": [{"name": "g", "stack": [{"name": "quantize"}], "product": {"3.w_bits": [4]}}]}, "STEP.FIELD"),
])
def test_bad_recipes_are_config_errors(trained_artifact, change, msg):
    data = _recipe(trained_artifact)
    data["sweep"].update(change)
    with pytest.raises(ConfigError, match=msg):
        expand(load_sweep(data))


def _dies_on_third(monkeypatch) -> tuple[list[str], object]:
    """Make the third measured point raise KeyboardInterrupt (a Ctrl-C); returns (the names measured, the real
    measure)."""
    real = SweepContext.measure
    calls: list[str] = []

    def dies_on_third(self, point):
        calls.append(point.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, point)

    monkeypatch.setattr(SweepContext, "measure", dies_on_third)
    return calls, real


def test_killed_sweep_resumes_without_recomputing(trained_artifact, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls, real = _dies_on_third(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_recipe(trained_artifact), out, log=lambda m: None)
    finished = sorted(p.name for p in (out / "points").glob("*.json"))
    assert len(finished) == 2 and not list((out / "points").glob(".*tmp"))

    calls.clear()
    monkeypatch.setattr(SweepContext, "measure", lambda self, p: (calls.append(p.name), real(self, p))[1])
    run_sweep(_recipe(trained_artifact), out, log=lambda m: None)
    assert calls == ["w8a8", "mlp", "impossible", "W4A8", "W8A8"]  # the first two were not recomputed
    records = [json.loads(p.read_text()) for p in (out / "points").glob("*.json")]
    assert len(records) == 7
    failed = [r for r in records if r["status"] != "ok"]
    assert [r["name"] for r in failed] == ["impossible"] and "cannot remove 99 tokens" in failed[0]["error"]

    calls.clear()  # a third run retries only the failed point
    run_sweep(_recipe(trained_artifact), out, log=lambda m: None)
    assert calls == ["impossible"]

    res = json.loads((out / "pareto.json").read_text())
    rows = res["rows"]
    front = [r for r in rows if r["front_latency"]]
    for r in front:
        assert not any(o["latency_ms"] <= r["latency_ms"] and o["accuracy"] >= r["accuracy"]
                       and (o["latency_ms"] < r["latency_ms"] or o["accuracy"] > r["accuracy"]) for o in rows)
    for name in ("report.md", "pareto.png", "points.csv"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "accuracy-only" in md and "deployable" in md and "impossible" in md


def test_sweep_and_report_cli(cli, trained_artifact, tmp_path):
    recipe = tmp_path / "r.yaml"
    data = _recipe(trained_artifact)
    data["sweep"]["points"] = data["sweep"]["points"][:1]
    data["sweep"]["grid"] = []
    recipe.write_text(yaml.safe_dump(data))
    rc, out, err = cli("sweep", recipe, "--out", tmp_path / "s")
    assert rc == 0, err
    assert "front" in out
    rc, out, err = cli("report", tmp_path / "s")
    assert rc == 0, err
    rc, _, err = cli("report", tmp_path)
    assert rc == 2 and "not a sweep directory" in err and err.count("\n") == 1
    rc, _, err = cli("sweep", tmp_path / "missing.yaml", "--out", tmp_path / "t")
    assert rc == 2 and "recipe not found" in err


def test_set_replaces_recipe_fields_and_only_runs_the_named_points(cli, trained_artifact, tmp_path):
    """--set KEY=VALUE (dotted, YAML values) changes a recipe without editing it; --only runs a subset of the points
    (the base always). What the GPU runbook's CPU smoke mode uses."""
    cfg = load_sweep(_recipe(trained_artifact), overrides={"bench.batch_sizes": [3], "eval_limit": 8})
    assert cfg.bench["batch_sizes"] == [3] and cfg.eval_limit == 8
    with pytest.raises(ConfigError, match="no mapping 'benchh'"):
        load_sweep(_recipe(trained_artifact), overrides={"benchh.repeat": 2})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(trained_artifact)))
    rc, _, err = cli("sweep", recipe, "--out", tmp_path / "s", "--only", "tome", "--set", "bench.batch_sizes=[2]",
                     "--set", "speed=false", "--no-report")
    assert rc == 0, err
    ran = sorted(json.loads(f.read_text())["name"] for f in (tmp_path / "s" / "points").glob("*.json"))
    assert ran == ["base (uncompressed)", "tome"]
    listed = [p["name"] for p in json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]]
    assert len(listed) == 7 and "w8a8" in listed  # a later report still shows every finished point
    for bad, msg in ((["--set", "bench"], "KEY=VALUE"), (["--only", "nope"], "no point of the recipe is named 'nope'"),
                     (["--set", "bench.repeat=[1"], "not YAML")):
        rc, _, err = cli("sweep", recipe, "--out", tmp_path / "t", *bad)
        assert rc == 2 and msg in err and err.count("\n") == 1, err


@pytest.mark.parametrize("recipe", ["demo", "vit_b16_gpu"])
def test_bundled_recipes_cover_every_family(recipe):
    pts = expand(load_sweep(recipe))
    fams = [p.family for p in pts]
    assert len(pts) >= 12 and fams.count("stacked") >= 3
    assert {"base", "token", "quant", "prune", "block-sparse"} <= set(fams)


def test_a_sweep_with_attacks_adds_robustness_columns(trained_artifact, tmp_path):
    recipe = _recipe(trained_artifact, attack=[{"method": "fgsm", "eps": "8/255", "source": "base"},
                                               {"method": "pgd", "eps": "8/255", "steps": 2}], attack_limit=16)
    recipe["sweep"]["points"] = recipe["sweep"]["points"][:2]
    recipe["sweep"]["grid"] = []
    run_sweep(recipe, tmp_path / "s")
    report = (tmp_path / "s" / "report.md").read_text()
    assert "robust: fgsm 8/255 base" in report and "transfer: fgsm 8/255 base" in report
    pts = {p["name"]: p for p in (json.loads(f.read_text()) for f in (tmp_path / "s" / "points").glob("*.json"))}
    base = pts["base (uncompressed)"]["robustness"]["fgsm 8/255 base"]
    assert base["base_successes"] == 0 or base["transfer_rate"] == 100.0
    assert pts["tome"]["robustness"]["pgd 8/255 self"]["images"] == 16
    # the Pareto picture gains a robustness panel: the white-box attack's robust top-1 against latency
    pareto = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert pareto["robust_axis"] == "robust: pgd 8/255 self" and pareto["front_robust"]
    assert "Robustness-vs-latency front (`robust: pgd 8/255 self`)" in report
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 0


def test_four_workers_on_one_sweep_folder_compute_each_point_once(trained_artifact, tmp_path):
    """Four `vitcompress sweep` processes started together on one --out share its points (a lock per point)."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(trained_artifact)))
    out = tmp_path / "sweep"
    procs = [subprocess.Popen([sys.executable, "-m", "vitcompress", "sweep", str(recipe), "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    ran = [line for log in logs for line in log.splitlines() if line.startswith("sweep: ran '")]
    names = sorted(line.split("'")[1] for line in ran)
    assert names == sorted(["base (uncompressed)", "tome", "w8a8", "mlp", "impossible", "W4A8", "W8A8"]), logs  # once
    assert len({json.loads(p.read_text())["pid"] for p in (out / "points").glob("*.json")}) >= 2  # shared
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("kind", ["speed-only", "accuracy-only", "mixed"])
def test_a_sweep_writes_the_files_it_names(trained_artifact, tmp_path, capsys, monkeypatch, kind):
    """Accuracy-only sweeps plot accuracy against GFLOPs and size; speed-only ones (no accuracy axis) write the CSV
    but no picture; the summary names exactly the files on disk."""
    from vitcompress.cli_output import print_fronts

    monkeypatch.setenv("COLUMNS", "300")
    recipe = _recipe(trained_artifact, grid=[])
    recipe["sweep"]["points"] = recipe["sweep"]["points"][:1]
    recipe["sweep"]["bench"]["batch_sizes"] = [1]
    if kind == "speed-only":
        recipe["sweep"]["eval_data"] = []
    if kind == "accuracy-only":
        recipe["sweep"]["speed"] = False
    out = tmp_path / "s"
    run_sweep(recipe, out, log=lambda m: None)
    assert (out / "points.csv").stat().st_size > 0
    assert (out / "pareto.png").is_file() == (kind != "speed-only")
    md = (out / "report.md").read_text()
    if kind == "accuracy-only":
        assert "Accuracy-vs-GFLOPs front" in md and "no point was timed" in md
    capsys.readouterr()
    print_fronts(out)
    said = capsys.readouterr().out
    assert ("pareto.png" in said) == (kind != "speed-only") and "points.csv" in said


def test_ctrl_c_says_what_finished_and_that_a_rerun_resumes(cli, trained_artifact, tmp_path, monkeypatch):
    _dies_on_third(monkeypatch)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(trained_artifact)))
    rc, out, err = cli("sweep", recipe, "--out", tmp_path / "s")
    lines = err.strip().splitlines()
    assert rc == 130 and lines[-1].startswith("interrupted: 2 of 7 sweep points to run are finished in ")
    assert lines[-1].endswith("re-run the same command to resume") and "Traceback" not in err
    from vitcompress.ui import interrupted_line

    assert interrupted_line().startswith("interrupted: nothing was written")  # outside a resumable step


def test_points_of_a_random_weight_base_are_marked_in_the_report(tmp_path):
    recipe = {"sweep": {"base": {"model": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8,
                                                                             "num_classes": 10}},
                        "eval_data": ["synthetic:8"], "accuracy": "synthetic:8:agreement", "speed": False,
                        "points": [{"name": "tome", "stack": [{"name": "token_merge", "r": 1}]}]}}
    run_sweep(recipe, tmp_path / "s", log=lambda m: None)
    md = (tmp_path / "s" / "report.md").read_text()
    assert "tome †" in md and "† random weights" in md


def test_a_timed_sweep_shows_one_ratio_per_point_in_every_file(trained_artifact, tmp_path, capsys, monkeypatch):
    """report.md's × best dense, points.csv's vs_best_dense, pareto.json's rows and the command's summary are the same
    number per point."""
    import csv

    from vitcompress.cli_output import print_fronts

    recipe = _recipe(trained_artifact, grid=[])
    recipe["sweep"]["points"] = recipe["sweep"]["points"][:2]
    out = tmp_path / "s"
    run_sweep(recipe, out, log=lambda m: None)
    rows = list(csv.DictReader((out / "points.csv").open()))
    pareto = {r["name"]: r for r in json.loads((out / "pareto.json").read_text())["rows"]}
    md = (out / "report.md").read_text().splitlines()
    for r in rows:
        x = float(r["vs_best_dense"])
        assert x == pytest.approx(pareto[r["name"]]["vs_best_dense"])
        line = next(ln for ln in md if ln.startswith(f"| {r['name']} |") or ln.startswith(f"| **{r['name']}** |"))
        assert f"{x:.2f}×" in line, (line, x)
    monkeypatch.setenv("COLUMNS", "300")
    capsys.readouterr()
    print_fronts(out)
    said = capsys.readouterr().out
    for r in rows:
        if r["front_latency"] == "True":
            assert f"{float(r['vs_best_dense']):.2f}x the fastest dense" in said, said


def test_a_resumed_sweep_reads_the_base_logits_it_kept(trained_artifact, tmp_path, monkeypatch):
    """The base is evaluated once per sweep folder: a re-run with a new point reads its logits from base_logits/."""
    from vitcompress.sweep import run as sweep_run

    recipe = _recipe(trained_artifact, grid=[], speed=False)
    recipe["sweep"]["points"] = recipe["sweep"]["points"][:1]
    out = tmp_path / "s"
    run_sweep(recipe, out, log=lambda m: None)
    assert len(list((out / "base_logits").glob("*.safetensors"))) == 1

    def no_base_eval(*a, **k):
        raise AssertionError("the base was evaluated again")

    monkeypatch.setattr(sweep_run, "predict", no_base_eval)
    recipe["sweep"]["points"] = _recipe(trained_artifact)["sweep"]["points"][:2]
    run_sweep(recipe, out, log=lambda m: None)
    assert len(list((out / "points").glob("*.json"))) == 3


def test_the_mean_weight_width_of_a_stack_of_quantize_steps_weights_each_layer_by_its_size():
    """W6 everywhere but fc2, then fc2 at W8: the report's width is the parameter-weighted mean, not the last step's."""
    from conftest import TINY

    from vitcompress import apply_stack, create_model
    from vitcompress.pipeline import Calibration
    from vitcompress.sweep.run import mean_weight_bits

    m = create_model("vit_tiny_patch16_224", **TINY)
    apply_stack(m, [{"name": "quantize", "w_bits": 6, "a_bits": 6, "exclude": ["fc2"]},
                    {"name": "quantize", "w_bits": 8, "a_bits": 8, "layers": ["fc2"]}], calib=Calibration("digits", 8))
    six, eight = 64 * 192 + 64 * 64 + 64 * 256, 256 * 64  # qkv, proj, fc1 | fc2, per block
    assert mean_weight_bits(m) == round((6 * six + 8 * eight) / (six + eight), 2)
    single = create_model("vit_tiny_patch16_224", **TINY)
    apply_stack(single, [{"name": "quantize", "w_bits": 4, "a_bits": 8}], calib=Calibration("digits", 8))
    assert mean_weight_bits(single) is None  # one step: its own w_bits is exact


def test_the_recorded_command_regenerates_the_table_without_only():
    from vitcompress.cli import _sweep_command

    argv = ["vitcompress", "sweep", "r.yaml", "--only", "W4A4 x", "--out", "o", "--only=ToMe", "--var", "a=b"]
    assert _sweep_command(argv) == "vitcompress sweep r.yaml --out o --var a=b"

"""``vitcompress search``: a study over the families on a tiny ViT, resumed after a stop, the chosen stack saved and
scored on the test split, and one-line refusals of bad input."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from conftest import wide_model

from vitcompress import save_artifact
from vitcompress.errors import ConfigError
from vitcompress.search import SearchConfig, load_space, run_search

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_artifact(wide_model(), path)
    return str(path)


def _cfg(model, **over):
    return SearchConfig(**{"model": model, "data": "digits", "budget_minutes": 2, "n_trials": 3, "repeat": 2,
                           "batch_size": 8, "heldout": 64, "heldout_small": 16, "calib_size": 8, **over})


def test_search_runs_resumes_and_saves_the_best(tiny, tmp_path):
    out = tmp_path / "s"
    first = run_search(_cfg(tiny, max_drop=100.0), out, log=lambda m: None)  # any stack fits: one is chosen
    assert len(first["trials"]) == 3
    again = run_search(_cfg(tiny, max_drop=100.0, n_trials=5), out, log=lambda m: None)  # resumed: 2 more
    assert [t["trial"] for t in again["trials"]] == [0, 1, 2, 3, 4]
    chosen = again["chosen"]
    assert chosen is not None and chosen["feasible"] and (out / "best" / "vitcompress.json").is_file()
    assert chosen["speed"] == max(t["speed"] for t in again["trials"] if t.get("feasible"))
    assert again["test"]["images"] > 0 and "drop" in again["test"]
    index = json.loads((out / "sweep.json").read_text())
    names = [p["name"] for p in index["points"]]
    assert names[:2] == ["base (uncompressed)", "dense (torch)"] and (out / "report.md").is_file()
    assert "**chosen**" in (out / "search.md").read_text()


def test_a_search_whose_budget_nothing_meets_keeps_the_dense_model(tiny, tmp_path, monkeypatch):
    """Every stack loses 50 pt (a random tiny model barely reacts to compression, so the metric is stubbed): none
    keeps the drop within 3.2 pt (two standard errors of 64 images is 3.1), and the wording names that limit."""
    from vitcompress.search import run

    real = run._metric
    monkeypatch.setattr(run, "_metric", lambda rec, cfg: real(rec, cfg) - (50 if "trial" in rec.get("name", "") else 0))
    out = run_search(_cfg(tiny, max_drop=3.2, metric="agreement", n_trials=2, space=str(_space(tmp_path))),
                     tmp_path / "s", log=lambda m: None)
    assert out["chosen"] is None
    assert "within --max-drop 3.2 pt" in out["line"] and "within --max-drop 3.2 pt" in (tmp_path / "s" /
                                                                                        "search.md").read_text()


def test_a_max_drop_below_two_standard_errors_is_refused_with_the_size_it_needs(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"below two standard errors .* of 64 held-out images.*--heldout \d+"):
        run_search(_cfg(tiny, max_drop=1.0), tmp_path / "s", log=lambda m: None)
    with pytest.raises(ConfigError, match="below two standard errors"):
        run_search(_cfg(tiny, max_drop=0.0), tmp_path / "s", log=lambda m: None)


def test_one_number_per_quantity_across_the_search_files(tiny, tmp_path):
    """A trial's speed-up is one timing: search.json, search.md, report.md, points.csv and pareto.png's key show
    the same ratio over the same fastest dense row; a repeated stack is not measured again."""
    import csv

    space = _space(tmp_path, "search:\n  quant:\n    - {name: quantize, mode: deploy}\n")
    s = run_search(_cfg(tiny, max_drop=100.0, n_trials=4, space=str(space)), tmp_path / "s", log=lambda m: None)
    out = tmp_path / "s"
    measured = [t for t in s["trials"] if t.get("stage") == "measured" and "repeat_of" not in t]
    repeats = [t for t in s["trials"] if "repeat_of" in t]
    assert len(measured) == 1 and repeats, s["trials"]  # one stack in the space: measured once
    t = measured[0]
    rows = {r["id"]: r for r in csv.DictReader((out / "points.csv").open())}
    row = rows[t["point"]]
    assert float(row["vs_best_dense"]) == pytest.approx(t["vs_best_dense"])
    report, md = (out / "report.md").read_text(), (out / "search.md").read_text()
    assert f"{t['vs_best_dense']:.2f}×" in report and f"{t['vs_best_dense']:.2f}x" in md
    assert s["best_dense"] in report and s["best_dense"] in md
    for r in rows.values():  # the anchor is the dense model: its own row is 1.00 over itself
        if r["name"] == "dense (torch)":
            assert float(r["speedup"]) == 1.0
    assert (out / "pareto.png").stat().st_size > 0


def _space(tmp_path, text=None):
    p = tmp_path / "space.yaml"
    p.write_text(text or "search:\n  prune:\n    - {name: prune, heads: [0.4, 0.5], mlp: [0.4, 0.5]}\n")
    return p


def test_an_option_may_be_a_sub_stack_with_the_searchs_data(tiny, tmp_path):
    """MiniViT with its recovery, as one option: the trial runs both, the recovery on the search's --data."""
    text = ("search:\n  share:\n    - [{name: minivit, share: 2}, {name: recovery, data: '${data}', epochs: 1,"
            " limit: 64, batch_size: 32, distill: weight}]\n")
    space = load_space(_space(tmp_path, text))
    assert len(space.families["share"][0]) == 2
    out = run_search(_cfg(tiny, max_drop=100.0, n_trials=2, space=str(_space(tmp_path, text))), tmp_path / "s",
                     log=lambda m: None)
    stacks = [t["stack"] for t in out["trials"] if t["stack"]]
    assert stacks and stacks[0][0] == {"name": "minivit", "share": 2} and stacks[0][1]["data"] == "digits"


def test_exported_targets_leave_out_what_a_file_cannot_hold(tmp_path):
    """The configs say what a file can hold (``exportable``); the search names no transform."""
    space = load_space().for_target(exported=True)
    assert all(o.get("a_granularity") != "per_token" for o in space.families["quant"])
    assert load_space().families["quant"] != space.families["quant"]
    text = ("search:\n  token:\n    - {name: adaptive_tokens, target_flops: [0.5, 0.9]}\n"
            "    - {name: learned_merge, method: ltmp, target_flops: [0.5, 0.9]}\n"
            "    - {name: learned_merge, method: diffrate, target_flops: [0.5, 0.9]}\n"
            "  quant:\n    - {name: quantize, w_bits: 4, a_bits: 8}\n    - {name: mixed_precision, mean_bits: 6}\n")
    kept = load_space(_space(tmp_path, text)).for_target(exported=True).families
    assert kept == {"token": [{"name": "learned_merge", "method": "diffrate", "target_flops": [0.5, 0.9]}]}


@pytest.mark.parametrize("over,match", [
    (dict(max_drop=-1.0), "max_drop"),
    (dict(budget_minutes=0.5), "too small"),
    (dict(n_trials=0), "n_trials"),
])
def test_bad_settings_are_config_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg("x", **over)


def test_cli_refuses_bad_input_in_one_line(cli, tiny, tmp_path):
    cases = [
        (["--space", str(_space(tmp_path, "search: {}\n"))], "empty"),
        (["--max-drop", "-1"], "max_drop"),
        (["--budget-minutes", "0.2"], "too small"),
        (["--target", "warp"], "target"),
    ]
    for extra, match in cases:
        rc, _, err = cli("search", tiny, "--data", "digits", "--out", tmp_path / "o", *extra)
        assert rc != 0 and match in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc, _, err = cli("search", tiny, "--data", "digits", "--out", tmp_path / "mine")
    assert rc != 0 and "not a search folder" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_missing_target_runtime_is_refused(tiny, tmp_path, monkeypatch):
    from vitcompress.search import run

    real = run.importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ConfigError, match="openvino"):
        run_search(_cfg(tiny, target="openvino"), tmp_path / "s", log=lambda m: None)


def test_a_trial_left_running_by_a_killed_search_does_not_stop_the_restart(tiny, tmp_path):
    import optuna

    out = tmp_path / "s"
    run_search(_cfg(tiny, max_drop=100.0, n_trials=1), out, log=lambda m: None)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    study.ask()  # a trial the killed process never told: RUNNING, no heartbeat from here on
    again = run_search(_cfg(tiny, max_drop=100.0, n_trials=3), out, log=lambda m: None)
    assert len(again["trials"]) == 2 and again["chosen"] is not None  # the kept one and one more


PG = os.environ.get("VITCOMPRESS_TEST_POSTGRES")


@pytest.mark.skipif(not PG, reason="needs VITCOMPRESS_TEST_POSTGRES, a PostgreSQL URL (.ci/run starts a server)")
def test_two_workers_share_one_postgresql_study(tiny, tmp_path):
    """A search spread over two processes on one PostgreSQL study: every stack is measured once (a repeat waits for
    and reuses the other process's figures), the main process reports the workers' trials, and the pick is the
    one a single process makes."""
    import optuna

    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="search", storage=PG)
    space = _space(tmp_path, "search:\n  prune:\n    - {name: prune, mlp: 0.75}\n    - {name: prune, mlp: 0.25}\n")
    args = [tiny, "--data", "digits", "--budget-minutes", "4", "--n-trials", "16", "--repeat", "2", "--batch-size", "8",
            "--heldout", "64", "--heldout-small", "16", "--calib-size", "8", "--max-drop", "100", "--space", str(space)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitcompress", "search"]
    worker = subprocess.Popen([*cmd, *args, "--out", str(tmp_path / "w"), "--storage", PG, "--worker"], env=env,
                              stderr=subprocess.PIPE, text=True)
    main = subprocess.run([*cmd, *args, "--out", str(tmp_path / "m"), "--storage", PG], env=env,
                          capture_output=True, text=True)
    assert worker.wait() == 0 and main.returncode == 0, (main.stderr, worker.stderr.read())
    s = json.loads((tmp_path / "m" / "search.json").read_text())
    study = optuna.load_study(study_name="search", storage=PG)
    assert len(s["trials"]) == len(study.trials) == 16
    firsts = [t for t in s["trials"] if "repeat_of" not in t]
    stacks = [json.dumps(t["stack"], sort_keys=True) for t in firsts]
    assert len(stacks) == len(set(stacks)) <= 3  # dense and the two options: each measured once
    assert all(t["stage"] != "running" for t in s["trials"])
    single = run_search(_cfg(tiny, max_drop=100.0, n_trials=16, space=str(space), budget_minutes=4),
                        tmp_path / "one", log=lambda m: None)
    assert s["chosen"]["stack"] == single["chosen"]["stack"] == [{"name": "prune", "mlp": 0.75}]
    index = json.loads((tmp_path / "m" / "sweep.json").read_text())
    assert len([p for p in index["points"] if p["name"].startswith("trial")]) == len(set(stacks) - {"[]"})


def test_the_heldout_split_defaults_to_at_least_1000_images_or_says_why_not():
    from vitcompress.errors import Note
    from vitcompress.search import run

    assert run._heldout_sizes(_cfg("x", heldout=None, heldout_small=None), 50_000) == (2000, 500)
    with pytest.warns(Note, match=r"only \d+ train images are held out .* \(one image = "):
        n, _ = run._heldout_sizes(_cfg("x", heldout=None, heldout_small=None), 1_500)
    assert n < 1000
    assert run.split_se(50.0, 2000) == pytest.approx(1.118, abs=1e-3) and run.split_se(100.0, 64) == 100 / 64

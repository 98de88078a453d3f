"""``vitcompress search``: a study over the families on a tiny ViT, resumed after a stop, the chosen stack saved and
scored on the test split, and one-line refusals of bad input."""

import json

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


def test_a_search_whose_budget_nothing_meets_keeps_the_dense_model(tiny, tmp_path):
    out = run_search(_cfg(tiny, max_drop=0.0, n_trials=2, space=str(_space(tmp_path))), tmp_path / "s",
                     log=lambda m: None)
    assert out["chosen"] is None or out["chosen"]["drop"] <= 0.0


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


def test_exported_targets_leave_out_what_a_file_cannot_hold():
    space = load_space().for_target(exported=True)
    assert all(o.get("a_granularity") != "per_token" for o in space.families["quant"])
    assert load_space().families["quant"] != space.families["quant"]


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

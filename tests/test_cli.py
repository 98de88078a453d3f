"""The CLI: every command listed; train -> eval end to end; every bad input fails in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY

COMMANDS = ("train", "eval", "merge", "quantize", "prune", "sweep", "report", "demo")


def _one_clean_line(rc, err, pattern):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]
    assert "Traceback" not in err


def test_console_script_lists_every_command():
    exe = os.path.join(os.path.dirname(sys.executable), "vitcompress")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0
    for cmd in COMMANDS:
        assert cmd in out.stdout


def test_subprocess_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "vitcompress", "eval", "no_such_vit", "--data", "digits"],
                         capture_output=True, text=True)
    _one_clean_line(out.returncode, out.stderr, "unknown model 'no_such_vit'")


def test_train_then_eval(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {
        "model": "vit_tiny_patch16_224", "model_kwargs": {**TINY, "pretrained_cfg_overlay": {"crop_pct": 1.0}},
        "data": "digits", "epochs": 1, "batch_size": 32, "limit": 64, "warmup_epochs": 0.5}}))
    rc, out, err = cli("train", "--recipe", recipe, "--out", tmp_path / "art")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "art" / "vitcompress.json").read_text())
    assert manifest["provenance"]["train"]["epochs"] == 1 and manifest["metrics"]["top1"] is not None

    rc, out, err = cli("eval", tmp_path / "art", "--data", "digits", "--limit", "50", "--bench-batch-sizes", "1,2",
                       "--repeat", "2", "--json", tmp_path / "e.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["agreement"] == 100.0 and result["n_images"] == 50 and set(result["latency_ms"]) == {"1", "2"}
    assert "top1" in out

    rc, _, err = cli("eval", tmp_path / "art", "--data", "digits-c", "--limit", "60", "--no-speed",
                     "--json", tmp_path / "c.json")
    assert rc == 0, err
    assert len(json.loads((tmp_path / "c.json").read_text())["groups"]) == 6


def test_eval_of_a_timm_id_with_overrides(tmp_path, cli):
    rc, _, err = cli("eval", "vit_tiny_patch16_224", "--random-weights", "--img-size", "32", "--patch-size", "8",
                     "--num-classes", "10",
                     "--data", "synthetic:4", "--bench-batch-sizes", "2", "--repeat", "2", "--dtype", "fp32",
                     "--json", tmp_path / "s.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["top1"] is None and result["dtype"] == "fp32" and result["params"] > 0


@pytest.fixture
def ckpt(tmp_path):
    from vitcompress import create_model

    path = tmp_path / "ckpt.pth"
    torch.save(create_model("vit_tiny_patch16_224", **TINY).state_dict(), path)
    return path


TINY_ARGS = ["--random-weights", "--img-size", "32", "--patch-size", "8", "--num-classes", "10"]


def test_bad_inputs_fail_in_one_line(tmp_path, cli, ckpt, trained_artifact):
    import shutil

    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    corrupt_art = tmp_path / "corrupt_art"
    shutil.copytree(trained_artifact, corrupt_art)
    w = corrupt_art / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    (tmp_path / "empty").mkdir()
    base = ["eval", "vit_tiny_patch16_224", *TINY_ARGS, "--data"]
    cases = [
        (["eval", "vit_nope", "--data", "digits"], "unknown model 'vit_nope'"),
        (["eval", "resnet18", "--data", "digits"], "unsupported architecture 'resnet18'"),
        ([*base, "digits", "--checkpoint", tmp_path / "missing.pth"], "checkpoint not found"),
        ([*base, "digits", "--checkpoint", truncated], "corrupt or truncated"),
        (["eval", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--data", "digits",
          "--checkpoint", ckpt], "does not match model"),
        (["eval", corrupt_art, "--data", "digits"], "does not match vitcompress.json"),
        (["eval", tmp_path, "--data", "digits"], "not a vitcompress artifact"),
        (["eval", tmp_path / "gone", "--data", "digits"], "no such artifact directory"),
        ([*base, tmp_path / "nowhere"], "missing path"),
        ([*base, tmp_path / "empty"], "no images found"),
        (["eval", "vit_tiny_patch16_224", "--pretrained", "--data", "digits"], "could not fetch pretrained weights"),
        ([*base, "digits", "--batch-size", "0"], "batch size must be an integer >= 1, got 0"),
        ([*base, "digits", "--limit", "0"], "limit must be an integer >= 1, got 0"),
        ([*base, "digits", "--bench-batch-sizes", "0"], "batch sizes must be >= 1"),
        ([*base, "digits", "--dtype", "int4"], "dtype must be one of"),
        (["train", "--recipe", tmp_path / "none.yaml", "--out", tmp_path / "o"], "recipe not found"),
        (["eval", "vit_tiny_patch16_224", "--data", "digits", "--bogus"], "No such option"),
    ]
    for args, pattern in cases:
        rc, _, err = cli(*args)
        _one_clean_line(rc, err, pattern)


def test_merge_then_eval_against_the_base(tmp_path, cli, trained_artifact):
    rc, out, err = cli("merge", trained_artifact, "--out", tmp_path / "m", "--target-flops", "0.7", "--backend",
                       "triton")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "m" / "vitcompress.json").read_text())
    assert manifest["transforms"][0]["config"]["backend"] == "triton"
    state = manifest["transforms"][0]["state"]
    assert manifest["transforms"][0]["name"] == "token_merge" and state["flops_fraction"] <= 0.7
    assert manifest["base"]["path"].endswith("tiny")
    rc, _, err = cli("eval", tmp_path / "m", "--data", "digits", "--limit", "40", "--no-speed", "--json",
                     tmp_path / "e.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["reference"]["source"] == str(trained_artifact.resolve())
    assert result["agreement"] >= 80  # bf16 autocast through the fused kernel (100 here; 0 when bf16 was wrong)

    rc, _, err = cli("merge", trained_artifact, "--out", tmp_path / "lowres", "--resolution", "24")
    assert rc == 0, err
    rc, _, err = cli("eval", tmp_path / "lowres", "--data", "digits", "--limit", "40", "--no-speed", "--json",
                     tmp_path / "l.json")
    assert rc == 0, err  # the reference (32 px) gets its own preprocessing
    assert json.loads((tmp_path / "l.json").read_text())["data"]["images"] == 40


def test_merge_bad_settings_fail_in_one_line(tmp_path, cli, trained_artifact):
    out = ["--out", tmp_path / "x"]
    for args, pattern in [
        (["--r", "-1"], "r must be >= 0"),
        (["--method", "evit", "--schedule", "99,0"], "cannot remove 99 tokens in layer 0"),
        ([], "give exactly one of"),
        (["--r", "2", "--keep-rate", "0.5"], "give exactly one of"),
        (["--keep-rate", "0.5"], "is for method evit"),
        (["--target-flops", "0.01"], "out of reach"),
        (["--resolution", "30"], "multiple of the patch size"),
        (["--r", "2", "--backend", "cuda"], "backend must be one of: auto, torch, triton"),
    ]:
        rc, _, err = cli("merge", trained_artifact, *out, *args)
        _one_clean_line(rc, err, pattern)


def test_a_finetuned_non_default_checkpoint_runs_through_every_command(tmp_path, cli):
    """A user's own N-class, non-default-width ViT as a .pth state dict: merge, quantize, prune and sweep."""
    import timm
    import torch

    kw = {"img_size": 32, "patch_size": 8, "num_classes": 7, "embed_dim": 96, "depth": 2, "num_heads": 3}
    torch.save(timm.create_model("vit_tiny_patch16_224", **kw).state_dict(), tmp_path / "mine.pth")
    opts = ["--checkpoint", tmp_path / "mine.pth", "--img-size", "32", "--patch-size", "8", "--num-classes", "7",
            "--model-arg", "embed_dim=96", "--model-arg", "depth=2", "--model-arg", "num_heads=3"]
    for cmd, args in [("merge", ["--r", "2"]), ("quantize", ["--mode", "deploy", "--a-granularity", "per_token"]),
                      ("prune", ["--mlp", "0.25"])]:
        rc, _, err = cli(cmd, "vit_tiny_patch16_224", "--out", tmp_path / cmd, *args, *opts)
        assert rc == 0, err
        assert json.loads((tmp_path / cmd / "vitcompress.json").read_text())["model"]["kwargs"]["embed_dim"] == 96
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(json.dumps({"sweep": {
        "base": {"model": "vit_tiny_patch16_224", "checkpoint": str(tmp_path / "mine.pth"),
                 "kwargs": {k: v for k, v in kw.items()}},
        "eval_data": ["digits"], "eval_limit": 20, "accuracy": "digits:agreement", "calib_data": "digits",
        "bench": {"device": "cpu", "dtype": "fp32", "batch_sizes": [1], "repeat": 1, "warmup": 0, "warmup_s": 0},
        "points": [{"name": "tome", "stack": [{"name": "token_merge", "r": 2}]}]}}))
    rc, _, err = cli("sweep", recipe, "--out", tmp_path / "sw", "--no-report")
    assert rc == 0, err
    assert len(list((tmp_path / "sw" / "points").glob("*.json"))) == 2


def test_eventful_and_minivit_through_the_cli(tmp_path, cli, trained_artifact):
    """Eventful runs video clips (and refuses separate images in one line); MiniViT shares through `prune --share`;
    bad settings fail in one line."""
    rc, _, err = cli("eventful", trained_artifact, "--out", tmp_path / "ev", "--fraction", "0.5")
    assert rc == 0, err
    rc, out, err = cli("eval", tmp_path / "ev", "--data", "video:4:digits", "--no-speed", "--json", tmp_path / "e.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["n_images"] == 4 and res["agreement"] is not None  # clips, against the per-frame base
    _one_clean_line(*cli("eval", tmp_path / "ev", "--data", "digits", "--limit", "8", "--no-speed")[::2], "stateful")
    for args, pattern in [(["--policy", "threshold", "--threshold", "-1"], "threshold must be >= 0"),
                          (["--fraction", "0"], "fraction must be in (0, 1]")]:
        rc, _, err = cli("eventful", trained_artifact, "--out", tmp_path / "x", *args)
        _one_clean_line(rc, err, pattern)
    rc, _, err = cli("prune", trained_artifact, "--out", tmp_path / "mv", "--share", "2")
    assert rc == 0, err
    _one_clean_line(*cli("prune", trained_artifact, "--out", tmp_path / "y", "--share", "3")[::2],
                    "share 3 does not divide the depth 2")


def test_a_timm_id_without_weights_is_refused_unless_random_weights(tmp_path, cli):
    bare = ["--img-size", "32", "--patch-size", "8", "--num-classes", "10"]
    rc, _, err = cli("merge", "vit_tiny_patch16_224", *bare, "--r", "2", "--out", tmp_path / "m")
    _one_clean_line(rc, err, "vit_tiny_patch16_224 would have random weights: pass --pretrained")
    assert not (tmp_path / "m").exists()
    rc, _, err = cli("merge", "vit_tiny_patch16_224", "--random-weights", *bare, "--r", "2", "--out", tmp_path / "m")
    assert rc == 0, err
    assert json.loads((tmp_path / "m" / "vitcompress.json").read_text())["provenance"]["random_weights"] is True


def test_a_backbone_checkpoint_gets_a_fresh_head_with_one_note_line(tmp_path, cli):
    import timm
    from safetensors.torch import save_file

    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}
    sd = timm.create_model("vit_tiny_patch16_224", **kw).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "backbone.safetensors"))
    rc, _, err = cli("merge", "vit_tiny_patch16_224", "--checkpoint", tmp_path / "backbone.safetensors",
                     "--img-size", "48", "--patch-size", "8", "--num-classes", "10", "--model-arg", "embed_dim=64",
                     "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--r", "2", "--out", tmp_path / "m")
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note: ")]
    assert notes == ["note: backbone.safetensors has no classifier: a fresh 10-class head (random weights until "
                     "trained)"], err
    assert "Warning" not in err
    manifest = json.loads((tmp_path / "m" / "vitcompress.json").read_text())
    assert manifest["model"]["kwargs"]["img_size"] == 48


def test_version(cli):
    from vitcompress import __version__

    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"vitcompress {__version__}"


def test_info_and_list(tmp_path, cli, trained_artifact, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps cells to the terminal: the test sets its width
    rc, out, err = cli("merge", trained_artifact, "--r", "2", "--out", tmp_path / "m")
    assert rc == 0, err
    rc, out, err = cli("info", tmp_path / "m")
    assert rc == 0, err
    assert "token_merge v" in out and "ok (SHA-256" in out and "schedule" in out
    rc, _, err = cli("info", tmp_path)
    _one_clean_line(rc, err, "neither a vitcompress artifact")
    rc, out, err = cli("list")
    assert rc == 0, err
    for name in ("token_merge", "quantize", "prune", "eventful", "learned_merge"):
        assert name in out


def test_long_steps_print_plain_progress_lines_when_stderr_is_not_a_terminal(cli, monkeypatch, trained_artifact):
    import re

    import vitcompress.ui as ui

    monkeypatch.setattr(ui, "PLAIN_EVERY_S", 0.0)  # a line at every step (the real interval is a few seconds)
    rc, _, err = cli("eval", trained_artifact, "--data", "digits", "--limit", "96", "--batch-size", "32",
                     "--no-speed")
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if re.match(r"eval digits: \d+/\d+ \([\d.e+]+/s, \d+:\d\d elapsed", ln)]
    assert len(lines) >= 3 and "\x1b[" not in err, err
    # recovery inside a stack (a prune --epochs run, a sweep point) shows its steps too, not only at the end
    rc, _, err = cli("prune", trained_artifact, "--mlp", "0.5", "--epochs", "1", "--data", "digits",
                     "--out", trained_artifact.parent / "pruned_progress")
    assert rc == 0, err
    assert re.search(r"recover epoch 1/1 loss [\d.]+: \d+/\d+ \(", err), err


def test_the_sweep_summary_names_only_the_files_the_report_wrote(tmp_path, capsys, monkeypatch):
    from vitcompress.cli_output import print_fronts

    monkeypatch.setenv("COLUMNS", "300")
    (tmp_path / "report.md").write_text("# r\n")
    (tmp_path / "pareto.json").write_text(json.dumps({"rows": [], "front_latency": [], "failed": [],
                                                       "accuracy_metric": "digits:top1", "reference_batch": 1}))
    print_fronts(tmp_path)
    out = capsys.readouterr().out
    assert "report.md" in out and "pareto.png" not in out and "points.csv" not in out
    (tmp_path / "pareto.png").write_bytes(b"png")
    print_fronts(tmp_path)
    assert "pareto.png" in capsys.readouterr().out


def test_the_top_level_help_is_the_apps_and_loads_no_torch():
    """`vitcompress`, `--help` and `--version` answer from vitcompress.entry (no torch, no timm); its command table
    is the real app's."""
    import subprocess
    import sys

    import typer

    from vitcompress.cli import app
    from vitcompress.entry import COMMANDS

    real = [(n, " ".join((c.help or "").split("\n\n")[0].split()))
            for n, c in typer.main.get_command(app).commands.items()]
    assert list(COMMANDS) == real
    probe = ("import sys; sys.argv = ['vitcompress', '{}']\nimport vitcompress.entry as e\ntry:\n    e.run()\n"
             "except SystemExit as x:\n    code = x.code\nprint('torch' in sys.modules, 'timm' in sys.modules, code)")
    for arg in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", probe.format(arg)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "False False 0", r.stderr
    r = subprocess.run([sys.executable, "-m", "vitcompress"], capture_output=True, text=True)
    assert r.returncode == 0 and "Commands:" in r.stdout and "search" in r.stdout and "--install-completion" in r.stdout


def test_shell_completion_completes_commands():
    """What bash's completion function asks (`--install-completion` installs that function)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "_VITCOMPRESS_COMPLETE": "complete_bash", "COMP_WORDS": "vitcompress mer", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-m", "vitcompress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.split() == ["merge"], r.stderr


@pytest.mark.parametrize("command", ["eval", "search", "quantize"])
def test_data_help_lists_every_spec_and_options_show_their_defaults(cli, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "400")
    rc, out, _ = cli(command, "--help")
    text = " ".join(out.split())
    assert rc == 0 and all(s in text for s in ("cifar10-c[:SOURCE]", "heldout:N:SOURCE", "video:[N:]SOURCE", "hf:"))
    if command == "search":
        assert "(default: 1.0)" in text and "(default: top1)" in text  # max_drop, metric


def test_calibration_each_step_and_the_export_report_progress_in_plain_lines(cli, tmp_path, monkeypatch):
    import re

    from vitcompress import ui

    monkeypatch.setattr(ui, "PLAIN_EVERY_S", 0.0)
    rc, _, err = cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--mode", "deploy", "--calib-data", "digits",
                     "--calib-size", "16", "--out", tmp_path / "q")
    assert rc == 0, err
    assert re.search(r"calibrate \(images\): \d+/16 \(", err) and re.search(r"compress: quantize: 1/1 \(", err), err
    rc, _, err = cli("export", tmp_path / "q", "--out", tmp_path / "q.onnx")
    assert rc == 0, err
    assert f"export: onnx to {tmp_path / 'q.onnx'} ..." in err and re.search(r"export: onnx to .*: done in \d", err)
    assert "\x1b[" not in err


def test_eval_marks_a_random_weight_model(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    rc, _, err = cli("merge", "vit_tiny_patch16_224", *TINY_ARGS, "--r", "1", "--out", tmp_path / "m")
    assert rc == 0, err
    rc, out, err = cli("eval", tmp_path / "m", "--data", "synthetic:8", "--no-speed")
    assert rc == 0 and "RANDOM WEIGHTS" in out, err

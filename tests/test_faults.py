"""Faults, with real processes: a writer killed at the instants that matter, two writers on one --out, a full disk
(``ulimit -f``). Each ends with one complete artifact, the previous one intact, or nothing, plus a one-line error
where a command fails."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY

from vitcompress import create_model, load_artifact, model_info, save_artifact
from vitcompress.artifact import MANIFEST, only_own_files, version_dir

TINY_ARGS = ["--random-weights", "--img-size", "32", "--patch-size", "8", "--num-classes", "10",
             "--model-arg", "embed_dim=64",
             "--model-arg", "depth=2", "--model-arg", "num_heads=2"]
QUANT = ["--calib-data", "digits", "--calib-size", "8"]


def _cli(*args, env=None, timeout=300, preexec_fn=None):
    """Run ``vitcompress ARGS`` in a fresh process: (exit code, stderr)."""
    r = subprocess.run([sys.executable, "-m", "vitcompress", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
    return r.returncode, r.stderr


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len([line for line in err.splitlines() if line.strip()]) == 1


def _logits(model):
    with torch.inference_mode():
        return model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


@pytest.fixture
def previous(tmp_path):
    """An existing artifact at OUT (the previous version a replacing writer must not lose) and its logits."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", **TINY)
    save_artifact(model, tmp_path / "out")
    return tmp_path / "out", _logits(model)


@pytest.mark.parametrize("instant", ["weights", "manifest"])
def test_a_writer_killed_before_its_commit_leaves_the_previous_artifact(previous, instant):
    out, before = previous
    rc, _ = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT,
                 env={"VITCOMPRESS_CRASH_AT": instant})
    assert rc == -9  # killed, as by kill -9
    assert torch.equal(_logits(load_artifact(out)), before)  # the previous artifact, intact and verified
    rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT)  # the re-run proceeds
    assert rc == 0, err
    assert load_artifact(out) is not None and len([p for p in out.iterdir() if p.name.startswith(".v-")]) == 1


def test_a_writer_killed_after_its_commit_leaves_the_new_artifact(previous):
    out, before = previous
    rc, _ = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT,
                 env={"VITCOMPRESS_CRASH_AT": "committed"})
    assert rc == -9
    model = load_artifact(out)
    assert [t["name"] for t in model_info(model).transforms] == ["quantize"]  # the new one, complete
    assert not torch.equal(_logits(model), before)


def test_a_new_out_killed_mid_write_can_be_rerun(tmp_path):
    out = tmp_path / "new"
    rc, _ = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT,
                 env={"VITCOMPRESS_CRASH_AT": "weights"})
    assert rc == -9 and out.is_dir() and only_own_files(out) and not (out / MANIFEST).exists()
    rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT)
    assert rc == 0, err
    load_artifact(out)


def test_a_second_writer_on_the_same_out_is_refused(previous):
    out, before = previous
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from vitcompress.artifact import writer_lock
        with writer_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT, "--w-bits", "6")
        assert rc != 0 and _one_line(err) and "being written by another vitcompress process" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert torch.equal(_logits(load_artifact(out)), before)


def test_a_failed_command_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "never"
    rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, "--w-bits", "1", *QUANT)
    assert rc != 0 and _one_line(err)
    assert not out.exists()


def test_a_user_folder_is_still_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", tmp_path / "mine", *QUANT)
    assert rc != 0 and _one_line(err) and "not a vitcompress artifact" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _file_size_limit(nbytes: int):
    """``ulimit -f``: writes past ``nbytes`` fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_a_full_disk_is_a_one_line_error_and_loses_nothing(previous, tmp_path):
    out, before = previous
    rc, err = _cli("quantize", "vit_tiny_patch16_224", *TINY_ARGS, "--out", out, *QUANT, "--mode", "simulate",
                   preexec_fn=_file_size_limit(64 * 1024))
    assert rc != 0 and _one_line(err) and "cannot write" in err and str(out) in err, err
    assert torch.equal(_logits(load_artifact(out)), before)


@pytest.mark.parametrize("cmd", ["eval", "export"])
def test_other_writes_on_a_full_disk_are_one_line_errors(cmd, previous, tmp_path):
    out, _ = previous
    target = tmp_path / ("e.json" if cmd == "eval" else "m.onnx")
    args = ["eval", out, "--data", "synthetic:4", "--no-speed", "--json", target] if cmd == "eval" else \
        ["export", out, "--out", target]
    rc, err = _cli(*args, preexec_fn=_file_size_limit(512))
    assert rc != 0 and _one_line(err) and "cannot write" in err, err
    assert not target.exists()


def test_an_artifacts_version_folder_is_named_by_its_manifest_link(previous):
    out, _ = previous
    assert (out / MANIFEST).is_symlink() and version_dir(out).parent == out


def _read_only_run(ro_dir, *args):
    """``vitcompress ARGS`` with ``ro_dir`` mounted read-only (a private mount namespace: EROFS on any write)."""
    import shlex
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    cmd = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "vitcompress", *args))
    d = shlex.quote(str(ro_dir))
    script = f"mount --bind {d} {d} && mount -o remount,ro,bind {d} || exit 97; exec {cmd}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if r.returncode == 97:
        pytest.skip("this machine does not allow a private read-only bind mount")
    return r.returncode, r.stderr


@pytest.mark.parametrize("cmd", ["quantize", "merge", "prune", "eval", "sweep", "report", "export"])
def test_a_read_only_folder_is_a_one_line_error(cmd, trained_artifact, tmp_path):
    import yaml

    ro = tmp_path / "ro"
    ro.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"sweep": {
        "base": {"artifact": str(trained_artifact)}, "eval_data": ["digits"], "eval_limit": 16,
        "accuracy": "digits:top1", "bench": {"device": "cpu", "batch_sizes": [1], "warmup": 0, "warmup_s": 0,
                                             "repeat": 1}, "points": [{"name": "tome", "stack": [
                                                 {"name": "token_merge", "r": 1}]}]}}))
    if cmd == "report":  # a finished sweep, then its folder goes read-only
        assert _cli("sweep", recipe, "--out", ro / "s", "--no-report")[0] == 0
    args = {
        "quantize": ["quantize", trained_artifact, "--out", ro / "q", *QUANT],
        "merge": ["merge", trained_artifact, "--r", "1", "--out", ro / "m"],
        "prune": ["prune", trained_artifact, "--mlp", "0.5", "--out", ro / "p"],
        "eval": ["eval", trained_artifact, "--data", "digits", "--limit", "8", "--no-speed", "--json", ro / "e.json"],
        "sweep": ["sweep", recipe, "--out", ro / "s"],
        "report": ["report", ro / "s"],
        "export": ["export", trained_artifact, "--out", ro / "m.onnx"],
    }[cmd]
    rc, err = _read_only_run(ro, *args)
    assert rc != 0 and _one_line(err) and ("Read-only file system" in err or "cannot write" in err), err

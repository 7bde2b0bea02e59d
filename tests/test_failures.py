"""Fail early and clearly, and never lose a computed result: every bad input or fault a user can
cause gives either a correct run or one clear message before any computation, and rows already in
the results file stay intact. (Issue: "Fail early and clearly, and never lose a computed result".)"""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT
from qwt.errors import ConfigError
from qwt.results import append_row, read_rows
from test_framework import run_py

FAST = ["data.val_subset=60", "runtime.threads=1", "compensation.qwt.num_samples=32", "compensation.qwt_v2.num_samples=32"]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def no_compute(monkeypatch):
    """Any evaluation (the first computation of a run) fails the test: errors must come before."""
    from qwt.tasks.classification import ClassificationTask

    def boom(*a, **k):
        raise AssertionError("computation started before the error")

    monkeypatch.setattr(ClassificationTask, "evaluate", boom)


def expect_config_error(tmp_path, *overrides, match):
    from qwt.runner import run

    results = tmp_path / "rows.jsonl"
    keep = json.dumps({"config_key": "earlier", "compensation": "none", "metrics": {"top1": 1.0}, "fp_metrics": {"top1": 2.0}}) + "\n"
    if not results.exists():
        results.write_text(keep)
    before = results.read_text()
    with pytest.raises(ConfigError, match=match):
        run(cfg(f"results.path={results}", *overrides))
    assert results.read_text() == before  # nothing lost, nothing added


# ---------------------------------------------------------------------------------------------
# options validated before any computation


@pytest.mark.parametrize("overrides,match", [
    (["bits.w=0"], r"bits\.w=0"),
    (["bits.w=33"], r"bits\.w=33"),
    (["bits.a=-1"], r"bits\.a=-1"),
    (["runtime.eval_batch_size=0"], r"runtime\.eval_batch_size=0"),
    (["compensation.variants=[]"], r"compensation\.variants=\[\] must be a non-empty list"),
    (["compensation.variants=qwt"], r"compensation\.variants='qwt' is a string.*\[qwt\]"),
    (["compensation=_methods"], r"compensation=_methods is the shared settings file"),
    (["compensation.variants=[none,none]"], r"lists 'none' twice"),
    (["compensation.qwt.num_samples=-5"], r"compensation\.qwt\.num_samples=-5 must be >= 1"),
    (["ptq.num_samples=-5"], r"ptq\.num_samples=-5 must be >= 1"),
    (["compensation.qwt.num_samples=0"], r"compensation\.qwt\.num_samples=0 must be >= 1"),
    (["compensation.qwt.num_samples=100000"], r"compensation\.qwt\.num_samples=100000 but the calibration data .* has \d+ samples"),
    (["ptq.num_samples=100000"], r"ptq\.num_samples=100000 but"),
    (["data.val_subset=0"], r"data\.val_subset=0 must be >= 1"),
    (["ptq=fp", "compensation=qwt"], r"ptq=fp .* nothing to compensate"),
    (["logger=wandb", "logger.mode=invalid"], r"logger\.mode='invalid' is not a W&B mode"),
])
def test_bad_options_fail_before_compute(tmp_path, no_compute, overrides, match):
    expect_config_error(tmp_path, *overrides, match=match)


def test_wandb_environment_and_paths_fail_before_compute(tmp_path, no_compute, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "invalid")
    expect_config_error(tmp_path, "logger=wandb", match=r"WANDB_MODE='invalid'")
    monkeypatch.delenv("WANDB_MODE")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    expect_config_error(tmp_path, "logger=wandb", f"logger.dir={blocker}/sub", match=r"logger\.dir=.* is not writable")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    expect_config_error(tmp_path, "logger=wandb", "logger.mode=online", match=r"online needs a W&B API key")


def test_unwritable_results_path_fails_before_compute(tmp_path, no_compute):
    from qwt.runner import run

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"results\.path=.* is not writable"):
        run(cfg(f"results.path={blocker}/rows.jsonl"))


def _imagenet(root, train_classes, val_classes, flat=False):
    from PIL import Image

    for split, classes in (("train", train_classes), ("val", val_classes)):
        (root / split).mkdir(parents=True)
        if flat:
            Image.new("RGB", (8, 8)).save(root / split / "a.JPEG")
            continue
        for c in classes:
            (root / split / c).mkdir()
            Image.new("RGB", (8, 8)).save(root / split / c / "a.JPEG")


def test_imagenet_layouts_are_checked(tmp_path, no_compute):
    flat = tmp_path / "flat"
    _imagenet(flat, [], [], flat=True)
    expect_config_error(tmp_path, "+exp=deit_w4a4", f"data.root={flat}", match=r"must hold one folder per class.*images lie directly")
    other = tmp_path / "other"
    _imagenet(other, ["n01", "n02"], ["n01", "n03"])
    expect_config_error(tmp_path, "+exp=deit_w4a4", f"data.root={other}", match=r"same class folders.*only in train/: \['n02'\]")


def test_corrupt_or_foreign_checkpoint_is_one_message(tmp_path, no_compute):
    root = tmp_path / "imagenet"
    _imagenet(root, ["n01"], ["n01"])
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    small = ["ptq.num_samples=1", "compensation=none"]  # a one-image dataset
    expect_config_error(tmp_path, "+exp=deit_w4a4", f"data.root={root}", f"model.checkpoint={bad}", *small,
                        match=r"model\.checkpoint=.* is not a readable weights file")
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3), "fc.weight": torch.zeros(10, 2)}, foreign)
    expect_config_error(tmp_path, "+exp=deit_w4a4", f"data.root={root}", f"model.checkpoint={foreign}", *small,
                        match=r"does not fit model\.timm_name=deit_tiny.*missing keys")


def test_corrupt_checkpoint_from_the_command_line_has_no_traceback(tmp_path):
    root = tmp_path / "imagenet"
    _imagenet(root, ["n01"], ["n01"])
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00" * 100)
    r = run_py("+exp=deit_w4a4", f"data.root={root}", f"model.checkpoint={bad}", "ptq.num_samples=1", "compensation=none",
               f"results.path={tmp_path}/r.jsonl",
               f"hydra.run.dir={tmp_path}/run", timeout=180)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "model.checkpoint" in r.stderr


# ---------------------------------------------------------------------------------------------
# the results file


def test_results_file_with_junk_lines_is_read_past(tmp_path):
    from qwt.runner import run

    results = tmp_path / "rows.jsonl"
    junk = '42\n{"config_key": "x", "compensation": "none", "metrics": {}}\n["a", "list"]\n'
    results.write_text(junk)
    rows = run(cfg(f"results.path={results}", "compensation=none", *FAST))
    assert len(rows) == 1
    text = results.read_text()
    assert text.startswith(junk)  # the junk lines are kept as they were, the new row after them
    assert [r["compensation"] for r in read_rows(results)] == ["none"]


def _append_same_key(path, n):
    for _ in range(n):
        append_row(path, {"config_key": "same", "compensation": "none", "metrics": {}, "fp_metrics": {}})


def test_the_same_key_is_never_written_twice_by_concurrent_writers(tmp_path):
    path = tmp_path / "rows.jsonl"
    procs = [mp.get_context("fork").Process(target=_append_same_key, args=(path, 5)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(path.read_text().splitlines()) == 1


def test_recompute_replaces_its_row_instead_of_duplicating(tmp_path):
    path = tmp_path / "rows.jsonl"
    row = {"config_key": "k", "compensation": "none", "metrics": {"top1": 1.0}, "fp_metrics": {}}
    other = dict(row, config_key="other")
    append_row(path, row)
    append_row(path, other)
    assert not append_row(path, dict(row, metrics={"top1": 2.0}))  # default: the finished row stands
    assert append_row(path, dict(row, metrics={"top1": 3.0}), replace=True)
    rows = read_rows(path)
    assert [(r["config_key"], r["metrics"].get("top1")) for r in rows] == [("other", 1.0), ("k", 3.0)]


def test_base_row_is_shared_by_every_variant_list(tmp_path):
    """compensation=none,qwt in a sweep (or [none] then [none,qwt]): one base row, not two."""
    from qwt.runner import run

    results = tmp_path / "rows.jsonl"
    run(cfg(f"results.path={results}", "compensation=none", *FAST))
    run(cfg(f"results.path={results}", "compensation=qwt", *FAST))
    rows = read_rows(results)
    assert sorted(r["compensation"] for r in rows) == ["none", "qwt"]
    keys = [r["config_key"] for r in rows]
    assert len(set(keys)) == len(keys)
    # and a method's settings are not part of another variant's key
    run(cfg(f"results.path={results}", "compensation=qwt", "compensation.qft.epochs=9", *FAST))
    assert len(read_rows(results)) == 2


# ---------------------------------------------------------------------------------------------
# logging never costs a result


def test_a_failing_tracker_leaves_every_row_in_the_file_and_replay_logs_them(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from qwt import tracking
    from qwt.runner import run

    calls = {"n": 0}

    def broken(self, row):
        calls["n"] += 1
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(tracking.WandbLogger, "_log", broken)
    results = tmp_path / "rows.jsonl"
    rows = run(cfg(f"results.path={results}", "compensation.variants=[none,qwt]", "logger=wandb",
                   f"logger.dir={tmp_path}/wandb", *FAST))
    assert len(rows) == 2 and len(read_rows(results)) == 2
    err = capsys.readouterr().err
    assert err.count("W&B logging failed") == 1 and "replay_wandb.py" in err  # reported once
    assert calls["n"] == 1  # no further attempts in this run
    assert tracking.logged_keys(results) == set()
    monkeypatch.undo()
    sys.path.insert(0, str(ROOT / "tools"))
    import replay_wandb

    assert replay_wandb.main(["--results", str(results), "--dir", str(tmp_path / "wandb")]) == 0
    assert tracking.logged_keys(results) == {r["config_key"] for r in read_rows(results)}
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 2
    assert replay_wandb.main(["--results", str(results), "--dir", str(tmp_path / "wandb")]) == 0  # nothing left


# ---------------------------------------------------------------------------------------------
# sweeps go on; interrupts are clean


def test_a_failing_job_does_not_end_the_sweep(tmp_path):
    results = tmp_path / "rows.jsonl"
    r = run_py("ptq=fp,rtn", "compensation=qwt", f"results.path={results}", f"hydra.sweep.dir={tmp_path}/sweep", *FAST,
               multirun=True)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: ptq=fp (no quantization) has nothing to compensate" in r.stderr
    assert "1 job(s) of the sweep failed" in r.stderr and "Traceback" not in r.stderr
    assert sorted(x["compensation"] for x in read_rows(results)) == ["none", "qwt"]  # job 1 ran


def test_sigint_stops_with_one_line_and_keeps_the_rows(tmp_path):
    results = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(ROOT / "run.py"), f"results.path={results}", f"hydra.run.dir={tmp_path}/run",
           "compensation.variants=[none,qft]", "compensation.qft.epochs=200", *FAST]  # QFT runs for minutes: the signal always lands in it
    # a test runner started in the background (``cmd &`` in a script) ignores SIGINT, and an ignored
    # signal stays ignored across exec: give the child the default disposition, as a terminal would
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while time.time() - t0 < 240 and (not results.exists() or not results.read_text().strip()):
        time.sleep(0.5)
    assert results.exists(), "the base row was never written"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "interrupted: 1 result row(s)" in err and "run the same command again" in err
    assert [x["compensation"] for x in read_rows(results)] == ["none"]


def test_hist_w8a8_says_which_bits_it_runs(tmp_path, capsys):
    from qwt.runner import run

    run(cfg(f"results.path={tmp_path}/r.jsonl", "ptq=hist_w8a8", "compensation=none", *FAST))
    out = capsys.readouterr().out
    assert "ptq=hist_w8a8 is the method" in out and "bits=w4a4" in out and "bits=w8a8" in out
    assert "bits=w8a8" in (ROOT / "configs" / "ptq" / "hist_w8a8.yaml").read_text()

"""The experiment framework: config composition, result rows (atomic append, resume), clear
errors, multirun + resume through run.py, W&B offline, environment files in step."""
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qwt.results import append_row, config_key, read_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXPS = sorted(p.stem for p in (CONFIGS / "exp").glob("*.yaml"))


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_embedded_experiment():
    cfg = compose_cfg([])
    assert cfg.model.name == "embedded_vit" and cfg.data.name == "digits_wild"
    assert (cfg.bits.w, cfg.bits.a) == (4, 4) and cfg.ptq.name == "repq_vit"
    # by default every stage-2 method the framework has
    from qwt.compensation import METHODS

    variants = set(cfg.compensation.variants)
    assert "none" in variants and {m for v in variants for m in v.split("+")} - {"none"} == set(METHODS)


def test_exp_files_cover_every_imagenet_row_group():
    expected = {"deit_w4a4", "deit_w6a6", "deit_dist_w4a4", "deit_dist_w6a6", "vit_w4a4", "vit_w6a6",
                "swin_w4a4", "swin_w6a6", "resnet_w4a4", "resnet_w6a6", "resnet_w4a8", "w8a8_hist"}
    assert expected <= set(EXPS)


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp):
    cfg = compose_cfg([f"+exp={exp}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    if c["task"] != "classification":  # other families test their own exp files
        return
    assert c["exp_name"] == exp and c["data"]["name"] == "imagenet" and c["model"]["source"] == "timm"
    bits = "w8a8" if exp == "w8a8_hist" else exp.rsplit("_", 1)[-1]
    assert f"w{c['bits']['w']}a{c['bits']['a']}" == bits
    assert c["compensation"]["qwt_star"]["lr"] == 5e-7  # the paper's setting, not the embedded one
    assert c["compensation"]["qwt"]["num_samples"] == 512 and c["ptq"]["num_samples"] == 32
    expected_ptq = "percentile" if exp.startswith("resnet") else "hist_w8a8" if exp == "w8a8_hist" else "repq_vit"
    assert c["ptq"]["name"] == expected_ptq


def test_paper_setting_for_deit_w4a4():
    c = OmegaConf.to_container(compose_cfg(["+exp=deit_w4a4"]), resolve=True)
    assert c["model"]["timm_name"].startswith("deit_tiny_patch16_224")
    assert c["compensation"]["variants"] == ["none", "qwt", "qwt_v2"]
    assert c["model"]["preprocess"]["crop_pct"] == 0.875 and c["model"]["preprocess"]["interpolation"] == "bicubic"


@pytest.mark.parametrize("model,mean,crop", [("vit_b", 0.5, 0.9), ("swin_t", 0.485, 0.9), ("deit_b", 0.485, 0.875)])
def test_per_family_preprocessing(model, mean, crop):
    c = OmegaConf.to_container(compose_cfg(["+exp=deit_w4a4", f"model={model}"]), resolve=True)
    assert c["model"]["preprocess"]["mean"][0] == mean and c["model"]["preprocess"]["crop_pct"] == crop


# ---------------------------------------------------------------------------------------------
# result rows


def test_config_key_ignores_where_results_go_but_not_what_is_computed():
    c = OmegaConf.to_container(compose_cfg([]), resolve=True)
    k = config_key(c, "qwt")
    c2 = json.loads(json.dumps(c))
    c2["results"]["path"] = "/elsewhere.jsonl"
    c2["runtime"]["num_workers"] = 7
    assert config_key(c2, "qwt") == k
    c2["bits"]["w"] = 6
    assert config_key(c2, "qwt") != k
    assert config_key(c, "qwt_v2") != k


def _writer(path, worker, n):
    for i in range(n):
        append_row(path, {"worker": worker, "i": i, "payload": "x" * 5000})


def test_append_row_is_atomic_under_concurrent_writers(tmp_path):
    path = tmp_path / "rows.jsonl"
    procs = [mp.get_context("fork").Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 160
    rows = [json.loads(l) for l in lines]  # every line is a whole row
    assert sorted((r["worker"], r["i"]) for r in rows) == [(w, i) for w in range(4) for i in range(40)]


def row(key, **extra):
    return {"config_key": key, "compensation": "none", "metrics": {"top1": 1.0}, "fp_metrics": {"top1": 2.0}, **extra}


def test_truncated_last_line_is_skipped_and_not_glued_to_the_next_row(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    append_row(path, row("a"))
    with open(path, "a") as f:
        f.write('{"b": 2, "cut')  # a crash mid-write
    append_row(path, row("c"))
    rows = read_rows(path)
    assert [r["config_key"] for r in rows] == ["a", "c"]
    assert "skipping" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# run.py end to end (subprocesses; the embedded model is trained once and cached)


def run_py(*overrides, multirun=False, timeout=600):
    cmd = [sys.executable, str(ROOT / "run.py")] + (["-m"] if multirun else []) + list(overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_multirun_writes_rows_and_rerun_skips_them(tmp_path):
    rows = tmp_path / "rows.jsonl"
    common = [f"results.path={rows}", "compensation=none", "data.val_subset=500", f"hydra.sweep.dir={tmp_path}/multirun"]
    r = run_py("bits=w4a4,w6a6", *common, multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    first = read_rows(rows)
    assert len(first) == 2
    assert {(x["w_bits"], x["a_bits"]) for x in first} == {(4, 4), (6, 6)}
    for x in first:  # the row schema of the issue
        for key in ("run_id", "exp", "task", "model", "dataset", "w_bits", "a_bits", "ptq", "compensation", "metrics",
                    "fp_metrics", "timings", "extra_params", "model_size_mb", "peak_mem_mb", "seed", "git_sha",
                    "versions", "config", "finished_at"):
            assert key in x, key
        assert set(x["timings"]) >= {"ptq_s", "compensation_s", "eval_s"}
        assert 0 <= x["metrics"]["top1"] <= 100 and {"agreement", "logit_mse", "logit_kl"} <= set(x["metrics"])
        assert x["versions"]["torch"] and x["config"]["bits"]["w"] == x["w_bits"]
    r = run_py("bits=w4a4,w6a6", *common, multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_rows(rows)) == 2, "a re-run must skip finished rows"
    assert "nothing to do" in r.stdout
    r = run_py("bits=w4a4", "results.skip_finished=false", *common[:3], f"hydra.run.dir={tmp_path}/run")
    # recomputed: the w4a4 row is replaced by the new one (a key is never in the file twice)
    again = read_rows(rows)
    assert r.returncode == 0 and len(again) == 2
    new = next(x for x in again if x["w_bits"] == 4)
    old = next(x for x in first if x["w_bits"] == 4)
    assert new["config_key"] == old["config_key"] and new["run_id"] != old["run_id"]


def test_missing_imagenet_names_data_root_and_layout(tmp_path):
    r = run_py("+exp=deit_w4a4", f"results.path={tmp_path}/r.jsonl", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert r.returncode == 2
    assert "data.root" in r.stderr and "train/" in r.stderr and "val/" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_missing_checkpoint_names_model_checkpoint(tmp_path):
    root = tmp_path / "imagenet"
    from PIL import Image

    for split in ("train", "val"):
        (root / split / "n0").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "n0" / "a.JPEG")
    r = run_py("+exp=deit_w4a4", f"data.root={root}", f"model.checkpoint={tmp_path}/nope.pth",
               f"results.path={tmp_path}/r.jsonl", f"hydra.run.dir={tmp_path}/run", timeout=120)
    assert r.returncode == 2 and "model.checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_print_resolved_config():
    r = run_py("--cfg", "job", "+exp=swin_w6a6", timeout=60)
    assert r.returncode == 0
    c = yaml.safe_load(r.stdout)
    assert c["model"]["name"] == "swin_t" and c["bits"]["a"] == 6


def test_wandb_offline_run_directory_is_produced(tmp_path):
    pytest.importorskip("wandb")
    r = run_py("logger=wandb", f"logger.dir={tmp_path}", "compensation=none", "bits=w8a8", "data.val_subset=200",
               f"results.path={tmp_path}/r.jsonl", f"hydra.run.dir={tmp_path}/run", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), list(tmp_path.rglob("*"))[:20]


# ---------------------------------------------------------------------------------------------


def test_environment_yml_and_pyproject_agree():
    import tomllib

    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = py["dependencies"] + [d for extra in py["optional-dependencies"].values() for d in extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip = [p for p in pip if not p.startswith("-e")]
    assert sorted(pip) == sorted(deps)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
    assert "bash scripts/run_default.sh" in readme

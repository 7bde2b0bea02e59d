"""torchrun (gloo, CPU, 2 processes) gives the same results as one process.

(a) the whole pipeline (run.py: embedded ViT, RTN W4A4, variants none/qwt/qwt_v2): identical
    metrics and fp_metrics rows;
(b) StreamingLeastSquares: each rank updates with its half of the rows, all_reduce(), solve ==
    one process with all rows (1e-10 relative);
(c) QwT apply with sharded calibration (train transform): the same branch weights as one process
    (1e-6 relative). The model runs in float64 here: in float32, 1-ulp differences in a fitted branch
    (float64 sums in another order, rounded to float32) change the next block's input by an ulp,
    which occasionally flips a 4-bit activation rounding; that cascades, so deep blocks' weights
    are not bit-comparable across world sizes even though metrics are (checked by (a)).

All child processes start together (one module fixture) so the suite pays the start-up of
torch / Hydra once in wall time; children run with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 300

PIPELINE_OVERRIDES = [
    "model=embedded_vit", "data=digits_wild", "ptq=rtn", "bits=w4a4", "logger=none",  # stage 1 is not sharded: RTN keeps it cheap
    "compensation.variants=[none,qwt,qwt_v2]",
    "compensation.qwt.num_samples=128", "compensation.qwt_v2.num_samples=128",
    "data.val_subset=200", "runtime.threads=1", "runtime.device=cpu", "results.skip_finished=false",
    "hydra.output_subdir=null",
]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if "QWT_CACHE" in os.environ:  # share the embedded model cache (inherited anyway; explicit on purpose)
        env["QWT_CACHE"] = os.environ["QWT_CACHE"]
    return env


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]


class Launch:
    def __init__(self, name: str, cmd: list[str], cwd: Path, log: Path):
        self.name, self.cmd, self.log = name, cmd, log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self):
        try:
            rc = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in {TIMEOUT_S}s; log tail:\n{self.tail()}")
        self.fh.flush()
        if rc != 0:
            pytest.fail(f"{self.name} exited with {rc}: {' '.join(self.cmd)}\nlog tail:\n{self.tail()}")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the launcher and its ranks
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.fh.close()

    def tail(self, n=4000):
        return self.log.read_text()[-n:]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Start every child at once; tests wait on the ones they need."""
    ensure_embedded_data()
    tmp = tmp_path_factory.mktemp("dist")
    run_py = ROOT / "run.py"
    common = [*PIPELINE_OVERRIDES]
    out = {
        "pipe1": Launch("run.py (1 process)", [sys.executable, str(run_py), *common, f"results.path={tmp}/rows1.jsonl", f"hydra.run.dir={tmp}/hydra1"], tmp, tmp / "pipe1.log"),
        "pipe2": Launch("torchrun run.py (2 processes)", torchrun(run_py, *common, f"results.path={tmp}/rows2.jsonl", f"hydra.run.dir={tmp}/hydra2"), tmp, tmp / "pipe2.log"),
        "work1": Launch("dist_worker.py qwt (1 process)", [sys.executable, str(WORKER), "qwt", tmp / "w"], tmp, tmp / "work1.log"),
        "work2": Launch("torchrun dist_worker.py lstsq,qwt (2 processes)", torchrun(WORKER, "lstsq,qwt", tmp / "w"), tmp, tmp / "work2.log"),
    }
    out["tmp"] = tmp
    yield out
    for k, v in out.items():
        if k != "tmp":
            v.kill()


def ensure_embedded_data():
    """Generate / cache the embedded benchmark once before four processes would all do it."""
    from conftest import embedded_data_cfg, embedded_model_cfg

    from qwt.tasks.classification import build_data

    build_data(embedded_data_cfg(), embedded_model_cfg("embedded_vit"))


def load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def read_rows(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["compensation"]: r for r in rows}


def test_torchrun_pipeline_matches_single_process(launches):
    t0 = time.time()
    launches["pipe1"].wait()
    launches["pipe2"].wait()
    tmp = launches["tmp"]
    one, two = read_rows(tmp / "rows1.jsonl"), read_rows(tmp / "rows2.jsonl")
    assert sorted(one) == sorted(two) == ["none", "qwt", "qwt_v2"]
    for v in one:
        a, b = one[v], two[v]
        assert a["world_size"] == 1 and b["world_size"] == 2
        # counts are exact; the logit distances are float64 sums reduced across ranks (summation order)
        exact = ("top1", "agreement")
        assert {k: a["metrics"][k] for k in exact} == {k: b["metrics"][k] for k in exact}, (v, a["metrics"], b["metrics"])
        for k in ("logit_mse", "logit_kl"):
            assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-9, abs=1e-12), (v, k, a["metrics"], b["metrics"])
        assert a["fp_metrics"] == b["fp_metrics"]
        assert a["extra_params"] == b["extra_params"]
    r2_1, r2_2 = one["qwt"]["compensation_info"]["qwt"]["r2"], two["qwt"]["compensation_info"]["qwt"]["r2"]
    assert len(r2_1) == len(r2_2) and all(abs(x - y) < 1e-4 for x, y in zip(r2_1, r2_2)), (r2_1, r2_2)
    assert one["qwt_v2"]["compensation_info"] == two["qwt_v2"]["compensation_info"]
    print(f"waited {time.time() - t0:.1f}s")


def test_streaming_lstsq_all_reduce_matches_single_process(launches):
    from qwt.compensation.lstsq import StreamingLeastSquares

    w = load_worker()
    X, R = w.lstsq_rows()
    ref = StreamingLeastSquares(w.LSTSQ_D_IN, w.LSTSQ_D_OUT)
    for s in range(0, X.shape[0], 500):  # one process, all rows, other chunking
        ref.update(X[s : s + 500], R[s : s + 500])
    W, b = ref.solve(1e-6)
    launches["work2"].wait()
    for r in (0, 1):
        got = torch.load(launches["tmp"] / "w" / f"lstsq-ws2-rank{r}.pt", weights_only=False)
        assert got["n"] == X.shape[0]
        assert rel(got["G"], ref.G) < 1e-12 and rel(got["C"], ref.C) < 1e-12
        assert rel(got["W"], W) < 1e-10, rel(got["W"], W)
        assert rel(got["b"], b) < 1e-10, rel(got["b"], b)
        assert abs(got["r2"] - ref.r2(W, b)) < 1e-10


def test_qwt_sharded_calibration_matches_single_process(launches):
    launches["work1"].wait()
    launches["work2"].wait()
    d = launches["tmp"] / "w"
    one = torch.load(d / "qwt-ws1-rank0.pt", weights_only=False)
    r0 = torch.load(d / "qwt-ws2-rank0.pt", weights_only=False)
    r1 = torch.load(d / "qwt-ws2-rank1.pt", weights_only=False)
    assert r0["n_local"] + r1["n_local"] == one["n_local"] and r0["n_local"] < one["n_local"]  # really sharded
    assert one["branches"], "no block was compensated: the test would compare nothing"
    assert sorted(one["branches"]) == sorted(r0["branches"]) == sorted(r1["branches"])
    for name, params in one["branches"].items():
        for k, ref in params.items():
            for got in (r0, r1):
                e = rel(got["branches"][name][k], ref)
                assert e < 1e-6, f"{name}.{k}: relative difference {e:.2e}"
    assert all(abs(x - y) < 1e-8 for x, y in zip(one["r2"], r0["r2"]))

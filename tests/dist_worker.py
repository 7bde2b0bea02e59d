"""Helper for tests/test_distributed.py: one script, run either as a plain process (world 1) or
under ``torchrun --nproc_per_node=2`` (gloo, CPU).

    python tests/dist_worker.py lstsq OUT_DIR     # StreamingLeastSquares: each rank its half of the rows
    python tests/dist_worker.py qwt OUT_DIR       # QwT apply with sharded calibration on the embedded ViT
    python tests/dist_worker.py lstsq,qwt OUT_DIR # both, one launch

Every rank writes OUT_DIR/<task>-ws<world>-rank<rank>.pt; the test compares them with world 1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwt import dist  # noqa: E402

LSTSQ_ROWS, LSTSQ_D_IN, LSTSQ_D_OUT, LSTSQ_CHUNK = 3000, 24, 12, 257


def lstsq_rows():
    """Deterministic regression rows (same on every rank): correlated, offset features, noisy targets."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(LSTSQ_D_IN, LSTSQ_D_IN, generator=g, dtype=torch.float64)
    X = torch.randn(LSTSQ_ROWS, LSTSQ_D_IN, generator=g, dtype=torch.float64) @ mix + 3.0
    W = torch.randn(LSTSQ_D_IN, LSTSQ_D_OUT, generator=g, dtype=torch.float64)
    R = X @ W + 0.5 + 0.1 * torch.randn(LSTSQ_ROWS, LSTSQ_D_OUT, generator=g, dtype=torch.float64)
    return X.float(), R.float()  # the solver sees float32 features, as in QwT


def run_lstsq(out: Path):
    from qwt.compensation.lstsq import StreamingLeastSquares

    X, R = lstsq_rows()
    # contiguous halves (rank r of w gets rows [r*N/w, (r+1)*N/w)), fed in uneven chunks
    n = X.shape[0]
    lo, hi = dist.rank() * n // dist.world(), (dist.rank() + 1) * n // dist.world()
    solver = StreamingLeastSquares(LSTSQ_D_IN, LSTSQ_D_OUT)
    for s in range(lo, hi, LSTSQ_CHUNK):
        e = min(hi, s + LSTSQ_CHUNK)
        solver.update(X[s:e], R[s:e])
    solver.all_reduce()
    W, b = solver.solve(1e-6)
    torch.save({"W": W, "b": b, "n": solver.n, "r2": solver.r2(W, b), "G": solver.G, "C": solver.C}, out / f"lstsq-ws{dist.world()}-rank{dist.rank()}.pt")


def run_qwt(out: Path):
    """Embedded ViT, RTN W4A4 (stage 1 on the full calibration set), QwT with sharded calibration."""
    import yaml

    from qwt.compensation import CompContext, method_settings
    from qwt.compensation import qwt as qwt_method
    from qwt.compensation.qwt import QwTBlock
    from qwt.models import adapter_for
    from qwt.models.zoo import build_model
    from qwt.ptq import apply_ptq, get_specs
    from qwt.tasks.classification import build_data, calibration_batches, embedded_data_cfg

    model_cfg = yaml.safe_load((ROOT / "configs" / "model" / "embedded_vit.yaml").read_text())
    comp_cfg = method_settings()["qwt"]
    comp_cfg.update(num_samples=int(os.environ.get("QWT_TEST_CALIB", "128")), batch_size=32,
                    calib_transform=os.environ.get("QWT_TEST_TRANSFORM", "train"))
    device = torch.device("cpu")
    seed = 0
    torch.manual_seed(seed)
    dtype = torch.float64 if os.environ.get("QWT_TEST_DTYPE", "float64") == "float64" else torch.float32
    model = build_model(model_cfg, log=lambda *_: None).to(dtype)
    data = build_data(embedded_data_cfg(), model_cfg)
    fp_adapter = adapter_for(model)
    q_adapter = fp_adapter.clone()

    def calib(n, transform, batch_size, shard=False):
        return [x.to(dtype) for x, _ in calibration_batches(data, n, transform, batch_size, seed, device, shard=shard)]

    batches = calib(32, "train", 32)
    apply_ptq(q_adapter, get_specs("rtn", 4, 4), batches)
    ctx = CompContext(q_adapter, fp_adapter, calib, lambda bs: iter(()), device, log=lambda *_: None)
    info = qwt_method.apply(ctx, comp_cfg)
    branches = {n: {k: v.detach().clone() for k, v in m.branch.state_dict().items()}
                for n, m in q_adapter.model.named_modules() if isinstance(m, QwTBlock)}
    n_local = sum(x.shape[0] for x in calib(comp_cfg["num_samples"], comp_cfg["calib_transform"], 32, shard=True))
    torch.save({"branches": branches, "r2": info["r2"], "n_local": n_local}, out / f"qwt-ws{dist.world()}-rank{dist.rank()}.pt")


def main():
    tasks, out = sys.argv[1].split(","), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    try:
        for t in tasks:
            {"lstsq": run_lstsq, "qwt": run_qwt}[t](out)
        dist.barrier()
    finally:
        if dist.is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

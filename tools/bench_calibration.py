#!/usr/bin/env python
"""QwT fit: our streaming solver vs the reference-style solve, same model, same features, one run.

    python tools/bench_calibration.py                                # default, ~2-3 min on 2 CPU cores
    python tools/bench_calibration.py --sizes 128,256,512,1024,2048  # full sweep (~10 min, ~1.3 GB of features in --workdir; ref peaks near 5 GB)

Model: a timm ViT with ViT-S / DeiT-S dimensions (--dim 384, --tokens 197 = 14x14 patches + cls,
--heads dim/64) and RANDOM weights, quantized W4A4 with RTN (qwt.ptq, 8-bit patch embedding /
head). Features are those of one block (--block, default 0): X = the block's input on the
quantized path, R = block_FP(X) - block_Q(X), exactly what qwt/compensation/qwt.py regresses.
Images are random (N(0,1) pixels). Calibration size N images -> N * tokens regression rows.

Compared, for each N:
  ours  StreamingLeastSquares (qwt/compensation/lstsq.py): update() once per feature chunk of
        --batch images (float64 sufficient statistics), Cholesky solve (relative ridge, default
        1e-6 as in configs/compensation/_methods.yaml), R^2 from the statistics.
  ref   the QwT reference code's lienar_regression(): torch.cat every feature chunk into X (N*T x d)
        and R, append a ones column, W = torch.inverse(X1^T X1) @ X1^T @ R (evaluated left to right,
        as written there), then R^2 from Y_pred = X W + b. float32, as in the reference code
        (the float64 run of the same code is timed too and is the comparison target for W, b).
(a) wall time of each path on features already in memory (best of --repeats, interleaved);
(b) peak memory of each path in a fresh subprocess per (method, N): the features are written once
    per chunk to --workdir; the child reads them chunk by chunk (ours: read, update, drop; ref:
    read all into a list, then concatenate, as the reference does). Peak = Linux VmHWM after
    resetting it (/proc/self/clear_refs) once imports are done, minus the RSS at that point, so it
    is the method's own memory (features included) and nothing of the setup;
(c) max |dW|, |db| between ours and the reference in float64 (ours also at ridge 0, i.e. the plain
    normal equations, so the ridge's own effect is visible), and ours vs the float32 reference.
Goals (reported, not asserted): ours >= 3x faster than ref; W, b equal to 1e-5; our peak memory flat
within 10 % across N.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwt.compensation.lstsq import StreamingLeastSquares  # noqa: E402

DEFAULT_SIZES = "128,256,512"
GOAL_SPEEDUP, GOAL_TOL, GOAL_FLAT = 3.0, 1e-5, 1.10


# ---------------------------------------------------------------------------------------------
# the two solvers (the whole fit: W, b and the R^2 gate)


@torch.no_grad()
def fit_ours(chunks, d, ridge):
    """chunks: iterable of (X (rows, d) float32, R (rows, d) float32)."""
    s = StreamingLeastSquares(d, d)
    for X, R in chunks:
        s.update(X, R)
    W, b = s.solve(ridge)
    return W[0], b[0], s.r2(W, b), s


@torch.no_grad()
def fit_reference(chunks, dtype=torch.float32):
    """The QwT reference code's linear regression: concatenate, explicit inverse."""
    xs, rs = [], []
    for X, R in chunks:
        xs.append(X)
        rs.append(R)
    X = torch.cat(xs, 0).to(dtype)
    Y = torch.cat(rs, 0).to(dtype)
    del xs, rs
    X_add_one = torch.cat([X, torch.ones(size=[X.size(0)], dtype=dtype).reshape(-1, 1)], dim=-1)
    X_add_one_T = X_add_one.t()
    W_overall = torch.inverse(X_add_one_T @ X_add_one) @ X_add_one_T @ Y
    W, b = W_overall[:-1, :], W_overall[-1, :]
    Y_pred = X @ W + b
    ss_tot = torch.sum((Y - Y.mean(dim=0)).pow(2))
    ss_res = torch.sum((Y - Y_pred).pow(2))
    return W, b, float(1 - ss_res / ss_tot)


# ---------------------------------------------------------------------------------------------
# model and features


def grid_for(tokens: int) -> tuple[int, int]:
    """Patch grid (h, w) with h * w = tokens - 1 (cls token), as square as possible."""
    n = tokens - 1
    if n < 1:
        raise SystemExit(f"--tokens {tokens}: need at least 2 (cls + 1 patch)")
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def build_quantized_vit(dim: int, tokens: int, depth: int, heads: int, seed: int):
    from timm.models.vision_transformer import VisionTransformer

    from qwt.models import adapter_for
    from qwt.models.zoo import disable_fused_attention
    from qwt.ptq import apply_ptq, get_specs

    torch.manual_seed(seed)
    h, w = grid_for(tokens)
    model = VisionTransformer(img_size=(16 * h, 16 * w), patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=1000)
    model = disable_fused_attention(model.eval())
    adapter = adapter_for(model)
    calib = [torch.randn(8, 3, 16 * h, 16 * w, generator=torch.Generator().manual_seed(seed + 1))]
    apply_ptq(adapter, get_specs("rtn", 4, 4), calib)
    return adapter, (3, 16 * h, 16 * w)


@torch.no_grad()
def feature_chunks(adapter, input_shape, block: int, n: int, batch: int, seed: int):
    """Yields (X, R) float32, (batch * tokens, d) each, for n random images, chunk by chunk."""
    from qwt.quant import set_quant_state

    model = adapter.model
    set_quant_state(model, True, True)
    units = adapter.units()
    g = torch.Generator().manual_seed(seed)
    for s in range(0, n, batch):
        x = torch.randn(min(batch, n - s), *input_shape, generator=g)
        h = adapter.stem(x)
        for u in units[:block]:
            h = adapter.run_unit(u, h)
        u = units[block]
        xin, kw = adapter.unit_input(u, h)
        blk = adapter.get(u.name)
        set_quant_state(blk, False, False)
        y_fp = blk(xin, **kw)
        set_quant_state(blk, True, True)
        y_q = blk(xin, **kw)
        yield xin.reshape(-1, xin.shape[-1]).contiguous(), (y_fp - y_q).reshape(-1, xin.shape[-1]).contiguous()


# ---------------------------------------------------------------------------------------------
# memory child


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def child_main(args):
    """Run one method on the first N images' chunks from --workdir; print JSON with its peak memory."""
    torch.set_num_threads(args.threads)
    files = sorted(Path(args.workdir).glob("chunk-*.pt"))[: math.ceil(args.child_n / args.batch)]
    d = torch.load(files[0])["X"].shape[-1]  # warm torch.load / allocator, then forget it
    for dt in (torch.float32, torch.float64):  # warm BLAS / LAPACK work buffers, common to both methods
        a = torch.randn(256, 64, dtype=dt)
        g = a.T @ a + torch.eye(64, dtype=dt)
        torch.inverse(g), torch.cholesky_solve(g, torch.linalg.cholesky(g))
    del a, g
    gc.collect()

    def chunks():
        for f in files:
            c = torch.load(f)
            yield c["X"], c["R"]

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark to the current RSS
        how, base = "VmHWM after clear_refs", _status_kb("VmRSS")
    except OSError:
        import resource

        how, base = "ru_maxrss (peak could not be reset)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.child == "ours":
        fit_ours(chunks(), d, args.ridge)
    else:
        fit_reference(chunks(), torch.float32)
    dt = time.perf_counter() - t0
    if how.startswith("VmHWM"):
        peak = _status_kb("VmHWM")
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": args.child, "n": args.child_n, "peak_mb": (peak - base) / 1024, "base_mb": base / 1024, "how": how, "time_s": dt}))


def measure_memory(method: str, n: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--child-n", str(n), "--workdir", str(args.workdir),
           "--batch", str(args.batch), "--ridge", str(args.ridge), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {method} N={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def timed(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384, help="embedding dim (384: ViT-S / DeiT-S)")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image incl. cls (197: 224px, patch 16)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default dim // 64)")
    p.add_argument("--depth", type=int, default=None, help="blocks in the model (default block + 1: later blocks do not affect the features)")
    p.add_argument("--block", type=int, default=0, help="which block's features to regress")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="calibration sizes N (images), comma separated")
    p.add_argument("--batch", type=int, default=32, help="images per feature chunk (one update() each)")
    p.add_argument("--ridge", type=float, default=1e-6, help="our relative ridge (configs: compensation.qwt.ridge)")
    p.add_argument("--repeats", type=int, default=1, help="timing repetitions per (method, N); best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-(method, N) memory subprocesses")
    p.add_argument("--workdir", default=None, help="where feature chunks are stored for the memory children (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.child:
        return child_main(args)
    torch.set_num_threads(args.threads)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    heads = args.heads or max(1, args.dim // 64)
    depth = args.depth or args.block + 1
    t_start = time.time()
    print(f"QwT calibration benchmark: RANDOM-weight timm ViT (dim {args.dim}, {args.tokens} tokens, {heads} heads, depth {depth}), "
          f"RTN W4A4, features of block {args.block}; random images; chunks of {args.batch} images; "
          f"{args.threads} torch threads; torch {torch.__version__}")
    adapter, in_shape = build_quantized_vit(args.dim, args.tokens, depth, heads, args.seed)

    own_workdir = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qwt_bench_calib_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        chunks = []
        for i, (X, R) in enumerate(feature_chunks(adapter, in_shape, args.block, max(sizes), args.batch, args.seed + 2)):
            chunks.append((X, R))
            if not args.no_memory:
                torch.save({"X": X, "R": R}, args.workdir / f"chunk-{i:05d}.pt")
        rows_per_image = args.tokens
        print(f"features: {max(sizes)} images -> {max(sizes) * rows_per_image:,} rows x {args.dim} in {time.time() - t0:.1f}s")
        del adapter
        gc.collect()

        results = []
        for n in sizes:
            cs = chunks[: math.ceil(n / args.batch)]
            t_ours, t_ref32, t_ref64 = [], [], []
            for _ in range(args.repeats):  # interleaved: ours, ref32, ref64, ours, ...
                t, (W, b, r2, solver) = timed(lambda: fit_ours(cs, args.dim, args.ridge))
                t_ours.append(t)
                t, (W32, b32, r2_32) = timed(lambda: fit_reference(cs, torch.float32))
                t_ref32.append(t)
                t, (W64, b64, r2_64) = timed(lambda: fit_reference(cs, torch.float64))
                t_ref64.append(t)
            W0, b0 = (t[0] for t in solver.solve(0.0))  # the same statistics, no ridge
            row = {
                "n": n, "rows": sum(c[0].shape[0] for c in cs),
                "t_ours": min(t_ours), "t_ref32": min(t_ref32), "t_ref64": min(t_ref64),
                "dW": float((W - W64).abs().max()), "db": float((b - b64).abs().max()),
                "dW0": float((W0 - W64).abs().max()), "db0": float((b0 - b64).abs().max()),
                "dW32": float((W - W32.double()).abs().max()), "db32": float((b - b32.double()).abs().max()),
                "Wmax": float(W64.abs().max()), "bmax": float(b64.abs().max()), "r2": r2, "r2_ref": r2_64,
            }
            if not args.no_memory:
                row["mem_ours"] = measure_memory("ours", n, args)["peak_mb"]
                row["mem_ref"] = measure_memory("ref", n, args)["peak_mb"]
            results.append(row)
            print(f"  N={n}: ours {row['t_ours']:.2f}s, ref {row['t_ref32']:.2f}s (float32) / {row['t_ref64']:.2f}s (float64)"
                  + (f", peak {row['mem_ours']:.0f} MB vs {row['mem_ref']:.0f} MB" if "mem_ours" in row else ""), flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)

    report(results, args, time.time() - t_start)


def report(results, args, total_s):
    mem = "mem_ours" in results[0]
    print()
    print("time = whole fit (W, b and R^2); ref = the QwT reference code (concatenate + torch.inverse), float32 as written there")
    hdr = f"{'N':>6}{'rows':>11}{'ours s':>9}{'ref32 s':>9}{'ref64 s':>9}{'ref32/ours':>11}{'ref64/ours':>11}"
    if mem:
        hdr += f"{'ours MB':>9}{'ref MB':>9}{'ref/ours':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        line = (f"{r['n']:>6}{r['rows']:>11,}{r['t_ours']:>9.2f}{r['t_ref32']:>9.2f}{r['t_ref64']:>9.2f}"
                f"{r['t_ref32'] / r['t_ours']:>10.2f}x{r['t_ref64'] / r['t_ours']:>10.2f}x")
        if mem:
            line += f"{r['mem_ours']:>9.0f}{r['mem_ref']:>9.0f}{r['mem_ref'] / max(r['mem_ours'], 1e-9):>8.1f}x"
        print(line)
    print()
    print("agreement with the float64 reference (max abs over all entries; |W|max, |b|max for scale):")
    print(f"{'N':>6}{'dW ours':>11}{'db ours':>11}{'dW ridge0':>11}{'db ridge0':>11}{'dW ref32':>11}{'db ref32':>11}{'|W|max':>9}{'|b|max':>9}{'R2':>8}")
    for r in results:
        print(f"{r['n']:>6}{r['dW']:>11.2e}{r['db']:>11.2e}{r['dW0']:>11.2e}{r['db0']:>11.2e}{r['dW32']:>11.2e}{r['db32']:>11.2e}"
              f"{r['Wmax']:>9.3f}{r['bmax']:>9.3f}{r['r2']:>8.4f}")
    print(f"(ours: ridge {args.ridge:g} relative, as configured; ridge0: ours with no ridge; ref32: the float32 reference vs ours)")
    print()
    speed = min(r["t_ref32"] / r["t_ours"] for r in results)
    speed64 = min(r["t_ref64"] / r["t_ours"] for r in results)
    tol = max(max(r["dW"], r["db"]) for r in results)
    tol0 = max(max(r["dW0"], r["db0"]) for r in results)

    def verdict(ok):
        return "MET" if ok else "NOT MET"

    print(f"goal: ours >= {GOAL_SPEEDUP:g}x faster than ref: {verdict(speed >= GOAL_SPEEDUP)} "
          f"(smallest ratio ref32/ours {speed:.2f}x, ref64/ours {speed64:.2f}x)")
    print(f"goal: W, b identical to {GOAL_TOL:g}: {verdict(tol <= GOAL_TOL)} with the configured ridge (max |dW|,|db| {tol:.2e}); "
          f"{verdict(tol0 <= GOAL_TOL)} without ridge ({tol0:.2e})")
    if mem:
        ours = [r["mem_ours"] for r in results]
        flat = max(ours) / max(min(ours), 1e-9)
        print(f"goal: our peak memory flat within {100 * (GOAL_FLAT - 1):.0f} % across N: {verdict(flat <= GOAL_FLAT)} "
              f"(max/min {flat:.3f}; {min(ours):.0f}-{max(ours):.0f} MB; ref {results[0]['mem_ref']:.0f} -> {results[-1]['mem_ref']:.0f} MB)")
    if len(results) and max(r["n"] for r in results) < 2048:
        print("full sweep: python tools/bench_calibration.py --sizes 128,256,512,1024,2048 (~10 min on 2 cores, ~1.3 GB of temp features, ref peaks near 5 GB)")
    print(f"total {total_s:.0f}s")


if __name__ == "__main__":
    main()

"""torch.distributed helpers. Works unchanged in one process; under torchrun it uses NCCL on GPU
and gloo on CPU. Metrics and calibration statistics are sums, reduced with ``all_reduce_sum``."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (gloo needs CPU tensors for some dtypes; we move if needed)."""
    if is_dist():
        if dist.get_backend() == "gloo" and t.device.type != "cpu":
            c = t.cpu()
            dist.all_reduce(c)
            t.copy_(c)
        else:
            dist.all_reduce(t)
    return t


def shard(indices: list[int]) -> list[int]:
    """This rank's part of ``indices`` (strided, no padding: every sample counted exactly once)."""
    return indices[rank() :: world()]


def barrier():
    if is_dist():
        dist.barrier()


def all_gather_rows(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (sizes along ``dim`` may differ)."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[dim]], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    m = int(max(int(x) for x in sizes))
    pad = list(t.shape)
    pad[dim] = m - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim=dim)
    dev = "cpu" if dist.get_backend() == "gloo" else padded.device
    out = [torch.zeros_like(padded, device=dev) for _ in range(world())]
    dist.all_gather(out, padded.to(dev))
    return torch.cat([o.narrow(dim, 0, int(k)).to(t.device) for o, k in zip(out, sizes)], dim=dim)

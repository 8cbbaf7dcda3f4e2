"""What crosses between processes when a run is split over several (torchrun), in one place.

Algorithm 1 has no processes: with `world = 1` every function here is the identity (or a plain
raise), so a reader of fed.py can skip this file. Under torchrun, process `rank` trains clients
chosen[rank::world] of each round, and:

- `gather_uploads`: every process receives every client's upload (all_gather, one row per dtype,
  so nothing is rounded on the way), then each runs the same server step;
- `from_lead`: what changes the model (the new adapter, a fold into W0) is taken from rank 0, so
  processes that would round differently (mixed hardware) never drift apart;
- `gather_indices`, `sum_counts`: the unreadable images met and the evaluation counts, shared;
- `agree`: a failure on any rank stops every rank (none waits for the others), and rank 0's
  answers (what only it read) reach the rest;
- `setup`, `finish`: join and leave the process group.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import Tensor


class PeerFailed(Exception):
    """Another process stopped with an error (which that process printed)."""


def setup(device: str, timeout_s: float) -> tuple[int, int, bool, str]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and pick
    this process's device. Returns (rank, world size, whether this call created the group, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)   # cuda:1: kernels, autocast and caches on that device
        return 0, 1, False, device
    created = not dist.is_initialized()
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if created:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), created, device


def agree(world: int, rank: int, error: Exception | None, values: tuple[int, ...] = (), device: str = "cpu") -> tuple:
    """Raise on every process if any process failed, so none waits for the others; return rank 0's
    `values` (integers, e.g. whether --out, which only rank 0 reads, has a checkpoint)."""
    if world == 1:
        if error is not None:
            raise error
        return tuple(values)
    mine = torch.tensor([error is not None, *values], dtype=torch.long, device=device)
    found = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(found, mine)
    failed = [r for r, f in enumerate(found) if f[0]]
    if error is not None:
        raise error
    if failed:
        raise PeerFailed(f"rank {failed[0]} stopped with an error (printed by that process)")
    return tuple(int(v) for v in found[0][1:])


def from_lead(tensors: dict[str, Tensor], world: int) -> dict[str, Tensor]:
    """Rank 0's values of `tensors` on every process (one broadcast per dtype)."""
    if world == 1 or not tensors:
        return tensors
    out = {}
    for dt in sorted({v.dtype for v in tensors.values()}, key=str):
        ks = [k for k, v in tensors.items() if v.dtype == dt]
        flat = torch.cat([tensors[k].reshape(-1) for k in ks])
        dist.broadcast(flat, src=0)
        out.update({k: x.view_as(tensors[k]) for k, x in zip(ks, flat.split([tensors[k].numel() for k in ks]))})
    return {k: out[k] for k in tensors}


def _gather(x: Tensor, world: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def gather_uploads(results: list, m: int, like: dict[str, Tensor], world: int, device) -> list:
    """Every process's [(k, upload, loss)] on every process: the client index and loss as one
    float64 row (exact for any index below 2^53), the upload as one row per dtype of its tensors,
    so a bf16 model sends bf16 and nothing is rounded on the way.

    Only LoRA factors and heads (the trainable tensors) and the client index cross the wire; the
    client sizes n_k are known to every process already. Rows are padded to the largest share
    (ceil(m / world) of the round's m clients). Every received tensor is copied out of the gathered
    buffer, so a client's stored state owns its memory (a view would keep the round's buffer alive).
    """
    per = -(-m // world)                                                     # ceil(m / world)
    keys = list(like)
    groups = {dt: [key for key in keys if like[key].dtype == dt]
              for dt in sorted({v.dtype for v in like.values()}, key=str)}
    meta = torch.full((per, 2), -1.0, device=device, dtype=torch.float64)    # (per, 2): k, loss; k = -1 pads
    rows = {dt: torch.zeros(per, sum(like[key].numel() for key in ks), device=device, dtype=dt)
            for dt, ks in groups.items()}                                    # per dtype: (per, P_dtype)
    for i, (k, up, loss) in enumerate(results):
        meta[i, 0], meta[i, 1] = k, loss
        for dt, ks in groups.items():
            rows[dt][i] = torch.cat([up[key].reshape(-1) for key in ks])
    meta = _gather(meta, world).cpu()
    rows = {dt: _gather(x, world) for dt, x in rows.items()}
    out = []
    for j, (k, loss) in enumerate(meta.tolist()):
        if k < 0:
            continue
        up = {}
        for dt, ks in groups.items():
            parts = rows[dt][j].split([like[key].numel() for key in ks])
            up.update({key: p.view(like[key].shape).clone() for key, p in zip(ks, parts)})
        out.append((int(k), {key: up[key] for key in keys}, loss))
    return out


def gather_indices(mine: Tensor, world: int, device) -> Tensor:
    """Every process's non-negative long indices (any number each), concatenated: sizes first,
    then the rows padded with -1 to the longest."""
    if world == 1:
        return mine
    n = torch.tensor([len(mine)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    rows = torch.full((max(1, max(int(s) for s in sizes)),), -1, dtype=torch.long, device=device)
    rows[:len(mine)] = mine.to(device)
    everyone = _gather(rows, world)
    return everyone[everyone >= 0].cpu()


def sum_counts(found: Tensor, world: int, device) -> Tensor:
    """The sum over processes of `found` (each row filled by one process): one all_reduce."""
    if world == 1:
        return found
    found = found.to(device)
    dist.all_reduce(found)
    return found.cpu()


def finish(world: int) -> None:
    """Before a process returns: gloo's worker threads drop a finished collective's tensors after
    the call has returned, which needs the GIL; done during interpreter shutdown it aborts the
    process. A barrier and a moment of sleep (both release the GIL) let them finish first."""
    if world > 1:
        dist.barrier()
        time.sleep(0.05)

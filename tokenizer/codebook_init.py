"""k-means codebook initialization over a buffer of recent encoder outputs, identical on every process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate (N_r, D) tensors of every rank in rank order; N_r may differ between ranks."""
    if not distributed_ready() or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    # all_gather needs equal shapes: pad to the longest, trim afterwards.
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])


class LatentBuffer:
    """The most recent `capacity` rows of z_e on this process, for the k-means init.

    Training state, not weights: it is not a module buffer, so it never reaches
    `state_dict()` of the model or an exported `model.safetensors`. Register it
    for checkpoints (`accelerator.register_for_checkpointing(buffer)`).

    With torch.distributed initialized, `state_dict()` is a collective (every
    process must call it, as `accelerator.save_state` does): it returns the rows
    of all ranks, so the file that the main process writes holds everyone's data,
    and `load_state_dict()` hands each rank back its own contiguous share.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().reshape(-1, rows.shape[-1])
        if self.rows is not None:
            rows = torch.cat([self.rows.to(rows.device), rows])
        self.rows = rows[-self.capacity :].clone()

    def clear(self) -> None:
        self.rows = None

    def state_dict(self) -> dict:
        if not distributed_ready() or dist.get_world_size() == 1:
            rows = self.rows if self.rows is not None else torch.zeros(0, 0)
            return {"rows": rows.cpu(), "counts": [rows.shape[0]], "capacity": self.capacity}
        device = _collective_device()
        local = self.rows.to(device) if self.rows is not None else None
        width = torch.tensor([0 if local is None else local.shape[1]], device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank with no rows yet learns the width
        if local is None:
            local = torch.zeros(0, int(width.item()), device=device)
        counts = _gather_counts(local.shape[0], device)
        rows = all_gather_rows(local) if sum(counts) else torch.zeros(0, 0)
        return {"rows": rows.cpu(), "counts": counts, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        rows, counts = state["rows"], list(state["counts"])
        rank = dist.get_rank() if distributed_ready() else 0
        world = dist.get_world_size() if distributed_ready() else 1
        if world == len(counts):
            share = torch.split(rows, counts)[rank]  # exact resume: each rank gets its own rows
        else:
            share = torch.tensor_split(rows, world)[rank]  # world size changed: split evenly
        self.rows = share.clone() if share.numel() else None


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo and others take CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_counts(count: int, device: torch.device) -> list[int]:
    local = torch.tensor([count], device=device, dtype=torch.long)
    counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local)
    return [int(c.item()) for c in counts]


def nearest_code(data: torch.Tensor, codes: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest row of `codes` for each row of `data`, in float32, in chunks."""
    codes = codes.float()
    codes_sq = codes.pow(2).sum(1)
    out = []
    for part in data.float().split(chunk):
        # ||x||^2 is constant per row, so argmin over ||c||^2 - 2 x.c is enough.
        dist_part = torch.addmm(codes_sq, part, codes.t(), alpha=-2.0)
        out.append(dist_part.argmin(1))
    return torch.cat(out)


@torch.no_grad()
def kmeans(
    data: torch.Tensor, num_clusters: int, iters: int, seed: int, spherical: bool = False
) -> torch.Tensor:
    """Lloyd's k-means, seeded and deterministic given the data: (N, D) -> (num_clusters, D).

    Empty clusters are re-seeded from random data points plus a little noise, so
    a buffer smaller than the codebook still gives distinct codes.
    """
    data = data.float()
    if spherical:
        data = F.normalize(data, dim=-1)
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same on every device
    n = data.shape[0]
    if n >= num_clusters:
        start = torch.randperm(n, generator=generator)[:num_clusters]
    else:
        start = torch.randint(n, (num_clusters,), generator=generator)
    centroids = data[start.to(data.device)].clone()
    for _ in range(iters):
        assign = nearest_code(data, centroids)
        counts = torch.bincount(assign, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        updated = sums / counts.clamp(min=1).unsqueeze(1).to(data.dtype)
        centroids = torch.where((counts > 0).unsqueeze(1), updated, centroids)
        centroids = _reseed_empty(centroids, counts == 0, data, generator)
        if spherical:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


def _reseed_empty(
    centroids: torch.Tensor, empty: torch.Tensor, data: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    num_empty = int(empty.sum().item())
    if num_empty == 0:
        return centroids
    pick = torch.randint(data.shape[0], (num_empty,), generator=generator).to(data.device)
    scale = 1e-2 * data.std().clamp(min=1e-6)
    noise = torch.randn(num_empty, data.shape[1], generator=generator).to(data.device)
    centroids = centroids.clone()
    centroids[empty] = data[pick] + scale * noise
    return centroids


@torch.no_grad()
def kmeans_codebook(
    buffer: LatentBuffer, num_clusters: int, iters: int, seed: int, spherical: bool
) -> torch.Tensor:
    """k-means over the union of every rank's buffer; the result is bitwise the same on all ranks."""
    data = buffer.rows
    if distributed_ready() and dist.get_world_size() > 1:
        data = all_gather_rows(data)
    centroids = kmeans(data, num_clusters, iters, seed, spherical)
    if distributed_ready() and dist.get_world_size() > 1:
        # Same data and seed give the same result in exact arithmetic; the broadcast
        # removes any last-bit difference between devices' reductions.
        dist.broadcast(centroids, src=0)
    return centroids

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

    It remembers how many rows each `add` (one micro-batch) brought, so that
    `gather()` can put every rank's rows in global step order: for each
    micro-batch, rank 0's rows, then rank 1's, ... This is the order of the
    global batch under Accelerate's even sharding, so k-means sees exactly the
    buffer that one process with the whole batch would hold, in the same order.

    Training state, not weights: it is not a module buffer, so it never reaches
    `state_dict()` of the model or an exported `model.safetensors`. Register it
    for checkpoints (`accelerator.register_for_checkpointing(buffer)`).

    With torch.distributed initialized, `state_dict()` is a collective (every
    process must call it, as `accelerator.save_state` does): it returns the rows
    of all ranks in step order with each rank's share of each micro-batch, so the
    file that the main process writes holds everyone's data, and
    `load_state_dict()` hands each rank back its own rows (the same world size)
    or an even split of each micro-batch (another world size).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.sizes: list[int] = []  # rows per add, oldest first (the oldest may be trimmed)

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().reshape(-1, rows.shape[-1])
        sizes = [*self.sizes, rows.shape[0]]
        if self.rows is not None:
            rows = torch.cat([self.rows.to(rows.device), rows])
        self._set(rows, sizes)

    def _set(self, rows: torch.Tensor, sizes: list[int]) -> None:
        # Keep the newest `capacity` rows; trim the sizes of the oldest adds to match.
        excess = rows.shape[0] - self.capacity
        while excess > 0:
            cut = min(excess, sizes[0])
            sizes[0] -= cut
            excess -= cut
            if sizes[0] == 0:
                sizes.pop(0)
        self.rows = rows[-self.capacity :].clone() if rows.shape[0] else None
        self.sizes = [s for s in sizes if s] if self.rows is not None else []

    def clear(self) -> None:
        self.rows, self.sizes = None, []

    def gather(self) -> tuple[torch.Tensor, list[list[int]]]:
        """All ranks' rows in global step order, and per add the rows of each rank.

        A collective under torch.distributed. Adds are aligned from the newest, since
        every rank adds once per micro-batch but trimming may drop old ones unevenly.
        """
        if not distributed_ready() or dist.get_world_size() == 1:
            rows = self.rows if self.rows is not None else torch.zeros(0, 0)
            return rows, [[s] for s in self.sizes]
        device = _collective_device()
        local = self.rows.to(device) if self.rows is not None else None
        width = torch.tensor([0 if local is None else local.shape[1]], device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank with no rows yet learns the width
        if local is None:
            local = torch.zeros(0, int(width.item()), device=device)
        sizes = _gather_lists(self.sizes, device)
        rows = all_gather_rows(local)
        per_rank = torch.split(rows, [sum(s) for s in sizes])
        steps = max(len(s) for s in sizes)
        # Pad at the front (oldest side) so that index j is the same micro-batch on every rank.
        shares = [[0] * (steps - len(s)) + s for s in sizes]
        pieces = [list(torch.split(r, s)) for r, s in zip(per_rank, shares, strict=True)]
        table = [[share[j] for share in shares] for j in range(steps)]
        ordered = [pieces[r][j] for j in range(steps) for r in range(len(pieces))]
        return (torch.cat(ordered) if ordered else rows), table

    def state_dict(self) -> dict:
        rows, table = self.gather()
        return {"rows": rows.cpu(), "sizes": table, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        rows, table = state["rows"], state["sizes"]
        rank = dist.get_rank() if distributed_ready() else 0
        world = dist.get_world_size() if distributed_ready() else 1
        mine, sizes = [], []
        for step_rows, shares in zip(torch.split(rows, [sum(t) for t in table]), table, strict=True):
            if world == len(shares):  # exact resume: each rank gets its own rows back
                piece = torch.split(step_rows, shares)[rank]
            else:  # world size changed: split each micro-batch evenly, as the sharding would
                piece = torch.tensor_split(step_rows, world)[rank]
            mine.append(piece)
            sizes.append(piece.shape[0])
        width = rows.shape[1] if rows.dim() == 2 else 0
        self._set(torch.cat(mine) if mine else torch.zeros(0, width), sizes)


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


def _gather_lists(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's list of ints (lengths may differ), in rank order."""
    lengths = _gather_counts(len(values), device)
    padded = torch.zeros(max(lengths), dtype=torch.long, device=device)
    padded[: len(values)] = torch.tensor(values, dtype=torch.long)
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return [g[:n].tolist() for g, n in zip(gathered, lengths, strict=True)]


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
    """k-means over every rank's buffer in global step order; bitwise the same on all ranks.

    Step order (not rank order) makes the data, row for row, what one process with the
    whole global batch would hold, so a multi-process run initializes like a single one.
    """
    data, _ = buffer.gather()
    centroids = kmeans(data, num_clusters, iters, seed, spherical)
    if distributed_ready() and dist.get_world_size() > 1:
        # Same data and seed give the same result in exact arithmetic; the broadcast
        # removes any last-bit difference between devices' reductions.
        dist.broadcast(centroids, src=0)
    return centroids

"""Progressive quantizer, hardness schedules and the k-means init (tiny configs, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenizer.codebook_init import LatentBuffer, kmeans
from tokenizer.quantizer import (
    STAT_NAMES,
    ProgressiveQuantizer,
    QuantizerConfig,
    quantizer_loss_weight,
)
from tokenizer.schedule import ScheduleConfig, hardness


def make_quantizer(dim=6, **overrides) -> ProgressiveQuantizer:
    torch.manual_seed(0)
    fields = dict(codebook_size=16, codebook_dim=None, l2_normalize=False, kmeans_init=False)
    fields.update(overrides)
    return ProgressiveQuantizer(dim, QuantizerConfig(**fields))


LAYOUTS = [((2, 6, 3, 5), (2, 3, 5)), ((2, 7, 6), (2, 7))]


# ---- shapes and round trip -----------------------------------------------------------------
@pytest.mark.parametrize("codebook_dim", [None, 4])
@pytest.mark.parametrize("shape,index_shape", LAYOUTS)
def test_shapes_and_index_round_trip(shape, index_shape, codebook_dim):
    quantizer = make_quantizer(codebook_dim=codebook_dim, l2_normalize=codebook_dim is not None)
    z = torch.randn(shape)
    out = quantizer(z, hardness=1.0)
    assert out.z_out.shape == z.shape
    assert out.indices.shape == index_shape and out.indices.dtype == torch.long
    code_dim = codebook_dim or 6
    assert out.z_q.shape[1 if len(shape) == 4 else 2] == code_dim
    assert set(out.stats) == set(STAT_NAMES)
    indices = quantizer.indices_from_latents(z)
    assert torch.equal(indices, out.indices)
    assert torch.equal(quantizer.decode_indices(indices), out.z_out)  # exactly the hard latents


def test_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        make_quantizer()(torch.randn(6, 4), hardness=1.0)


# ---- what the decoder sees -------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["interpolate", "stochastic"])
def test_endpoints_are_exact(mechanism):
    quantizer = make_quantizer(mechanism=mechanism)
    z = torch.randn(2, 6, 4, 4)
    soft = quantizer(z, hardness=0.0)
    assert torch.equal(soft.z_out, z)  # h = 0: exactly z_e (no projection here)
    hard = quantizer(z, hardness=1.0)
    assert torch.equal(hard.z_out, hard.z_q)  # h = 1: exactly z_q
    assert not torch.equal(hard.z_q, z)


def test_endpoints_with_projection():
    quantizer = make_quantizer(codebook_dim=3, l2_normalize=True)
    z = torch.randn(2, 5, 6)
    soft = quantizer(z, hardness=0.0)
    assert torch.allclose(soft.z_e.norm(dim=-1), torch.ones(2, 5))
    assert torch.equal(soft.z_out, quantizer.proj_out(soft.z_e))
    hard = quantizer(z, hardness=1.0)
    assert torch.equal(hard.z_out, quantizer.proj_out(hard.z_q))


def test_interpolation_is_the_convex_mix():
    quantizer = make_quantizer()
    z = torch.randn(2, 6, 3, 3)
    out = quantizer(z, hardness=0.25)
    assert torch.allclose(out.z_out, 0.75 * z + 0.25 * out.z_q, atol=1e-6)


@pytest.mark.parametrize("h", [0.0, 0.4, 1.0])
def test_gradient_reaches_encoder_through_straight_through(h):
    quantizer = make_quantizer()
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = quantizer(z, hardness=h)
    out.z_out.sum().backward()
    # d z_out / d z_e is the identity at every h; the decoder path never moves the codes.
    assert torch.allclose(z.grad, torch.ones_like(z), rtol=0, atol=1e-6)
    assert quantizer.codebook.weight.grad is None


# ---- VQ loss ---------------------------------------------------------------------------------
def test_vq_loss_terms_and_beta_side():
    beta, floor, h = 0.25, 0.1, 0.6
    quantizer = make_quantizer(beta=beta, omega_floor=floor)
    z = torch.randn(3, 5, 6, requires_grad=True)
    out = quantizer(z, hardness=h)
    z_q = out.z_q.detach()
    expected = ((z.detach() - z_q) ** 2).mean()
    assert torch.allclose(out.codebook_loss, expected) and torch.allclose(out.commitment_loss, expected)
    omega = floor + (1 - floor) * h
    assert math.isclose(quantizer_loss_weight(h, floor), omega)
    assert torch.allclose(out.loss, omega * (1 + beta) * expected)
    out.loss.backward()
    # beta scales the encoder (commitment) side only; the codes get the full weight.
    n = z.numel()
    assert torch.allclose(z.grad, omega * beta * 2 * (z.detach() - z_q) / n, atol=1e-7)
    code_grad = torch.zeros_like(quantizer.codebook.weight)
    code_grad.index_add_(0, out.indices.reshape(-1), (omega * 2 * (z_q - z.detach()) / n).reshape(-1, 6))
    assert torch.allclose(quantizer.codebook.weight.grad, code_grad, atol=1e-7)


def test_omega_endpoints():
    assert quantizer_loss_weight(0.0, 0.1) == pytest.approx(0.1)
    assert quantizer_loss_weight(1.0, 0.1) == pytest.approx(1.0)
    assert quantizer_loss_weight(0.5, 0.2) == pytest.approx(0.6)


# ---- stochastic mechanism --------------------------------------------------------------------
def test_stochastic_mask_is_reproducible_and_has_rate_h():
    quantizer = make_quantizer(mechanism="stochastic")
    z = torch.randn(4, 6, 32, 32)
    runs = [quantizer(z, 0.3, torch.Generator().manual_seed(s)).z_out for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    hard = quantizer(z, 1.0).z_out
    quantized = (runs[0] == hard).all(dim=1).float()  # whole positions switch
    assert abs(quantized.mean().item() - 0.3) < 0.03
    with pytest.raises(ValueError, match="Generator"):
        quantizer(z, 0.3)


# ---- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_ramps_endpoints(kind):
    config = ScheduleConfig(kind=kind, warmup=10, transition=20)
    assert hardness(0, config) == 0.0 and hardness(10, config) == 0.0
    assert hardness(30, config) == 1.0 and hardness(10**6, config) == 1.0
    mid = hardness(20, config)
    assert 0.0 < mid < 1.0 and mid == pytest.approx(0.5, abs=1e-9)
    values = [hardness(s, config) for s in range(40)]
    assert values == sorted(values)  # monotone


def test_none_step_and_fractions():
    assert hardness(0, ScheduleConfig(kind="none", warmup=100)) == 1.0
    step = ScheduleConfig(kind="step", warmup=5)
    assert [hardness(s, step) for s in (0, 4, 5, 99)] == [0.0, 0.0, 1.0, 1.0]
    frac = ScheduleConfig(kind="linear", warmup=0.1, transition=0.5)
    assert hardness(99, frac, total_steps=1000) == 0.0
    assert hardness(350, frac, total_steps=1000) == pytest.approx(0.5)
    assert hardness(600, frac, total_steps=1000) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        hardness(3, frac)
    with pytest.raises(ValueError, match="kind"):
        ScheduleConfig(kind="exponential")


# ---- k-means init ----------------------------------------------------------------------------
def test_kmeans_init_when_h_leaves_zero():
    quantizer = make_quantizer(kmeans_init=True, kmeans_buffer=64).train()
    before = quantizer.codebook.weight.clone()
    assert not quantizer.initialized
    for _ in range(3):
        assert not quantizer(torch.randn(2, 6, 4, 4) + 5, hardness=0.0).initialized_now
    assert torch.equal(quantizer.codebook.weight, before) and len(quantizer.kmeans_buffer) == 64
    assert quantizer(torch.randn(2, 6, 4, 4) + 5, hardness=0.1).initialized_now
    assert quantizer.initialized and len(quantizer.kmeans_buffer) == 0
    assert quantizer.codebook.weight.mean().item() == pytest.approx(5, abs=0.5)  # on the data
    state = quantizer.state_dict()
    assert "initialized" in state and not any("buffer" in k or "steps_since" in k for k in state)
    fresh = make_quantizer(kmeans_init=True).train()
    fresh.load_state_dict(state)  # a resumed run does not re-initialize
    assert not fresh(torch.randn(2, 6, 4, 4), hardness=0.5).initialized_now


def test_hard_vq_initializes_at_step_zero_and_eval_never_does():
    quantizer = make_quantizer(kmeans_init=True, schedule=ScheduleConfig(kind="none"))
    h0 = hardness(0, quantizer.config.schedule)
    assert not quantizer.eval()(torch.randn(2, 6, 4, 4), h0).initialized_now
    assert quantizer.train()(torch.randn(2, 6, 4, 4), h0).initialized_now


def test_latent_buffer_state_round_trip():
    buffer = LatentBuffer(capacity=5)
    buffer.add(torch.arange(12.0).reshape(4, 3))
    buffer.add(torch.arange(12.0, 18.0).reshape(2, 3))
    assert len(buffer) == 5 and buffer.rows[0, 0] == 3.0  # keeps the most recent rows
    assert buffer.sizes == [3, 2]  # the oldest add trimmed to its newest rows
    other = LatentBuffer(capacity=5)
    other.load_state_dict(buffer.state_dict())
    assert torch.equal(other.rows, buffer.rows) and other.sizes == buffer.sizes


def test_latent_buffer_from_two_ranks_loads_step_major_on_one():
    # A 2-rank checkpoint: two adds, rows tagged 10 * step + rank, stored in step order.
    rows = torch.tensor([[0.0], [0.0], [1.0], [10.0], [11.0], [11.0]])
    state = {"rows": rows, "sizes": [[2, 1], [1, 2]], "capacity": 3}
    one = LatentBuffer(capacity=6)
    one.load_state_dict(state)  # world size 1: each add's rows of both ranks, in step order
    assert torch.equal(one.rows, rows) and one.sizes == [3, 3]
    small = LatentBuffer(capacity=4)
    small.load_state_dict(state)
    assert torch.equal(small.rows, rows[2:]) and small.sizes == [1, 3]


def test_kmeans_with_fewer_points_than_codes_gives_distinct_codes_on_the_data():
    data = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    centroids = kmeans(data, num_clusters=8, iters=5, seed=0)
    assert centroids.shape == (8, 2)
    assert len({tuple(c.tolist()) for c in centroids}) == 8  # re-seeded copies get a little noise
    # every code sits on (or within the re-seeding noise of) one of the three points
    nearest = torch.cdist(centroids, data).min(dim=1).values
    assert nearest.max() < 0.5 and torch.cdist(data, centroids).min(dim=1).values.max() < 1e-6
    assert torch.equal(kmeans(data, 8, 5, seed=0), centroids)  # deterministic given the seed


def test_spherical_kmeans_finds_directions_on_the_unit_sphere():
    generator = torch.Generator().manual_seed(0)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    scales = torch.rand(300, 1, generator=generator) * 5 + 0.5  # lengths must not matter
    data = directions.repeat(100, 1) * scales + 0.02 * torch.randn(300, 3, generator=generator)
    centroids = kmeans(data, num_clusters=3, iters=10, seed=1, spherical=True)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3), atol=1e-6)
    cosine = centroids @ directions.T
    assert torch.allclose(cosine.max(dim=0).values, torch.ones(3), atol=1e-3)  # each direction found


def test_dead_codes_counts_codes_unused_for_the_window():
    quantizer = make_quantizer(codebook_size=4, codebook_dim=None, dead_code_window=3).train()
    with torch.no_grad():
        quantizer.codebook.weight.copy_(torch.eye(4, 6) * 10)  # code i = 10 * e_i
    near_code_0 = torch.zeros(1, 2, 6)
    near_code_0[..., 0] = 9.0
    both = torch.zeros(1, 2, 6)
    both[0, 0, 0], both[0, 1, 1] = 9.0, 9.0
    dead = [quantizer(x, hardness=1.0).stats["dead_codes"].item()
            for x in (both, near_code_0, near_code_0, near_code_0)]
    # codes 2 and 3 are never used: dead from the 3rd step; code 1 is last used at step 1
    assert dead == [0, 0, 2, 3]
    quantizer.eval()(both, hardness=1.0)  # evaluation never ages the codes
    assert quantizer.train()(near_code_0, hardness=1.0).stats["dead_codes"].item() == 3


# ---- identical on every process --------------------------------------------------------------
def _kmeans_worker(rank: int, world: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        quantizer = make_quantizer(kmeans_init=True, codebook_size=8, kmeans_buffer=40).train()
        ddp = torch.nn.parallel.DistributedDataParallel(quantizer)  # as under accelerate
        torch.manual_seed(100 + rank)  # different local data on each rank
        ddp(torch.randn(3, 6, 4, 4) + 3 * rank, hardness=0.0)
        saved = quantizer.kmeans_buffer.state_dict()  # a collective, as in accelerate's save_state
        resumed = LatentBuffer(40)
        resumed.load_state_dict(saved)
        # Rows tagged 10 * add + rank; rank 1 adds more rows: gathered in global step order.
        tagged = LatentBuffer(7)
        for step in range(3):
            tagged.add(torch.full((2 + rank, 1), 10.0 * step + rank))
        gathered, table = tagged.gather()
        tagged_back = LatentBuffer(7)
        tagged_back.load_state_dict(tagged.state_dict())
        out = ddp(torch.randn(1, 6, 4, 4) - 3 * rank, hardness=0.2)
        (out.loss + out.z_out.mean()).backward()
        results[rank] = {
            "codebook": quantizer.codebook.weight.detach().clone(),
            "initialized_now": out.initialized_now,
            "stats": {k: v.item() for k, v in out.stats.items()},
            "own_rows_back": torch.equal(resumed.rows, saved["rows"][40 * rank : 40 * (rank + 1)]),
            "saved_rows": saved["rows"].shape[0],
            "gathered": gathered.flatten().tolist(),
            "table": table,
            "tagged_back": torch.equal(tagged_back.rows, tagged.rows) and tagged_back.sizes == tagged.sizes,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_kmeans_init_identical_on_two_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_kmeans_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    first, second = results[0], results[1]
    assert first["initialized_now"] and second["initialized_now"]
    assert torch.equal(first["codebook"], second["codebook"])
    # Both ranks' data shaped it: codes near +3 (rank 1) and near 0 (rank 0).
    means = first["codebook"].mean(dim=1)
    assert (means > 1.5).any() and (means < 1.5).any()
    assert first["stats"] == second["stats"]
    assert first["saved_rows"] == 80 and first["own_rows_back"] and second["own_rows_back"]
    # Rank 0 keeps all 2 + 2 + 2 rows, rank 1 the newest 1 + 3 + 3: per add, rank 0 then rank 1.
    assert first["table"] == second["table"] == [[2, 1], [2, 3], [2, 3]]
    assert first["gathered"] == second["gathered"] == [0, 0, 1, 10, 10, 11, 11, 11, 20, 20, 21, 21, 21]
    assert first["tagged_back"] and second["tagged_back"]


def _global_batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(step))


def _remedy_worker(rank: int, world: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        quantizer = make_quantizer(ema_codebook=True, dead_code_threshold=1.0, l2_normalize=True).train()
        # each rank quantizes its half of the global batch
        restarts = [quantizer(_global_batch(step)[2 * rank: 2 * rank + 2], hardness=1.0).stats["code_restarts"].item()
                    for step in range(4)]
        results[rank] = {"codebook": quantizer.codebook.weight.detach().clone(), "restarts": restarts}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ema_and_restart_on_two_processes_match_one_with_the_whole_batch(tmp_path):
    """The EMA's counts and sums are all-reduced and restarts draw from every rank's rows: two processes
    hold the same codebook, the one a single process with the whole batch gets."""
    results = mp.Manager().dict()
    mp.spawn(_remedy_worker, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    single = make_quantizer(ema_codebook=True, dead_code_threshold=1.0, l2_normalize=True).train()
    restarts = [single(_global_batch(step), hardness=1.0).stats["code_restarts"].item() for step in range(4)]
    assert torch.equal(results[0]["codebook"], results[1]["codebook"])  # the same codebook everywhere
    assert results[0]["restarts"] == results[1]["restarts"] == restarts and restarts[-1] > 0
    assert torch.allclose(results[0]["codebook"], single.codebook.weight, atol=1e-6)  # sums in another order


def test_participation_ratio_of_a_known_spectrum():
    from provq.common.moments import MomentAccumulator
    from tokenizer.codebook_stats import participation_ratio

    # eigenvalues 4, 1, 1, 0 in a rotated basis: (4 + 1 + 1)^2 / (16 + 1 + 1) = 2
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    covariance = rotation @ torch.diag(torch.tensor([4.0, 1.0, 1.0, 0.0])) @ rotation.T
    assert participation_ratio(covariance) == pytest.approx(2.0, rel=1e-6)
    assert participation_ratio(torch.eye(8)) == pytest.approx(8.0)
    # the streamed covariance of rows equals torch.cov of them all
    rows = torch.randn(500, 4, generator=torch.Generator().manual_seed(1)) @ covariance.sqrt().nan_to_num()
    moments = MomentAccumulator(4)
    for part in rows.split(128):
        moments.update(part)
    assert torch.allclose(moments.covariance(), torch.cov(rows.T).double(), atol=1e-5)


def test_ever_used_counts_codes_since_the_codebook_was_set():
    quantizer = make_quantizer(codebook_size=4, codebook_dim=None).train()
    with torch.no_grad():
        quantizer.codebook.weight.copy_(torch.eye(4, 6) * 10)
    x = torch.zeros(1, 2, 6)
    x[0, 0, 0], x[0, 1, 2] = 9.0, 9.0  # codes 0 and 2
    assert quantizer(x, hardness=1.0).stats["ever_used"].item() == 0.5
    y = torch.zeros(1, 1, 6)
    y[0, 0, 1] = 9.0  # code 1 as well
    assert quantizer(y, hardness=1.0).stats["ever_used"].item() == 0.75
    quantizer.eval()(torch.full((1, 1, 6), 0.0).index_fill_(2, torch.tensor([3]), 9.0), hardness=1.0)
    assert quantizer.ever_used.sum().item() == 3  # evaluation does not count

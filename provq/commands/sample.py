"""Sample images from a trained prior and decode them with its tokenizer.

    python sample.py --tokenizer runs/tok/tokenizer --prior runs/prior/prior --num_images 64 \\
        --cfg_scale 2.0 --temperature 1.0 --top_k 0 --top_p 1.0 [--labels 0,3,5] --output_dir runs/samples
    accelerate launch sample.py ...        (each process samples its own batches)

Writes one PNG per image, ``grid.png`` and ``samples.npz`` (uint8 NHWC ``arr_0``,
the ADM evaluator's layout, plus ``labels`` and the sampled code grids ``codes``).
Labels are class-balanced by default; batch b uses seed ``seed * 1_000_003 + b``,
so the images depend on neither the number of processes nor a ``--resume`` (which
keeps the batches written before a Ctrl-C or SIGTERM stopped the command).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from generator.sampling import DEFAULT_CFG_SCALE, SamplingConfig, for_prior, sample
from provq.api import load_prior, load_tokenizer
from provq.common.cli import command_name, count, make_parser, parse_config, run_command
from provq.common.errors import ConfigError
from provq.common.files import write_atomic, writing
from provq.common.folders import SAMPLES_NAME, expect_kind, expect_output
from provq.common.locks import output_lock
from provq.common.signals import SafePoints, interrupted
from provq.data.pixels import from_hwc, save_image_grid, to_float, to_hwc, to_uint8
from provq.training import configure_threads, process_state

logger = logging.getLogger("sample")
# SamplingConfig's defaults (the CFG scale's: generator.sampling.DEFAULT_CFG_SCALE with classes, 1
# without); the preset's `sample:` section and the flags override them field by field.
DEFAULTS = asdict(SamplingConfig())


def class_labels(spec: str | None, num_images: int, num_classes: int) -> torch.Tensor:
    """``--labels 0,3,5`` cycled to num_images, or class-balanced, sorted so grid rows are classes;
    -1 (no class) everywhere for a prior trained on unlabelled data."""
    if num_classes == 0:
        if spec:
            raise ConfigError("--labels given, but the prior was trained on unlabelled data (no classes)")
        return torch.full((num_images,), -1)
    if spec:
        try:
            chosen = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError as error:
            raise ConfigError(f"--labels {spec!r}: expected comma-separated class ids ({error})") from None
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad or not chosen:
            raise ConfigError(f"--labels {bad or spec!r} outside the prior's classes [0, {num_classes})")
    else:
        chosen = list(range(num_classes))
    labels = torch.tensor([chosen[i % len(chosen)] for i in range(num_images)])
    return labels.sort(stable=True).values if not spec else labels


def unguided_if_unlabelled(args, num_classes: int) -> SamplingConfig:
    """Guidance needs classes. An unset scale is the default for the prior (``for_prior``); for a
    prior of unlabelled data an explicit ``--cfg_scale`` other than 1 is an error, and one from the
    preset becomes 1, with a warning."""
    if num_classes or args.sampling.cfg_scale in (None, 1.0):
        return for_prior(args.sampling, num_classes)
    if args.cfg_scale is not None:
        raise ConfigError(f"--cfg_scale {args.cfg_scale} needs classes, but the prior was trained on "
                          "unlabelled data: drop --cfg_scale or pass --cfg_scale 1")
    logger.warning("the prior was trained on unlabelled data: sampling without guidance (cfg_scale 1)")
    return replace(args.sampling, cfg_scale=1.0)


@dataclass
class SampleCommandConfig:
    """What sample.py reads: the preset's ``sample:`` section (over DEFAULTS), and its flags."""

    sample: SamplingConfig = field(default_factory=SamplingConfig)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; ``args.sampling`` is the SamplingConfig of flags over the preset's ``sample:``
    section over the defaults, checked before anything is loaded or written."""
    parser = make_parser(__doc__.splitlines()[0], training_run=False, config_required=False)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--num_images", type=count, default=64)
    parser.add_argument("--labels", default=None, help="comma-separated class ids (default: balanced)")
    parser.add_argument("--batch_size", type=count, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the batches a previous run of the same command wrote (same seeds: the same images)")
    for name, value in DEFAULTS.items():
        default = (f"{DEFAULT_CFG_SCALE} for a class-conditional prior, 1 for one of unlabelled data"
                   if name == "cfg_scale" else value)
        parser.add_argument(f"--{name}", type=float if name == "cfg_scale" else type(value), default=None,
                            help=f"sample.{name}, default {default}")
    config, args = parse_config(parser, SampleCommandConfig, None, argv, defaults={"sample": DEFAULTS},
                                shortcuts={name: f"sample.{name}" for name in DEFAULTS})
    args.sampling = config.sample
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    expect_kind(args.tokenizer, "tokenizer", "--tokenizer", hub=True)
    expect_kind(args.prior, "prior", "--prior", hub=True)
    expect_output(args.output_dir, "samples")
    logging.basicConfig(level=logging.INFO)
    configure_threads()
    state = process_state()
    tok = load_tokenizer(args.tokenizer, state.device)
    prior = load_prior(args.prior, tok, state.device)
    labels = class_labels(args.labels, args.num_images, prior.config.num_classes)
    args.sampling = unguided_if_unlabelled(args, prior.config.num_classes)
    out = Path(args.output_dir)
    with output_lock(out, state):
        starts = list(range(0, args.num_images, args.batch_size))
        write_batches(tok, prior, labels, starts, args, state)
        if state.is_main_process:
            write_collection(out, labels, starts)
    return out / SAMPLES_NAME


def write_batches(tok, prior, labels, starts: list[int], args, state) -> None:
    """This process's batches as PNGs and codes; a signal stops every process after a batch."""
    images = Path(args.output_dir) / "images"
    with writing(images, "the samples"):
        images.mkdir(parents=True, exist_ok=True)
    mine = [(starts.index(s), s) for s in starts[state.process_index::state.num_processes]]
    safe = SafePoints(state.num_processes, state.device)
    for b, start in tqdm(safe.over(mine, rounds=len(starts[::state.num_processes])), total=len(mine),
                         desc="sampling", disable=not state.is_main_process):
        codes_file = images / f"codes_{start:06d}.npy"  # written last: the batch is complete
        if args.resume and codes_file.is_file():
            continue
        chunk = labels[start:start + args.batch_size]
        codes = sample(prior, chunk, seed=args.seed * 1_000_003 + b, **asdict(args.sampling))
        with writing(images, "the samples"):
            for i, image in enumerate(to_hwc(to_uint8(tok.decode(codes)))):
                Image.fromarray(image).save(images / f"{start + i:06d}.png")
            np.save(codes_file, codes.cpu().numpy().astype(np.int32))
    if safe.signum:
        kept = len(list(images.glob("codes_*.npy")))
        raise interrupted(safe.signum, f"after {kept} of {len(starts)} batches", f"they are kept in {images}")
    state.wait_for_everyone()


def write_collection(out: Path, labels: torch.Tensor, starts: list[int]) -> None:
    """samples.npz (images, labels and the sampled code grids) and grid.png from the per-image PNGs
    and per-batch codes every process wrote."""
    arrays = np.stack([np.asarray(Image.open(out / "images" / f"{i:06d}.png").convert("RGB"))
                       for i in range(len(labels))])
    codes = np.concatenate([np.load(out / "images" / f"codes_{start:06d}.npy") for start in starts])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to it
            np.savez(f, arr_0=arrays, labels=labels.numpy(), codes=codes)

    write_atomic(out / SAMPLES_NAME, write, "the samples")  # the demo and the ablation take it as "done"
    save_image_grid(to_float(from_hwc(arrays[:100])), out / "grid.png", nrow=10)
    logger.info("%d samples -> %s", len(labels), out / SAMPLES_NAME)


def entry() -> None:
    """``provq-sample`` and ``python sample.py``."""
    run_command(command_name("sample.py"), main, resume="rerun the same command with --resume: finished batches are kept")


if __name__ == "__main__":
    entry()

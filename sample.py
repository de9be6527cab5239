"""Sample images from a trained prior and decode them with its tokenizer.

    python sample.py --tokenizer runs/tok/tokenizer --prior runs/prior/prior --num_images 64 \\
        --cfg_scale 2.0 --temperature 1.0 --top_k 0 --top_p 1.0 [--labels 0,3,5] --output_dir runs/samples
    accelerate launch sample.py ...        (each process samples its own batches)

Writes one PNG per image, ``grid.png`` and ``samples.npz`` (uint8 NHWC ``arr_0``,
the ADM evaluator's layout, plus ``labels``). Labels are class-balanced by
default; batch b uses seed ``seed * 1_000_003 + b``, so the images do not
depend on the number of processes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from generator import ARPrior
from generator.sampling import sample
from tokenizer import ProVQTokenizer
from training import configure_threads
from training.config import load_yaml
from training.images import save_image_grid, to_uint8

logger = logging.getLogger("sample")
DEFAULTS = {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def load_pair(tokenizer: str, prior: str, device) -> tuple[ProVQTokenizer, ARPrior]:
    """Both models; refuses a prior trained on another tokenizer's codes."""
    tok = ProVQTokenizer.from_pretrained(tokenizer, device=device)
    model = ARPrior.from_pretrained(prior).to(device).eval()
    model.check_tokenizer(tok.fingerprint())
    return tok, model


@torch.no_grad()
def generate(tok: ProVQTokenizer, prior: ARPrior, labels, **sampling) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for class labels: the one call Python users need."""
    return tok.decode(sample(prior, labels, **sampling))


def class_labels(spec: str | None, num_images: int, num_classes: int) -> torch.Tensor:
    """``--labels 0,3,5`` cycled to num_images, or class-balanced, sorted so grid rows are classes."""
    if spec:
        chosen = [int(x) for x in spec.split(",") if x.strip()]
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--labels {bad} outside the prior's classes [0, {num_classes})")
    else:
        chosen = list(range(max(1, num_classes)))
    labels = torch.tensor([chosen[i % len(chosen)] for i in range(num_images)])
    return labels.sort(stable=True).values if not spec else labels


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", default=None, help="preset whose `sample:` section gives defaults")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--labels", default=None, help="comma-separated class ids (default: balanced)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    section = load_yaml(args.config).get("sample", {}) if args.config else {}
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        parser.error(f"unknown field 'sample.{unknown[0]}' in {args.config}")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, type(value)(section.get(name, value)))
    if args.num_images < 1:
        parser.error("--num_images must be >= 1")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    configure_threads()
    state = PartialState()
    tok, prior = load_pair(args.tokenizer, args.prior, state.device)
    labels = class_labels(args.labels, args.num_images, prior.config.num_classes)
    out = Path(args.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)
    starts = list(range(0, args.num_images, args.batch_size))
    mine = starts[state.process_index::state.num_processes]
    for b, start in tqdm([(starts.index(s), s) for s in mine], desc="sampling",
                         disable=not state.is_main_process):
        chunk = labels[start:start + args.batch_size]
        images = to_uint8(generate(tok, prior, chunk, seed=args.seed * 1_000_003 + b, **sampling))
        for i, image in enumerate(images):
            Image.fromarray(image).save(out / "images" / f"{start + i:06d}.png")
    state.wait_for_everyone()
    if state.is_main_process:
        write_collection(out, labels)
    return out / "samples.npz"


def write_collection(out: Path, labels: torch.Tensor) -> None:
    """samples.npz and grid.png from the per-image PNGs every process wrote."""
    arrays = np.stack([np.asarray(Image.open(out / "images" / f"{i:06d}.png").convert("RGB"))
                       for i in range(len(labels))])
    tmp = out / "samples.tmp.npz"
    np.savez(tmp, arr_0=arrays, labels=labels.numpy())
    tmp.replace(out / "samples.npz")  # the demo and the ablation take samples.npz as "done"
    shown = torch.from_numpy(arrays[:100]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(shown, out / "grid.png", nrow=10)
    logger.info("%d samples -> %s", len(labels), out / "samples.npz")


if __name__ == "__main__":
    main()

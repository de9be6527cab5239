"""The demo's tokenizer with and without a PatchGAN from the middle of training: rFID, PSNR, D's logits.

    python -m bench.gan_on_off [--output_dir runs/gan_on_off] [--steps 2000]

Both runs are configs/emoji32.yaml's tokenizer (L1, no LPIPS: its weights cannot be had here), the
same seed and steps; the second adds the hinge GAN of train_tokenizer.py (a 2-layer PatchGAN of 32
channels, VQGAN's adaptive weight, gan_weight 0.1) from step 1,000 of 2,000. Each is evaluated by
`python -m eval rfid` on the test split. Writes bench/results/gan_on_off.json and .png (the
discriminator's mean logits on real and reconstructed images over the steps). Stages whose output
exists are not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.results_io import write_result
from provq.pipeline import commands
from provq.pipeline.report import plot_panels, read_jsonl, series

CONFIG = "configs/emoji32.yaml"
GAN = ("--tokenizer.loss.gan_weight", "0.1", "--tokenizer.loss.adaptive_gan_weight", "true",
       "--tokenizer.discriminator.base_channels", "32", "--tokenizer.discriminator.num_layers", "2")


def run(name: str, out: Path, steps: int, extra: tuple[str, ...], timings: dict) -> dict:
    tok = out / name
    commands.run_unless_done(f"{name}: tokenizer", commands.train_tokenizer(
        CONFIG, tok, "--max_steps", str(steps), "--tokenizer.train.eval_every", str(steps // 8), *extra),
        tok / "tokenizer" / "model.safetensors", timings)
    commands.run_unless_done(f"{name}: rFID", commands.evaluate(
        "rfid", "--tokenizer", str(tok / "tokenizer"), "--dataset", "emoji", "--split", "test",
        "--lpips_net", "none", "--out", str(tok / "rfid.json")),
        tok / "rfid.json", timings)
    return json.loads((tok / "rfid.json").read_text())["metrics"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/gan_on_off")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/gan_on_off.json")
    args = parser.parse_args(argv)
    out, timings, started = Path(args.output_dir), {}, time.time()
    gan_from = args.steps // 2
    metrics = {"without GAN": run("no_gan", out, args.steps, (), timings),
               f"GAN from step {gan_from}": run("gan", out, args.steps,
                                                 (*GAN, "--tokenizer.loss.disc_start", str(gan_from)), timings)}
    logs = {name: read_jsonl(out / name / "metrics.jsonl") for name in ("no_gan", "gan")}
    figure = Path(args.out).with_suffix(".png")
    plot_panels([
        ("discriminator mean logit", {"real": series(logs["gan"], "gan/logits_real"),
                                      "reconstructed": series(logs["gan"], "gan/logits_fake")}),
        ("reconstruction L1 (train batch)", {"without GAN": series(logs["no_gan"], "loss/reconstruction"),
                                             "with GAN": series(logs["gan"], "loss/reconstruction")}),
        ("PSNR, test batches (dB)", {"without GAN": series(logs["no_gan"], "eval/psnr"),
                                     "with GAN": series(logs["gan"], "eval/psnr")}),
    ], figure, title=f"emoji32 tokenizer, {args.steps} steps; PatchGAN from step {gan_from}")
    result = {"benchmark": "gan_on_off", "config": CONFIG, "steps": args.steps, "gan_from": gan_from,
              "gan_settings": " ".join(GAN), "metrics": {
                  name: {k: m[k] for k in ("rfid", "psnr", "ssim", "codebook_usage", "codebook_perplexity")}
                  for name, m in metrics.items()},
              "stage_seconds": timings, "minutes": round((time.time() - started) / 60, 1),
              "torch_threads": os.environ.get("OMP_NUM_THREADS"), "figure": str(figure)}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()

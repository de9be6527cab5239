"""The main job: both ProVQ stages on the built-in emoji dataset, evaluated, with a report.

    python demo.py --output_dir runs/demo          (what `make demo` runs)

Every stage is the same command a user would type (see README); a stage whose
output already exists is not run again, and the training stages resume from
their last checkpoint, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from generator.sampling import DEFAULT_CFG_SCALE
from provq.common.cli import CommandParser, command_name, run_command
from provq.common.files import write_json_atomic
from provq.common.locks import output_lock
from provq.data.pixels import from_hwc, save_image_grid, to_float
from provq.pipeline import commands
from provq.pipeline.report import markdown_table, plot_panels, read_jsonl, series


def stages(args) -> list[tuple[str, list[str], Path]]:
    """(name, command, file that proves the stage finished)."""
    out, cfg = Path(args.output_dir), args.config
    tok, codes, prior = out / "tok", out / "codes", out / "prior"
    samples, ref = out / "samples", out / "ref" / "train_stats.npz"
    precision = {stage: [] if args.mixed_precision == "preset" else [f"--{stage}.train.mixed_precision",
                                                                      args.mixed_precision]
                 for stage in ("tokenizer", "prior")}
    return [
        ("data", commands.data_describe("--dataset", "emoji"), out / "data.json"),
        ("tokenizer", commands.train_tokenizer(cfg, tok, *precision["tokenizer"]),
         tok / "tokenizer" / "model.safetensors"),
        ("codes", commands.extract_codes(tok / "tokenizer", cfg, codes, "--flip_copies"),
         codes / "tokenizer.json"),
        ("prior", commands.train_prior(cfg, codes, prior, *precision["prior"]), prior / "prior" / "model.safetensors"),
        ("samples", commands.sample(tok / "tokenizer", prior / "prior", cfg, samples, args.num_samples,
                                    *commands.cfg_flag(args.cfg_scale)), samples / "samples.npz"),
        # Cached per dataset and extractor (eval/stats_cache.py): computed by the first demo only,
        # then by the compiled network (1.4x the images/s on CPU after a ~25 s compile).
        ("reference stats", commands.evaluate("stats", "--dataset", "emoji", "--split", "train",
                                              "--resolution", "32", "--compile", "--out", str(ref)), ref),
        # Each evaluation also goes on the model card of what it measured (README.md in the folder).
        ("rFID", commands.evaluate("rfid", "--tokenizer", str(tok / "tokenizer"), "--dataset", "emoji",
                                   "--split", "test", "--card", "--out", str(out / "rfid.json")), out / "rfid.json"),
        ("gFID", commands.evaluate("gfid", "--samples", str(samples / "samples.npz"), "--ref", str(ref),
                                   "--card", str(prior / "prior"), "--out", str(out / "gfid.json")),
         out / "gfid.json"),
    ]


def sample_rows(samples_npz: Path, label_names: list[str], per_class: int, path: Path) -> Path:
    """A grid with one row per class, from the sampled set."""
    data = np.load(samples_npz)
    images, labels = data["arr_0"], data["labels"]
    rows = []
    for c in range(len(label_names)):
        picked = images[labels == c][:per_class]
        if len(picked):
            rows.append(picked)
    picked = np.concatenate(rows)
    return save_image_grid(to_float(from_hwc(picked)), path, nrow=per_class)


def write_report(args, timings: dict) -> Path:
    out = Path(args.output_dir)
    rfid = json.loads((out / "rfid.json").read_text())
    gfid = json.loads((out / "gfid.json").read_text())
    data = json.loads((out / "data.json").read_text())
    records = read_jsonl(out / "tok" / "metrics.jsonl")
    plot_panels(
        [("hardness h", {"h": series(records, "quantizer/hardness")}),
         ("codebook usage", {"batch": series(records, "quantizer/usage"),
                             "test split": series(records, "eval/usage")}),
         ("reconstruction loss", {"train": series(records, "loss/reconstruction")})],
        out / "curves.png", title="ProVQ tokenizer on emoji 32 px",
    )
    label_names = data["label_names"]
    sample_rows(out / "samples" / "samples.npz", label_names, 10, out / "samples_by_class.png")
    recon = sorted((out / "tok" / "images").glob("recon_*.png"))[-1]
    m, g = rfid["metrics"], gfid["metrics"]
    stage_times = {k: v for k, v in timings.items() if k != "peak_rss_gib"}
    row = {"rFID": m.get("rfid"), "PSNR (dB)": m.get("psnr"), "SSIM": m.get("ssim"),
           "codebook usage": m.get("codebook_usage"), "perplexity": m.get("codebook_perplexity"),
           "gFID": g.get("fid"), "IS": g.get("inception_score", "n/a")}
    peak = timings.get("peak_rss_gib", 0.0)
    lines = [
        "# ProVQ demo report", "",
        f"Config: `{args.config}` (the resolved configs are in `tok/config.yaml` and "
        f"`prior/config.yaml`). Device: {'cuda' if torch.cuda.is_available() else 'cpu'}; "
        f"training precision: {args.mixed_precision} (each stage's log names the one it used); "
        f"samples: {args.num_samples}, CFG scale {DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale}.", "",
        "## Metrics", "",
        markdown_table([row], list(row)), "",
        f"rFID on the test split ({rfid['num_images']} images); gFID of {gfid['num_images']['samples']} "
        f"samples against the training split ({gfid['num_images']['ref']} images). FID on a few thousand 32 px images is biased upward; "
        "compare runs with each other, not with published 50k-sample FIDs. "
        f"LPIPS: {m.get('lpips', m.get('lpips_unavailable', 'n/a'))}. "
        f"IS: {g.get('inception_score', g.get('inception_score_unavailable', 'n/a'))}.", "",
        "## Time per stage (seconds)", "",
        markdown_table([stage_times], list(stage_times)) if stage_times else "(no stage ran)", "",
        f"Peak memory of a stage (max RSS of the stage processes): {peak:.2f} GiB.", "",
        "## Reconstructions (originals over reconstructions, test split)", "",
        f"![reconstructions]({recon.relative_to(out)})", "",
        "## Samples, one row per class", "",
        "Rows: " + ", ".join(f"{i}: {n}" for i, n in enumerate(label_names)), "",
        "![samples](samples_by_class.png)", "",
        "## Training curves", "", "![curves](curves.png)", "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> None:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="emoji32", help="a preset name or YAML file (default emoji32)")
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--mixed_precision", default="auto", choices=("auto", "no", "bf16", "preset"),
                        help="both training stages' precision. auto (default): bf16 where this CPU computes it "
                             "faster than fp32 (AMX, AVX-512 BF16; a GPU), else fp32; preset: the config's own")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--cfg_scale", type=float, default=None,
                        help=f"default {DEFAULT_CFG_SCALE} (generator.sampling.DEFAULT_CFG_SCALE)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    with output_lock(out):
        timings_path = out / "timings.json"
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        start = time.time()
        for name, command, done in stages(args):
            capture = done if name == "data" else None  # describe prints its JSON: keep it for the report
            commands.run_unless_done(name, command, done, timings, capture_to=capture)
            # ru_maxrss of waited-for children: the largest stage process so far (KiB on Linux)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            timings["peak_rss_gib"] = round(max(peak, timings.get("peak_rss_gib", 0.0)), 2)
            write_json_atomic(timings_path, timings, what="the stage timings")
        report = write_report(args, timings)
    print(f"\n[demo] done in {time.time() - start:.0f} s; report: {report}", flush=True)


def entry() -> None:
    """``provq-demo`` and ``python demo.py``."""
    run_command(command_name("demo.py"), main, resume="rerun the same command: finished stages are skipped, trainings resume from their checkpoints")


if __name__ == "__main__":
    entry()

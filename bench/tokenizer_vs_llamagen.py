"""Our tokenizer's training step against LlamaGen's at identical shapes, side by side in one process.

    LLAMAGEN_DIR=path/to/LlamaGen OMP_NUM_THREADS=2 python -m bench.tokenizer_vs_llamagen [--steps 20]

LlamaGen's VQModel comes from their checkout (tokenizer/tokenizer_image/vq_model.py, imported from
LLAMAGEN_DIR, never copied) at the shapes its ModelArgs leave to the caller, with ch 64 and 2 res
blocks; ours is the same architecture (tokenizer/convert.py maps one onto the other exactly):
32 px, multipliers 1,2,2, z 64, 1,024 l2-normalized codes of dim 8. Both steps are forward, L2 +
their VQ losses, backward, clip 1.0 and Adam, on the same batch of 32; ours at hardness 1 (hard VQ,
the same work as theirs). Steps alternate ABBA so that load from elsewhere hits both alike; the
figure is the ratio of median step times, for fp32 and bf16 autocast. Writes one JSON.

--compile ours compiles our encoder and decoder in place as train.compile does (the quantizer stays
eager); --compile both does the same to LlamaGen's encoder and decoder, for a like-for-like ratio.
Compile time is reported separately (the warm-up steps' seconds), not in the ratio.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.results_io import write_result
from tokenizer import ProVQTokenizer, QuantizerConfig, ScheduleConfig, TokenizerConfig

SHAPE = dict(ch=64, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=64, codebook_size=1024, codebook_dim=8)


def llamagen_model(root: Path, channels_last: bool):
    # By file: their package is also called `tokenizer`; vq_model.py itself imports only torch.
    spec = importlib.util.spec_from_file_location("llamagen_vq_model", root / "tokenizer/tokenizer_image/vq_model.py")
    vq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vq)
    vq.Encoder = functools.partial(vq.Encoder, ch=SHAPE["ch"], num_res_blocks=SHAPE["num_res_blocks"])
    vq.Decoder = functools.partial(vq.Decoder, ch=SHAPE["ch"], num_res_blocks=SHAPE["num_res_blocks"])
    model = vq.VQModel(vq.ModelArgs(encoder_ch_mult=SHAPE["ch_mult"], decoder_ch_mult=SHAPE["ch_mult"],
                                    z_channels=SHAPE["z_channels"], codebook_size=SHAPE["codebook_size"],
                                    codebook_embed_dim=SHAPE["codebook_dim"],
                                    # their usage buffer is a Parameter registered as a buffer: its
                                    # in-place update fails under torch 2 in training mode
                                    codebook_show_usage=False)).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def our_model(channels_last: bool) -> ProVQTokenizer:
    config = TokenizerConfig(resolution=32, base_channels=SHAPE["ch"], channel_multipliers=SHAPE["ch_mult"],
                             num_res_blocks=SHAPE["num_res_blocks"], latent_channels=SHAPE["z_channels"],
                             attention=True, norm_num_groups=32, quantizer=QuantizerConfig(
                                 codebook_size=SHAPE["codebook_size"], codebook_dim=SHAPE["codebook_dim"],
                                 l2_normalize=True, kmeans_init=False, schedule=ScheduleConfig(kind="none")))
    model = ProVQTokenizer(config).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def theirs_loss(model, images):
    reconstruction, (vq_loss, commit_loss, entropy_loss, _) = model(images)
    return F.mse_loss(reconstruction.float(), images) + vq_loss + commit_loss + entropy_loss


def ours_loss(model, images):
    out = model(images, hardness=1.0)
    return F.mse_loss(out.reconstruction.float(), images) + out.quantizer.loss


def step(model, optimizer, loss_fn, images, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, images)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return time.perf_counter() - start


def compile_blocks(model) -> None:
    model.encoder.compile()  # both VQModels have .encoder and .decoder
    model.decoder.compile()


def compare(root: Path, bf16: bool, args) -> dict:
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    runs = {"llamagen": (llamagen_model(root, args.channels_last), theirs_loss),
            "ours": (our_model(args.channels_last), ours_loss)}
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for k, (m, _) in runs.items()}
    compiled = {"none": (), "ours": ("ours",), "both": ("ours", "llamagen")}[args.compile]
    warmup_seconds = {}
    for name, (model, loss_fn) in runs.items():
        if name in compiled:
            compile_blocks(model)
        warmup_seconds[name] = round(sum(step(model, optimizers[name], loss_fn, images, bf16)
                                         for _ in range(args.warmup)), 1)
    seconds = {name: [] for name in runs}
    for i in range(args.steps):
        for name in list(runs) if i % 2 == 0 else list(reversed(runs)):
            model, loss_fn = runs[name]
            seconds[name].append(step(model, optimizers[name], loss_fn, images, bf16))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"images_per_s": {k: round(args.batch / v, 2) for k, v in median.items()},
            "parameters": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in runs.items()},
            "compiled": list(compiled), "warmup_seconds_incl_compile": warmup_seconds,
            "ours_speed_vs_llamagen": round(median["llamagen"] / median["ours"], 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels_last", action="store_true", help="both models and the batch")
    parser.add_argument("--compile", choices=("none", "ours", "both"), default="none")
    parser.add_argument("--out", default="bench/results/tokenizer_vs_llamagen.json")
    args = parser.parse_args(argv)
    root = os.environ.get("LLAMAGEN_DIR")
    if not root or not (Path(root) / "tokenizer" / "tokenizer_image" / "vq_model.py").is_file():
        raise SystemExit("set LLAMAGEN_DIR to a checkout of FoundationVision/LlamaGen")
    result = {"benchmark": "tokenizer training step, ours vs LlamaGen's VQModel", "shape": SHAPE,
              "batch": args.batch, "steps": args.steps, "channels_last": args.channels_last, "compile": args.compile,
              "step": "forward + L2 + VQ losses + backward + clip 1.0 + Adam",
              "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "load_average_before": os.getloadavg()}
    for precision in ("fp32", "bf16"):
        result[precision] = compare(Path(root), precision == "bf16", args)
    result["load_average_after"] = os.getloadavg()
    return write_result(result, args.out)


if __name__ == "__main__":
    main()

"""Stage 1: train a ProVQ tokenizer with Accelerate (arXiv 2603.22304).

    accelerate launch train_tokenizer.py --config configs/emoji32.yaml --output_dir runs/tok
    python train_tokenizer.py --config configs/emoji32.yaml --output_dir runs/tok --max_steps 100

Hardness h(step) anneals the quantizer from a continuous autoencoder (h=0) to
hard VQ (h=1); the run ends by exporting ``<output_dir>/tokenizer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

import training
from common.cli import run_command
from data import DataConfig, SkipTracker, collate, load_split
from data.pixels import save_image_grid
from eval.metrics import codebook_usage, psnr
from tokenizer import ProVQTokenizer, TokenizerConfig, losses
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import LossConfig
from tokenizer.schedule import hardness

logger = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerTrainConfig(training.TrainConfig):
    disc_lr: float = 1e-4
    eval_batches: int = 8  # test batches for the PSNR/usage evaluation


@dataclass
class TokenizerStage:
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class TokenizerRun:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)


def build_dataloaders(config: TokenizerRun, train: TokenizerTrainConfig):
    train_set = load_split(config.data, config.data.train_split, train=True, seed=train.seed)
    test_set = load_split(config.data, config.data.test_split, train=False)
    common = dict(batch_size=train.batch_size, num_workers=train.num_workers, collate_fn=collate)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **common)
    test_loader = torch.utils.data.DataLoader(test_set, shuffle=False, **common)
    return train_loader, test_loader


@dataclass
class GAN:
    disc: torch.nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class TokenizerParts(training.TrainParts):
    """The prepared tokenizer and everything that trains, evaluates or pictures it."""

    test_loader: torch.utils.data.DataLoader
    gan: GAN | None
    perceptual: torch.nn.Module | None
    config: TokenizerStage
    skips: SkipTracker = field(default_factory=SkipTracker)


def make_optimizer(params, train: TokenizerTrainConfig, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)


def build_gan(stage: TokenizerStage, accelerator) -> GAN:
    disc = PatchDiscriminator(stage.discriminator)
    optimizer = make_optimizer(disc.parameters(), stage.train, stage.train.disc_lr)
    disc, optimizer = accelerator.prepare(disc, optimizer)
    return GAN(disc, optimizer)


def build_parts(config: TokenizerRun, accelerator) -> TokenizerParts:
    """Model, data, optimizer, GAN, perceptual loss and EMA, prepared and registered for checkpoints."""
    stage = config.tokenizer
    train, loss_config = stage.train, stage.loss
    model = ProVQTokenizer(stage.model)
    train_loader, test_loader = build_dataloaders(config, train)
    optimizer = make_optimizer(model.parameters(), train, train.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    gan = build_gan(stage, accelerator) if loss_config.gan_weight > 0 else None
    perceptual = losses.make_perceptual_loss(loss_config.perceptual_weight, loss_config.perceptual_net)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    ema = training.build_ema(model, train.ema_decay, accelerator)
    quantizer = accelerator.unwrap_model(model).quantizer
    accelerator.register_for_checkpointing(quantizer.training_state)
    # steps_since_used (dead codes) is kept out of the weights; a resumed run still needs it.
    accelerator.register_for_checkpointing(training.NonPersistentBuffers(quantizer))
    return TokenizerParts(model, optimizer, train_loader, ema, test_loader, gan, perceptual, stage)


def train_step(parts: TokenizerParts, batch: dict, ctx: training.StepContext) -> training.StepTerms:
    """One micro-batch: generator update, then (after disc_start) discriminator update."""
    train, weights, accelerator = parts.config.train, parts.config.loss, ctx.accelerator
    parts.skips.update(batch)
    images, step = batch["image"], ctx.step
    h = hardness(step, parts.config.model.quantizer.schedule, train.max_steps)
    # Per micro-batch, so the micro-batches of one accumulated step get different masks.
    out = parts.model(images, hardness=h, generator=ctx.generator())
    recon = out.reconstruction
    rec = losses.reconstruction_loss(recon, images, weights.reconstruction)
    nll = weights.reconstruction_weight * rec
    logged = {"loss/reconstruction": rec.detach(), "loss/vq": out.quantizer.vq_loss.detach()}
    if parts.perceptual is not None:
        perc = parts.perceptual(recon, images).mean()
        nll = nll + weights.perceptual_weight * perc
        logged["loss/perceptual"] = perc.detach()
    loss = nll + out.quantizer.vq_loss
    gan_on = parts.gan is not None and losses.gan_active(step, weights.disc_start)
    if gan_on:
        g_loss = losses.hinge_g_loss(parts.gan.disc(recon))
        weight = torch.ones((), device=images.device)
        if weights.adaptive_gan_weight:
            last = accelerator.unwrap_model(parts.model).last_layer
            weight = losses.adaptive_gan_weight(nll, g_loss, last, max_weight=weights.max_adaptive_weight)
        loss = loss + weights.gan_weight * weight * g_loss
        logged.update({"loss/gan_g": g_loss.detach(), "loss/gan_weight": weight.detach()})
    training.check_finite(step, **logged, total=loss)
    training.optimizer_step(parts.optimizer, parts.model, loss, ctx, train.lr, "generator")
    if gan_on:
        logged["loss/gan_d"] = discriminator_step(parts.gan, images, recon.detach(), ctx)
    logged["loss/total"] = loss.detach()
    if parts.ema is not None and out.quantizer.initialized_now:
        sync_ema_codebook(parts.ema, accelerator.unwrap_model(parts.model))
    return training.StepTerms(averaged=logged, shared={f"quantizer/{k}": v for k, v in out.quantizer.stats.items()})


def sync_ema_codebook(ema, tok) -> None:
    """The k-means init replaces the live codebook; the EMA must not keep averaging the random one."""
    for (name, param), shadow in zip(tok.named_parameters(), ema.shadow_params, strict=True):
        if name.startswith("quantizer."):
            shadow.data.copy_(param.data)


def discriminator_step(gan: GAN, real, fake, ctx: training.StepContext):
    d_loss = losses.hinge_d_loss(gan.disc(real), gan.disc(fake))
    training.check_finite(ctx.step, discriminator=d_loss)
    training.optimizer_step(gan.optimizer, gan.disc, d_loss, ctx, ctx.train.disc_lr, "discriminator")
    return d_loss.detach()


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int) -> dict:
    """Hard-quantized PSNR and codebook usage on the first test batches (all processes' together)."""
    model.eval()
    tok = accelerator.unwrap_model(model)
    size = tok.config.quantizer.codebook_size
    counts = torch.zeros(size, dtype=torch.float64, device=accelerator.device)
    psnr_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    images_seen = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        images = batch["image"]
        codes = tok.encode(images)
        recon = tok.decode(codes)
        counts += torch.bincount(codes.flatten(), minlength=size).double()
        psnr_sum += psnr((recon + 1) / 2, (images + 1) / 2).double().sum()
        images_seen += images.shape[0]
    counts, psnr_sum, images_seen = (accelerator.reduce(t, "sum") for t in (counts, psnr_sum, images_seen))
    model.train()
    usage = codebook_usage(counts)
    return {"eval/psnr": (psnr_sum / images_seen.clamp_min(1)).item(),
            "eval/usage": usage["codebook_usage"], "eval/perplexity": usage["codebook_perplexity"]}


@torch.no_grad()
def write_reconstructions(model, loader, accelerator, path: Path, count: int = 8) -> None:
    """Originals over their hard-quantized reconstructions (the same images every time)."""
    dataset = loader.dataset
    batch = collate([dataset[i] for i in range(min(count, len(dataset)))])
    images = batch["image"].to(accelerator.device)
    tok = accelerator.unwrap_model(model)
    was_training = tok.training
    tok.eval()
    recon = tok.decode(tok.encode(images))
    tok.train(was_training)
    if accelerator.is_main_process:
        save_image_grid(torch.cat([images, recon]), path, nrow=images.shape[0])


def tokenizer_stage(parts: TokenizerParts, run) -> training.Stage:
    """The loop's view of stage 1: its step, and evaluations and pictures when due."""
    train, accelerator = parts.config.train, run.accelerator

    def evaluate_now(step: int) -> None:
        run.metrics_log.log(step, evaluate(parts.model, parts.test_loader, accelerator, train.eval_batches))

    def pictures_now(step: int) -> None:
        write_reconstructions(parts.model, parts.test_loader, accelerator,
                              run.output_dir / "images" / f"recon_{step:08d}.png")

    return training.Stage("tokenizer", train_step, [training.Periodic(train.eval_every, evaluate_now),
                                           training.Periodic(train.image_every, pictures_now)],
                 items="images", postfix={"h": "quantizer/hardness", "rec": "loss/reconstruction",
                                          "usage": "quantizer/usage"})


def train(config: TokenizerRun, output_dir: str | Path, resume: str | None = None) -> Path:
    output_dir = Path(output_dir)
    run = training.start_run(config, config.tokenizer.train, output_dir, "tokenizer", resume)
    parts = build_parts(config, run.accelerator)
    run.resume()
    logger.info("training on %s, %d process(es), %d torch thread(s) each, precision %s",
                run.accelerator.device, run.accelerator.num_processes, run.threads, run.train.mixed_precision)
    training.train_loop(run, parts, tokenizer_stage(parts, run))
    parts.skips.report()
    return training.finish_run(run, parts, output_dir / "tokenizer")


def main(argv=None) -> Path:
    parser = training.make_parser(__doc__.splitlines()[0])
    config, args = training.parse_config(parser, TokenizerRun, "tokenizer", argv)
    return train(config, args.output_dir, resume=args.resume)


if __name__ == "__main__":
    run_command("train_tokenizer.py", main)

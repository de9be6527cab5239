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
from tqdm.auto import tqdm

from data import DataConfig, SkipTracker, collate, load_split
from tokenizer import ProVQTokenizer, TokenizerConfig
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import (
    LossConfig,
    adaptive_gan_weight,
    gan_active,
    hinge_d_loss,
    hinge_g_loss,
    make_perceptual_loss,
    reconstruction_loss,
)
from tokenizer.schedule import hardness
from training import (
    DivergenceError,
    TrainConfig,
    batches,
    check_finite,
    make_parser,
    parse_config,
    seed_step,
    step_generator,
)
from training.images import save_image_grid
from training.loop import Run, due, start_run
from training.runtime import (
    NonPersistentBuffers,
    build_ema,
    clip_and_check,
    export_pretrained,
    global_terms,
    set_lr,
)

logger = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerTrainConfig(TrainConfig):
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


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int) -> dict:
    """Hard-quantized PSNR and codebook usage on the first test batches."""
    model.eval()
    tok = accelerator.unwrap_model(model)
    size = tok.config.quantizer.codebook_size
    counts = torch.zeros(size, device=accelerator.device)
    se, n = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        images = batch["image"]
        codes = tok.encode(images)
        recon = tok.decode(codes).clamp(-1, 1)
        counts += torch.bincount(codes.flatten(), minlength=size).float()
        mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
        se += (10 * torch.log10(1 / mse.clamp_min(1e-10))).sum()
        n += images.shape[0]
    counts, se, n = (accelerator.reduce(t, "sum") for t in (counts, se, n))
    model.train()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {
        "eval/psnr": (se / n.clamp_min(1)).item(),
        "eval/usage": (counts > 0).float().mean().item(),
        "eval/perplexity": perplexity.item(),
    }


@dataclass
class Parts:
    """The prepared model and everything that trains or evaluates it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    gan: GAN | None
    perceptual: torch.nn.Module | None
    ema: object | None


def build_parts(config: TokenizerRun, accelerator) -> Parts:
    """Model, data, optimizer, GAN, perceptual loss and EMA, prepared and registered for checkpoints."""
    train, loss_config = config.tokenizer.train, config.tokenizer.loss
    model = ProVQTokenizer(config.tokenizer.model)
    train_loader, test_loader = build_dataloaders(config, train)
    optimizer = make_optimizer(model.parameters(), train, train.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    gan = build_gan(config.tokenizer, accelerator) if loss_config.gan_weight > 0 else None
    perceptual = make_perceptual_loss(loss_config.perceptual_weight, loss_config.perceptual_net)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    ema = build_ema(model, train.ema_decay, accelerator)
    quantizer = accelerator.unwrap_model(model).quantizer
    accelerator.register_for_checkpointing(quantizer.training_state)
    # steps_since_used (dead codes) is kept out of the weights; a resumed run still needs it.
    accelerator.register_for_checkpointing(NonPersistentBuffers(quantizer))
    return Parts(model, optimizer, train_loader, test_loader, gan, perceptual, ema)


def train(config: TokenizerRun, output_dir: str | Path, resume: str | None = None) -> Path:
    output_dir, train = Path(output_dir), config.tokenizer.train
    run = start_run(config, train, output_dir, "tokenizer", resume)
    accelerator = run.accelerator
    parts = build_parts(config, accelerator)
    step = run.resume()
    skips = SkipTracker()
    schedule = config.tokenizer.model.quantizer.schedule
    progress = tqdm(total=train.max_steps, initial=step, desc="tokenizer", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    logger.info("training on %s, %d process(es), %d torch thread(s) each, precision %s",
                accelerator.device, accelerator.num_processes, run.threads, train.mixed_precision)
    micro_batches = batches(parts.train_loader, accelerator, step, train.grad_accum_steps)
    micro_step = step * train.grad_accum_steps  # randomness is a function of it: resume replays it
    while step < train.max_steps:
        batch = next(micro_batches)
        seed_step(train.seed, micro_step, accelerator.process_index)
        skips.update(batch)
        h = hardness(step, schedule, train.max_steps)
        with accelerator.accumulate(parts.model):
            terms, codebook_reset = train_step(parts.model, parts.gan, parts.perceptual, parts.optimizer,
                                               batch["image"], h, step, config.tokenizer, accelerator, micro_step)
        micro_step += 1
        if parts.ema is not None and codebook_reset:
            sync_ema_codebook(parts.ema, accelerator.unwrap_model(parts.model))
        if not accelerator.sync_gradients:
            continue
        step += 1
        if parts.ema is not None:
            parts.ema.step(accelerator.unwrap_model(parts.model).parameters())
        progress.update(1)
        after_step(run, parts, step, h, terms, train, output_dir, progress)
    progress.close()
    skips.report()
    export = export_pretrained(parts.model, parts.ema, accelerator, output_dir / "tokenizer")
    accelerator.end_training()
    return export


def after_step(run: Run, parts: Parts, step: int, h: float, terms: dict, train: TokenizerTrainConfig,
               output_dir: Path, progress) -> None:
    """The periodic work after an optimizer step: log, evaluate, pictures, checkpoint (in that order)."""
    accelerator = run.accelerator
    if due(step, train.log_every, train.max_steps):
        logs = global_terms(terms, accelerator)
        logs.update(lr=parts.optimizer.param_groups[0]["lr"], images_per_s=run.items_per_s(step, train))
        run.metrics_log.log(step, logs)
        progress.set_postfix(h=f"{h:.2f}", rec=f"{logs['loss/reconstruction']:.4f}",
                             usage=f"{logs.get('quantizer/usage', 0):.2f}")
    # The final evaluation comes before the final checkpoint, like every line of the
    # log: a run resumed from any checkpoint then never logs a step twice.
    if due(step, train.eval_every, train.max_steps):
        run.metrics_log.log(step, evaluate(parts.model, parts.test_loader, accelerator, train.eval_batches))
    if due(step, train.image_every, train.max_steps):
        write_reconstructions(parts.model, parts.test_loader, accelerator,
                              output_dir / "images" / f"recon_{step:08d}.png")
    if due(step, train.save_every, train.max_steps):
        run.manager.save(accelerator, step)


def make_optimizer(params, train: TokenizerTrainConfig, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)


@dataclass
class GAN:
    disc: torch.nn.Module
    optimizer: torch.optim.Optimizer


def build_gan(stage: TokenizerStage, accelerator) -> GAN:
    disc = PatchDiscriminator(stage.discriminator)
    optimizer = make_optimizer(disc.parameters(), stage.train, stage.train.disc_lr)
    disc, optimizer = accelerator.prepare(disc, optimizer)
    return GAN(disc, optimizer)


def train_step(model, gan, perceptual, opt_g, images, h, step, stage: TokenizerStage,
               accelerator, micro_step: int | None = None) -> tuple[dict, bool]:
    """One micro-batch: generator update, then (after disc_start) discriminator update.

    Returns the logged terms and whether the k-means init replaced the codebook.
    """
    train, weights = stage.train, stage.loss
    # Per micro-batch, so the micro-batches of one accumulated step get different masks.
    micro_step = step if micro_step is None else micro_step
    generator = step_generator(train.seed, micro_step, accelerator.process_index)
    out = model(images, hardness=h, generator=generator)
    recon = out.reconstruction
    rec = reconstruction_loss(recon, images, weights.reconstruction)
    nll = weights.reconstruction_weight * rec
    terms = {"loss/reconstruction": rec.detach(), "loss/vq": out.quantizer.vq_loss.detach()}
    if perceptual is not None:
        perc = perceptual(recon, images).mean()
        nll = nll + weights.perceptual_weight * perc
        terms["loss/perceptual"] = perc.detach()
    loss = nll + out.quantizer.vq_loss
    gan_on = gan is not None and gan_active(step, weights.disc_start)
    if gan_on:
        g_loss = hinge_g_loss(gan.disc(recon))
        weight = torch.ones((), device=images.device)
        if weights.adaptive_gan_weight:
            last = accelerator.unwrap_model(model).last_layer
            weight = adaptive_gan_weight(nll, g_loss, last, max_weight=weights.max_adaptive_weight)
        loss = loss + weights.gan_weight * weight * g_loss
        terms.update({"loss/gan_g": g_loss.detach(), "loss/gan_weight": weight.detach()})
    check_finite(step, **terms, total=loss)
    set_lr(opt_g, train.lr, step, train)
    accelerator.backward(loss)
    clip_and_check(model, train, step, accelerator, "generator")
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    if gan_on:
        terms["loss/gan_d"] = discriminator_step(gan, images, recon.detach(), step, train, accelerator)
    terms["loss/total"] = loss.detach()
    terms.update({f"quantizer/{k}": v for k, v in out.quantizer.stats.items()})
    return terms, out.quantizer.initialized_now


def sync_ema_codebook(ema, tok) -> None:
    """The k-means init replaces the live codebook; the EMA must not keep averaging the random one."""
    for (name, param), shadow in zip(tok.named_parameters(), ema.shadow_params, strict=True):
        if name.startswith("quantizer."):
            shadow.data.copy_(param.data)


def discriminator_step(gan: GAN, real, fake, step, train, accelerator):
    d_loss = hinge_d_loss(gan.disc(real), gan.disc(fake))
    check_finite(step, discriminator=d_loss)
    set_lr(gan.optimizer, train.disc_lr, step, train)
    accelerator.backward(d_loss)
    clip_and_check(gan.disc, train, step, accelerator, "discriminator")
    gan.optimizer.step()
    gan.optimizer.zero_grad(set_to_none=True)
    return d_loss.detach()


@torch.no_grad()
def write_reconstructions(model, loader, accelerator, path: Path, count: int = 8) -> None:
    """Originals over their hard-quantized reconstructions (the same images every time)."""
    dataset = loader.dataset
    batch = collate([dataset[i] for i in range(min(count, len(dataset)))])
    images = batch["image"].to(accelerator.device)
    tok = accelerator.unwrap_model(model)
    was_training = tok.training
    tok.eval()
    recon = tok.decode(tok.encode(images)).clamp(-1, 1)
    tok.train(was_training)
    if accelerator.is_main_process:
        save_image_grid(torch.cat([images, recon]), path, nrow=images.shape[0])


def main(argv=None) -> Path:
    parser = make_parser(__doc__.splitlines()[0])
    config, args = parse_config(parser, TokenizerRun, "tokenizer", argv)
    try:
        return train(config, args.output_dir, resume=args.resume)
    except DivergenceError as error:
        raise SystemExit(f"train_tokenizer.py: {error}") from error


if __name__ == "__main__":
    main()

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

from eval.metrics import codebook_usage, uint8_psnr
from provq import training
from provq.common.cards import CardMetric, dataset_name
from provq.common.cli import command_name, make_parser, parse_config, run_command
from provq.common.errors import ConfigError
from provq.common.files import load_weights
from provq.common.folders import expect_kind
from provq.common.moments import MomentAccumulator
from provq.common.pretrained import CONFIG_NAME, WEIGHTS_NAME
from provq.common.typed_config import check_ranges
from provq.data import DataConfig, DatasetError, ImageDataset, SkipTracker, collate, load_split
from provq.data.pixels import save_image_grid, to_uint8
from tokenizer import ProVQTokenizer, TokenizerConfig, losses
from tokenizer.codebook_stats import participation_ratio
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator
from tokenizer.losses import LossConfig
from tokenizer.schedule import hardness, kmeans_due

logger = logging.getLogger("train_tokenizer")


@dataclass
class TokenizerTrainConfig(training.TrainConfig):
    disc_lr: float = 1e-4
    eval_batches: int = 8  # test batches for the PSNR/usage evaluation; 0 = all
    # The k-means init replaces the codebook: clear its Adam moments then, so the warm-up's moments of
    # the random codes do not steer the new ones (off by default: the presets' runs stay as they were).
    reset_codebook_moments: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("disc_lr",), non_negative=("eval_batches",))


@dataclass
class TokenizerSection:
    """The preset's ``tokenizer:`` section."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass
class TrainTokenizerConfig:
    """What train_tokenizer.py reads: the ``data:`` and ``tokenizer:`` sections."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)


def load_data(config: TrainTokenizerConfig) -> tuple[ImageDataset, ImageDataset]:
    """The training and test splits, checked before the run writes anything."""
    data, train_config = config.data, config.tokenizer.train
    if data.resolution != config.tokenizer.model.resolution:
        raise ConfigError(f"data.resolution {data.resolution} differs from tokenizer.model.resolution "
                          f"{config.tokenizer.model.resolution}: the export would claim a resolution it "
                          "was not trained at; set both")
    train_set = load_split(data, data.train_split, train=True, seed=train_config.seed)
    test_set = load_split(data, data.test_split, train=False)
    needed = train_config.batch_size * training.launched_processes()
    if len(train_set) < needed:
        raise DatasetError(f"the training split has {len(train_set)} images, fewer than one global batch "
                           f"({needed}): lower tokenizer.train.batch_size or add images")
    return train_set, test_set


def build_dataloaders(datasets: tuple[ImageDataset, ImageDataset], batch_size: int, num_workers: int):
    loader_args = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    train_loader = torch.utils.data.DataLoader(datasets[0], shuffle=True, drop_last=True, **loader_args)
    test_loader = torch.utils.data.DataLoader(datasets[1], shuffle=False, **loader_args)
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
    config: TokenizerSection
    skips: SkipTracker = field(default_factory=SkipTracker)

    def accumulated(self) -> list:
        return [self.model] + ([self.gan.disc] if self.gan is not None else [])


def build_gan(section: TokenizerSection, accelerator) -> GAN:
    disc = PatchDiscriminator(section.discriminator)
    optimizer = training.make_optimizer(disc, section.train, section.train.disc_lr)
    disc, optimizer = accelerator.prepare(disc, optimizer)
    return GAN(disc, optimizer)


def check_init_from(model: TokenizerConfig, folder: str | None) -> None:
    """``--init_from`` takes the weights of a tokenizer folder (ours or converted) whose architecture
    is the run's; checked before the run writes anything."""
    if folder is None:
        return
    expect_kind(folder, "tokenizer", "--init_from")
    saved = ProVQTokenizer.read_config(Path(folder) / CONFIG_NAME).architecture()
    differ = {k: (v, saved[k]) for k, v in model.architecture().items() if saved[k] != v}
    if differ:
        listed = ", ".join(f"{k} {ours} (folder: {theirs})" for k, (ours, theirs) in differ.items())
        raise ConfigError(f"--init_from {folder} is another tokenizer than tokenizer.model describes: {listed}")


def build_parts(config: TrainTokenizerConfig, datasets, accelerator, init_from: str | None = None) -> TokenizerParts:
    """Model, data, optimizer, GAN, perceptual loss and EMA, prepared and registered for checkpoints."""
    section = config.tokenizer
    train_config, loss_config = section.train, section.loss
    model = ProVQTokenizer(section.model)
    if init_from is not None:  # weights only: the optimizer starts fresh; a resume loads over them
        load_weights(model, Path(init_from) / WEIGHTS_NAME)
    if train_config.compile:  # in place, so the weights keep their names; the quantizer stays eager
        model.encoder.compile()  # (it takes the hardness as a number and runs collectives)
        model.decoder.compile()
    train_loader, test_loader = build_dataloaders(datasets, train_config.batch_size, config.data.num_workers)
    optimizer = training.make_optimizer(model, train_config, train_config.lr)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    gan = build_gan(section, accelerator) if loss_config.gan_weight > 0 else None
    perceptual = losses.make_perceptual_loss(loss_config.perceptual_weight, loss_config.perceptual_net)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    ema = training.build_ema(model, train_config.ema_decay, accelerator)
    quantizer = accelerator.unwrap_model(model).quantizer
    accelerator.register_for_checkpointing(quantizer.kmeans_buffer)
    # steps_since_used (dead codes) and the remedies' EMA state (quantizer.code_ema) are kept out of the
    # weights; a resumed run still needs them.
    accelerator.register_for_checkpointing(training.NonPersistentBuffers(quantizer))
    return TokenizerParts(model, optimizer, train_loader, ema, test_loader, gan, perceptual, section)


def train_step(parts: TokenizerParts, batch: dict, ctx: training.StepContext) -> training.StepTerms:
    """One micro-batch: the loss and the generator's update, then (after disc_start) the
    discriminator's update."""
    train_config, loss_config, accelerator = parts.config.train, parts.config.loss, ctx.accelerator
    parts.skips.update(batch)
    images, step = batch["image"], ctx.step
    schedule = parts.config.model.quantizer.schedule
    h = hardness(step, schedule, train_config.max_steps)
    # Per micro-batch, so the micro-batches of one accumulated step get different masks.
    out = parts.model(images, hardness=h, generator=ctx.generator(),
                      fit_codebook=kmeans_due(step, schedule, train_config.max_steps))
    recon = out.reconstruction
    rec = losses.reconstruction_loss(recon, images, loss_config.reconstruction)
    pixel_loss = loss_config.reconstruction_weight * rec  # what the adaptive GAN weight balances against
    logged = {"loss/reconstruction": rec.detach(), "loss/quantizer": out.quantizer.loss.detach()}
    if parts.config.model.quantizer.kind == "lfq":
        logged["loss/entropy"] = out.quantizer.entropy_loss.detach()
    if parts.perceptual is not None:
        perc = parts.perceptual(recon, images).mean()
        pixel_loss = pixel_loss + loss_config.perceptual_weight * perc
        logged["loss/perceptual"] = perc.detach()
    loss = pixel_loss + out.quantizer.loss
    gan_on = parts.gan is not None and losses.gan_active(step, loss_config.disc_start)
    if gan_on:
        g_loss = generator_adversarial_loss(parts.gan, recon, accelerator)
        weight = torch.ones((), device=images.device)
        if loss_config.adaptive_gan_weight:
            last = accelerator.unwrap_model(parts.model).last_layer
            weight = losses.adaptive_gan_weight(pixel_loss, g_loss, last, max_weight=loss_config.max_adaptive_weight)
        loss = loss + loss_config.gan_weight * weight * g_loss
        logged.update({"loss/gan_g": g_loss.detach(), "loss/gan_weight": weight.detach()})
    training.check_finite(step, **logged, total=loss)
    if out.quantizer.initialized_now and train_config.reset_codebook_moments:
        reset_codebook_moments(parts.optimizer, accelerator.unwrap_model(parts.model))
    training.optimizer_step(parts.optimizer, parts.model, loss, ctx, train_config.lr, "generator")
    if gan_on:
        logged.update(discriminator_step(parts.gan, images, recon.detach(), ctx, loss_config.disc_loss_weight))
    logged["loss/total"] = loss.detach()
    if parts.ema is not None and out.quantizer.initialized_now:
        sync_ema_codebook(parts.ema, accelerator.unwrap_model(parts.model))
    return training.StepTerms(averaged=logged, shared={f"quantizer/{k}": v for k, v in out.quantizer.stats.items()})


def reset_codebook_moments(optimizer, tok) -> None:
    """Forget the optimizer's state (Adam's moments, its step count) for the codebook only."""
    getattr(optimizer, "optimizer", optimizer).state.pop(tok.quantizer.codebook.weight, None)


def sync_ema_codebook(ema, tok) -> None:
    """The k-means init replaces the live codebook; the EMA must not keep averaging the random one."""
    for (name, param), shadow in zip(tok.named_parameters(), ema.shadow_params, strict=True):
        if name.startswith("quantizer."):
            shadow.data.copy_(param.data)


def generator_adversarial_loss(gan: GAN, recon: torch.Tensor, accelerator) -> torch.Tensor:
    """The hinge generator loss through a frozen discriminator: gradients reach the tokenizer only,
    so the discriminator's own update is exactly the one its loss gives. The unwrapped module keeps
    DDP out of a forward whose backward never reaches its parameters."""
    disc = accelerator.unwrap_model(gan.disc)
    disc.requires_grad_(False)
    try:
        return losses.hinge_g_loss(disc(recon))
    finally:
        disc.requires_grad_(True)  # the graph is built: autograd will not write to them


def discriminator_step(gan: GAN, real, fake, ctx: training.StepContext, weight: float) -> dict:
    """One update of the discriminator from its weighted hinge loss on real and (detached) fake
    images; returns the logged loss and the mean logits on each."""
    logits_real, logits_fake = gan.disc(real), gan.disc(fake)
    d_loss = losses.hinge_d_loss(logits_real, logits_fake)
    training.check_finite(ctx.step, discriminator=d_loss)
    training.optimizer_step(gan.optimizer, gan.disc, weight * d_loss, ctx, ctx.train.disc_lr, "discriminator")
    return {"loss/gan_d": d_loss.detach(), "gan/logits_real": logits_real.detach().float().mean(),
            "gan/logits_fake": logits_fake.detach().float().mean()}


@torch.no_grad()
def evaluate(model, loader, accelerator, max_batches: int) -> dict:
    """Hard-quantized PSNR (on uint8 pixels, as ``python -m eval rfid``), codebook usage and the
    geometry of latents and codes on the first ``max_batches`` test batches (0: all; all processes'
    together): the effective dimension (participation ratio) of the encoder outputs z_e and of the
    codes they use, and z_e's mean distance to its code."""
    model.eval()
    tok = accelerator.unwrap_model(model)
    size, device = tok.config.quantizer.codebook_size, accelerator.device
    counts = torch.zeros(size, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # PSNR, distance to the code, images
    latents = MomentAccumulator(tok.quantizer.codebook_dim, device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images = batch["image"]
        out = tok(images, hardness=1.0)  # eval mode: hard codes, no statistics kept, no collectives
        q = out.quantizer
        counts += torch.bincount(q.indices.flatten(), minlength=size).double()
        rows_e, rows_q = (t.movedim(1, -1).reshape(-1, t.shape[1]) for t in (q.z_e, q.z_q))
        latents.update(rows_e)
        sums += torch.stack([uint8_psnr(to_uint8(images), to_uint8(out.reconstruction)).double().sum(),
                             (rows_e - rows_q).norm(dim=-1).double().mean() * images.shape[0],
                             torch.tensor(float(images.shape[0]), dtype=torch.float64, device=device)])
    counts, sums = (accelerator.reduce(t, "sum") for t in (counts, sums))
    latents.reduce(lambda t: accelerator.reduce(t, "sum"))
    model.train()
    used = counts > 0
    codes = tok.quantizer.codebook_vectors()[used].double()
    stats, n = codebook_usage(counts), sums[2].clamp_min(1)
    return {"eval/psnr": (sums[0] / n).item(), "eval/usage": stats["codebook_usage"],
            "eval/perplexity": stats["codebook_perplexity"], "eval/code_distance": (sums[1] / n).item(),
            "eval/dim_latents": participation_ratio(latents.covariance()),
            "eval/dim_codes": participation_ratio(torch.cov(codes.T)) if len(codes) > 1 else 0.0,
            "eval/images": int(sums[2].item())}


def card_metrics(evaluation: dict, config: TrainTokenizerConfig) -> list[CardMetric]:
    """The last evaluation of the run as the exported tokenizer's card metrics, with their protocol."""
    train_config = config.tokenizer.train
    protocol = {"images": evaluation["eval/images"], "resolution": config.data.resolution,
                "measured by": "train_tokenizer.py after its last step (uint8 pixels, hard codes)",
                "weights": "the live ones (the export holds their EMA)" if train_config.ema_decay > 0 else "the exported ones"}
    name = dataset_name(config.data.dataset)
    return [CardMetric(key, evaluation[f"eval/{logged}"], config.data.test_split, name, protocol)
            for key, logged in (("psnr", "psnr"), ("codebook_usage", "usage"), ("codebook_perplexity", "perplexity"))]


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


def build_parser():
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--init_from", default=None,
                        help="start from the weights of this tokenizer folder (ours, or python -m tokenizer.convert's)")
    return parser


def main(argv=None) -> Path:
    config, args = parse_config(build_parser(), TrainTokenizerConfig, "tokenizer", argv)
    train_config, output_dir = config.tokenizer.train, Path(args.output_dir)
    datasets = load_data(config)  # data, checked before anything is written
    check_init_from(config.tokenizer.model, args.init_from)
    with training.start_run(config, train_config, output_dir, "tokenizer", args.resume) as run:
        parts = build_parts(config, datasets, run.accelerator, args.init_from)  # models and optimizers
        run.resume()
        logger.info("training on %s, %d process(es), %d torch thread(s) each, precision %s",
                    run.accelerator.device, run.accelerator.num_processes, run.threads, run.accelerator.mixed_precision)
        progress = {"h": "quantizer/hardness", "rec": "loss/reconstruction", "usage": "quantizer/usage"}
        evaluation = None
        for step in run.steps(parts, "tokenizer", items="images", postfix=progress):
            for batch, ctx in step.micro_batches():
                terms = train_step(parts, batch, ctx)
            step.log(terms)
            if step.due(train_config.eval_every):
                evaluation = evaluate(parts.model, parts.test_loader, run.accelerator, train_config.eval_batches)
                run.metrics_log.log(step.number, evaluation)
            if step.due(train_config.image_every):
                write_reconstructions(parts.model, parts.test_loader, run.accelerator,
                                      output_dir / "images" / f"recon_{step.number:08d}.png")
        parts.skips.report()
        metrics = card_metrics(evaluation, config) if evaluation else []  # None when resumed at the end
        return training.finish_run(run, parts, output_dir / "tokenizer", metrics, [dataset_name(config.data.dataset)])


def entry() -> None:
    """``provq-train-tokenizer`` and ``python train_tokenizer.py``."""
    run_command(command_name("train_tokenizer.py"), main, resume="resume with --resume latest")


if __name__ == "__main__":
    entry()

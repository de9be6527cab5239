"""Stage 2: train the class-conditional AR prior (LlamaGen-style) over cached tokenizer codes.

    accelerate launch train_prior.py --config configs/emoji32.yaml --codes runs/codes --output_dir runs/prior
    python train_prior.py --config configs/emoji32.yaml --codes runs/codes --output_dir runs/prior

The codebook size, code grid and classes come from the codes' manifest; the
run refuses codes of another tokenizer than the one its config names. It
ends by exporting ``<output_dir>/prior`` (config.json + model.safetensors).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator import (
    ARPrior,
    CodeDataset,
    PriorConfig,
    load_manifest,
)
from generator.errors import FingerprintMismatchError
from generator.sampling import sample
from provq import training
from provq.common.cards import CardMetric
from provq.common.cli import command_name, make_parser, parse_config, run_command
from provq.common.errors import FormatError, MissingFileError
from provq.common.folders import expect_kind, read_tokenizer_record
from provq.common.typed_config import check_ranges
from provq.data.pixels import save_image_grid

logger = logging.getLogger("train_prior")


@dataclass
class PriorTrainConfig(training.TrainConfig):
    val_batches: int = 0  # test-split batches for the validation loss; 0 = all
    grid_cfg_scale: float | None = None  # CFG of the sample grids written during training (None: the default)
    # Samples per class (a row each, the first ten classes) in those grids: on a CPU a 256-token prior
    # takes seconds per sample, so a smoke run can ask for fewer.
    grid_per_class: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, positive=("grid_per_class",), non_negative=("val_batches", "grid_cfg_scale"))


@dataclass
class PriorSection:
    """The preset's ``prior:`` section."""

    model: PriorConfig = field(default_factory=PriorConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


@dataclass
class TrainPriorConfig:
    """What train_prior.py reads: the ``prior:`` section."""

    prior: PriorSection = field(default_factory=PriorSection)


def bind_to_codes(model: PriorConfig, codes: Path) -> PriorConfig:
    """The prior's vocabulary, grid and class names are the codes'; a configured fingerprint must match
    theirs."""
    manifest = load_manifest(codes, "train")
    if model.tokenizer_fingerprint:
        manifest.check_tokenizer(model.tokenizer_fingerprint)
    return dataclasses.replace(
        model, codebook_size=manifest.codebook_size, code_height=manifest.code_shape[0],
        code_width=manifest.code_shape[1], num_classes=manifest.num_classes,
        tokenizer_fingerprint=manifest.tokenizer_fingerprint, label_names=list(manifest.label_names),
    )


def load_codes(codes: Path, fingerprint: str) -> tuple[CodeDataset, CodeDataset | None]:
    """The training codes and, when extracted, the test codes: read whole and checked before the run
    writes anything."""
    train_set = CodeDataset(codes, "train", expected_fingerprint=fingerprint)
    val_set = CodeDataset(codes, "test", expected_fingerprint=fingerprint) if (Path(codes) / "test").is_dir() else None
    return train_set, val_set


def build_dataloaders(datasets: tuple[CodeDataset, CodeDataset | None], train_config: PriorTrainConfig):
    train_set, val_set = datasets
    batch_size = train_config.batch_size  # the codes are in memory: no loader workers needed
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    val_loader = None if val_set is None else torch.utils.data.DataLoader(val_set, batch_size=batch_size,
                                                                          shuffle=False)
    return train_loader, val_loader


@torch.no_grad()
def validate(model, loader, accelerator, max_batches: int) -> dict:
    """Mean loss and token accuracy on the test split's codes (labels kept: no dropout)."""
    model.eval()
    sums = torch.zeros(3, device=accelerator.device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        out = accelerator.unwrap_model(model)(batch["codes"], batch["label"])
        n = batch["codes"].shape[0]
        sums += torch.stack([out.loss.float() * n, out.accuracy.float() * n, torch.tensor(float(n))])
    sums = accelerator.reduce(sums, "sum")
    model.train()
    return {"val/loss": (sums[0] / sums[2]).item(), "val/accuracy": (sums[1] / sums[2]).item(),
            "val/grids": int(sums[2].item())}


def card_metrics(validation: dict, codes: Path) -> list[CardMetric]:
    """The last validation as the exported prior's card metrics: NLL in bits per code, accuracy."""
    protocol = {"code grids": validation["val/grids"], "codes": str(codes),
                "measured by": "train_prior.py after its last step (labels kept, no dropout)"}
    return [CardMetric("bits_per_code", validation["val/loss"] / math.log(2), "test", "codes", protocol),
            CardMetric("token_accuracy", validation["val/accuracy"], "test", "codes", protocol)]


def load_grid_tokenizer(codes: Path, fingerprint: str, allow_mismatch: bool = False):
    """The tokenizer that made the codes (recorded by extract_codes.py), to draw sample grids, on the
    CPU. One whose weights changed since the codes were made is refused, as sampling refuses it,
    unless ``allow_mismatch``: then the prior trains without sample grids."""
    info = read_tokenizer_record(codes)
    if info is None:
        return None
    try:
        from tokenizer import ProVQTokenizer

        tok = ProVQTokenizer.from_pretrained(info["tokenizer"])
    except (MissingFileError, FormatError) as err:
        logger.warning("no sample grids: cannot load the tokenizer %s (%s)", info["tokenizer"], err)
        return None
    if tok.fingerprint() == fingerprint:
        return tok
    if allow_mismatch:
        logger.warning("no sample grids: %s has changed since the codes were extracted "
                       "(--allow_tokenizer_mismatch)", info["tokenizer"])
        return None
    raise FingerprintMismatchError(
        f"the tokenizer the codes in {codes} name ({info['tokenizer']}) has changed since they were extracted "
        f"(fingerprint {tok.fingerprint()}, the codes' {fingerprint}): re-extract the codes, or pass "
        "--allow_tokenizer_mismatch to train without sample grids (no tokenizer on disk then decodes the "
        "prior's samples)")


@torch.no_grad()
def write_samples(model, tok, accelerator, path: Path, cfg_scale: float | None, per_class: int) -> None:
    prior = accelerator.unwrap_model(model)
    if prior.config.num_classes:  # a row per class (the first ten)
        labels = torch.arange(min(prior.config.num_classes, 10)).repeat_interleave(per_class)
    else:  # unlabelled data: samples of the null class, unguided
        labels, cfg_scale = torch.full((2 * per_class,), -1), 1.0
    # Eager, as the sample command runs: decoder layers compiled for training (train.compile) would compile
    # the KV-cached decode shapes too, about 20 s on a CPU for a grid that takes 2 s (bench/results/prior_step.json)
    with torch.compiler.set_stance("force_eager"):
        codes = sample(prior, labels, cfg_scale=cfg_scale, seed=0)
    if accelerator.is_main_process:
        save_image_grid(tok.decode(codes), path, nrow=per_class)


@dataclass
class PriorParts(training.TrainParts):
    """The prepared prior and what validates and pictures it."""

    val_loader: torch.utils.data.DataLoader | None
    grid_tokenizer: object | None  # decodes the sample grids; None when the tokenizer is not there
    num_grids: int  # training code grids


def build_parts(model_config: PriorConfig, grid_tokenizer, datasets, train_config: PriorTrainConfig,
                accelerator) -> PriorParts:
    model = ARPrior(model_config)
    if train_config.compile:  # the decoder layers, in place: one compiled graph serves them all
        for layer in model.llama.model.layers:
            layer.compile()
    train_loader, val_loader = build_dataloaders(datasets, train_config)
    optimizer = training.make_optimizer(model, train_config, train_config.lr)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    ema = training.build_ema(model, train_config.ema_decay, accelerator)
    grid_tokenizer = None if grid_tokenizer is None else grid_tokenizer.to(accelerator.device)
    return PriorParts(model, optimizer, train_loader, ema, val_loader, grid_tokenizer, len(datasets[0]))


def train_step(parts: PriorParts, batch: dict, ctx: training.StepContext) -> training.StepTerms:
    # Label dropout draws from a generator that is a function of the micro-step: resume replays it.
    out = parts.model(batch["codes"], batch["label"], generator=ctx.generator())
    training.check_finite(ctx.step, cross_entropy=out.loss)
    training.optimizer_step(parts.optimizer, parts.model, out.loss, ctx, ctx.train.lr, "prior")
    return training.StepTerms(averaged={"loss/ce": out.loss.detach(), "train/accuracy": out.accuracy.detach()})


def build_parser():
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--codes", required=True, help="folder written by extract_codes.py")
    parser.add_argument("--allow_tokenizer_mismatch", action="store_true",
                        help="train although the tokenizer the codes name has changed since they were extracted: "
                             "no sample grids, and no tokenizer on disk decodes what the prior generates")
    return parser


def main(argv=None) -> Path:
    config, args = parse_config(build_parser(), TrainPriorConfig, "prior", argv)
    output_dir, codes, train_config = Path(args.output_dir), Path(args.codes), config.prior.train
    expect_kind(codes, "codes", "--codes")
    model_config = bind_to_codes(config.prior.model, codes)  # data: the codes decide vocabulary and grid
    config = dataclasses.replace(config, prior=dataclasses.replace(config.prior, model=model_config))
    datasets = load_codes(codes, model_config.tokenizer_fingerprint)
    grid_tokenizer = load_grid_tokenizer(codes, model_config.tokenizer_fingerprint, args.allow_tokenizer_mismatch)
    with training.start_run(config, train_config, output_dir, "prior", args.resume) as run:
        parts = build_parts(model_config, grid_tokenizer, datasets, train_config, run.accelerator)  # model and optimizer
        run.resume()
        logger.info("prior: %.2fM parameters, %d training code grids, %s on %s, %d process(es) x %d thread(s)",
                    run.accelerator.unwrap_model(parts.model).num_parameters() / 1e6, parts.num_grids,
                    run.accelerator.mixed_precision, run.accelerator.device, run.accelerator.num_processes, run.threads)
        validation = None
        for step in run.steps(parts, "prior", items="codes", postfix={"loss": "loss/ce", "acc": "train/accuracy"}):
            for batch, ctx in step.micro_batches():
                terms = train_step(parts, batch, ctx)
            step.log(terms)
            if parts.val_loader is not None and step.due(train_config.eval_every):
                validation = validate(parts.model, parts.val_loader, run.accelerator, train_config.val_batches)
                run.metrics_log.log(step.number, validation)
            if parts.grid_tokenizer is not None and step.due(train_config.image_every):
                write_samples(parts.model, parts.grid_tokenizer, run.accelerator,
                              output_dir / "images" / f"samples_{step.number:08d}.png", train_config.grid_cfg_scale,
                              train_config.grid_per_class)
        metrics = card_metrics(validation, codes) if validation else []
        return training.finish_run(run, parts, output_dir / "prior", metrics)


def entry() -> None:
    """``provq-train-prior`` and ``python train_prior.py``."""
    run_command(command_name("train_prior.py"), main, resume="resume with --resume latest")


if __name__ == "__main__":
    entry()

"""Stage 2: train the class-conditional AR prior (LlamaGen-style) over cached tokenizer codes.

    accelerate launch train_prior.py --config configs/emoji32.yaml --codes runs/codes --output_dir runs/prior
    python train_prior.py --config configs/emoji32.yaml --codes runs/codes --output_dir runs/prior

The codebook size, code grid and classes come from the codes' manifest; the
run refuses codes of another tokenizer than the one its config names. It
ends by exporting ``<output_dir>/prior`` (config.json + model.safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from generator import ARPrior, CodeDataset, PriorConfig, check_fingerprint, load_manifest
from generator.sampling import sample
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
    build_ema,
    clip_and_check,
    export_pretrained,
    global_terms,
    set_lr,
)

logger = logging.getLogger("train_prior")


@dataclass
class PriorTrainConfig(TrainConfig):
    val_batches: int = 0  # test-split batches for the validation loss; 0 = all
    grid_cfg_scale: float = 2.0  # CFG of the sample grids written during training


@dataclass
class PriorStage:
    model: PriorConfig = field(default_factory=PriorConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)


@dataclass
class PriorRun:
    prior: PriorStage = field(default_factory=PriorStage)


def bind_to_codes(model: PriorConfig, codes: Path) -> PriorConfig:
    """The prior's vocabulary and grid are the codes'; a configured fingerprint must match theirs."""
    manifest = load_manifest(codes, "train")
    if model.tokenizer_fingerprint:
        check_fingerprint(manifest, model.tokenizer_fingerprint)
    return dataclasses.replace(
        model, codebook_size=manifest.codebook_size, code_height=manifest.code_shape[0],
        code_width=manifest.code_shape[1], num_classes=manifest.num_classes,
        tokenizer_fingerprint=manifest.tokenizer_fingerprint,
    )


def build_dataloaders(codes: Path, train: PriorTrainConfig, fingerprint: str):
    train_set = CodeDataset(codes, "train", expected_fingerprint=fingerprint)
    common = dict(batch_size=train.batch_size, num_workers=train.num_workers)
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **common)
    val_loader = None
    if (Path(codes) / "test").is_dir():
        val_set = CodeDataset(codes, "test", expected_fingerprint=fingerprint)
        val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **common)
    return train_set, train_loader, val_loader


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
    return {"val/loss": (sums[0] / sums[2]).item(), "val/accuracy": (sums[1] / sums[2]).item()}


def load_grid_tokenizer(codes: Path, fingerprint: str, device):
    """The tokenizer that made the codes (recorded by extract_codes.py), to draw sample grids."""
    record = Path(codes) / "tokenizer.json"
    if not record.is_file():
        return None
    info = json.loads(record.read_text())
    try:
        from tokenizer import ProVQTokenizer

        tok = ProVQTokenizer.from_pretrained(info["tokenizer"], device=device)
    except (OSError, ValueError) as err:
        logger.warning("no sample grids: cannot load the tokenizer %s (%s)", info["tokenizer"], err)
        return None
    if tok.fingerprint() != fingerprint:
        logger.warning("no sample grids: %s has changed since the codes were extracted", info["tokenizer"])
        return None
    return tok


@torch.no_grad()
def write_samples(model, tok, accelerator, path: Path, cfg_scale: float, per_class: int = 4) -> None:
    prior = accelerator.unwrap_model(model)
    classes = max(1, min(prior.config.num_classes, 10))
    labels = torch.arange(classes).repeat_interleave(per_class)
    codes = sample(prior, labels, cfg_scale=cfg_scale, seed=0)
    if accelerator.is_main_process:
        save_image_grid(tok.decode(codes), path, nrow=per_class)


@dataclass
class Parts:
    """The prepared prior and what trains, validates and pictures it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    ema: object | None
    grid_tokenizer: object | None  # decodes the sample grids; None when the tokenizer is not there
    num_grids: int  # training code grids


def build_parts(model_config: PriorConfig, codes: Path, train: PriorTrainConfig, accelerator) -> Parts:
    model = ARPrior(model_config)
    fingerprint = model_config.tokenizer_fingerprint
    train_set, train_loader, val_loader = build_dataloaders(codes, train, fingerprint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    ema = build_ema(model, train.ema_decay, accelerator)
    grid_tokenizer = load_grid_tokenizer(codes, fingerprint, accelerator.device)
    return Parts(model, optimizer, train_loader, val_loader, ema, grid_tokenizer, len(train_set))


def train(config: PriorRun, codes: str | Path, output_dir: str | Path, resume: str | None = None) -> Path:
    output_dir, codes, train = Path(output_dir), Path(codes), config.prior.train
    model_config = bind_to_codes(config.prior.model, codes)
    config = dataclasses.replace(config, prior=dataclasses.replace(config.prior, model=model_config))
    run = start_run(config, train, output_dir, "prior", resume)
    accelerator = run.accelerator
    parts = build_parts(model_config, codes, train, accelerator)
    step = run.resume()
    logger.info("prior: %.2fM parameters, %d training code grids, %s on %s, %d process(es) x %d thread(s)",
                accelerator.unwrap_model(parts.model).num_parameters() / 1e6, parts.num_grids,
                train.mixed_precision, accelerator.device, accelerator.num_processes, run.threads)
    progress = tqdm(total=train.max_steps, initial=step, desc="prior", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    micro_batches = batches(parts.train_loader, accelerator, step, train.grad_accum_steps)
    micro_step = step * train.grad_accum_steps
    while step < train.max_steps:
        batch = next(micro_batches)
        seed_step(train.seed, micro_step, accelerator.process_index)
        with accelerator.accumulate(parts.model):
            terms = train_step(parts.model, parts.optimizer, batch, step, micro_step, train, accelerator)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if parts.ema is not None:
            parts.ema.step(accelerator.unwrap_model(parts.model).parameters())
        progress.update(1)
        after_step(run, parts, step, terms, train, output_dir, progress)
    progress.close()
    export = export_pretrained(parts.model, parts.ema, accelerator, output_dir / "prior")
    accelerator.end_training()
    return export


def after_step(run: Run, parts: Parts, step: int, terms: dict, train: PriorTrainConfig, output_dir: Path,
               progress) -> None:
    """The periodic work after an optimizer step: log, validate, sample grid, checkpoint (in that order)."""
    accelerator = run.accelerator
    if due(step, train.log_every, train.max_steps):
        logs = {**global_terms(terms, accelerator), "lr": parts.optimizer.param_groups[0]["lr"],
                "codes_per_s": run.items_per_s(step, train)}
        run.metrics_log.log(step, logs)
        progress.set_postfix(loss=f"{logs['loss/ce']:.3f}", acc=f"{logs['loss/accuracy']:.3f}")
    if parts.val_loader is not None and due(step, train.eval_every, train.max_steps):
        run.metrics_log.log(step, validate(parts.model, parts.val_loader, accelerator, train.val_batches))
    if parts.grid_tokenizer is not None and due(step, train.image_every, train.max_steps):
        write_samples(parts.model, parts.grid_tokenizer, accelerator,
                      output_dir / "images" / f"samples_{step:08d}.png", train.grid_cfg_scale)
    if due(step, train.save_every, train.max_steps):
        run.manager.save(accelerator, step)


def train_step(model, optimizer, batch, step: int, micro_step: int, train: PriorTrainConfig,
               accelerator) -> dict:
    # Label dropout draws from a generator that is a function of the micro-step: resume replays it.
    generator = step_generator(train.seed, micro_step, accelerator.process_index)
    out = model(batch["codes"], batch["label"], generator=generator)
    check_finite(step, cross_entropy=out.loss)
    set_lr(optimizer, train.lr, step, train)
    accelerator.backward(out.loss)
    clip_and_check(model, train, step, accelerator, "prior")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # "loss/" terms are averaged over processes when logged
    return {"loss/ce": out.loss.detach(), "loss/accuracy": out.accuracy.detach()}


def main(argv=None) -> Path:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--codes", required=True, help="folder written by extract_codes.py")
    config, args = parse_config(parser, PriorRun, "prior", argv)
    try:
        return train(config, args.codes, args.output_dir, resume=args.resume)
    except DivergenceError as error:
        raise SystemExit(f"train_prior.py: {error}") from error


if __name__ == "__main__":
    main()

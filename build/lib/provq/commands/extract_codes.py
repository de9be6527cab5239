"""Encode dataset splits once with a trained tokenizer into code shards bound to its fingerprint.

    python extract_codes.py --tokenizer runs/tok/tokenizer --config configs/emoji32.yaml --output_dir runs/codes
    accelerate launch extract_codes.py ...     (each process encodes its own shards)

Finished shards are kept: rerunning resumes at shard level (also after Ctrl-C or
SIGTERM, which stop after the shard being written). The manifest of each split
records the tokenizer fingerprint, code grid and codebook size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from generator import CodeShardWriter, CodesManifest
from provq.common.cli import command_name, count, make_parser, parse_config, run_command
from provq.common.errors import ConfigError, UserError
from provq.common.folders import expect_kind, expect_output, write_tokenizer_record
from provq.common.locks import output_lock
from provq.common.signals import SafePoints, interrupted
from provq.data import DataConfig, collate, load_split
from provq.training import configure_threads, process_state
from tokenizer import ProVQTokenizer

logger = logging.getLogger("extract_codes")


@dataclass
class ExtractCodesConfig:
    """What extract_codes.py reads: the ``data:`` section."""

    data: DataConfig = field(default_factory=DataConfig)


@torch.no_grad()
def encode_items(tok, loader, flip_copies: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n, copies, h, w) and labels (n,) of a loader's items, in order."""
    codes, labels = [], []
    for batch in loader:
        if batch["skipped"]:
            raise UserError(
                f"unreadable images {batch['skipped'][:5]}: code shards need every image of the split; "
                "repair or remove them, then delete the codes folder and extract again")
        images = batch["image"].to(device)
        copies = [tok.encode(images)]
        if flip_copies:
            copies.append(tok.encode(images.flip(-1)))
        codes.append(torch.stack(copies, dim=1).cpu())
        labels.append(batch["label"])
    return torch.cat(codes), torch.cat(labels)


def shard_loader(dataset, items: range, batch_size: int, num_workers: int):
    """The items of one shard, in order, decoded by ``num_workers`` processes (data.num_workers)."""
    subset = torch.utils.data.Subset(dataset, items)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate)


def extract_split(tok, config: ExtractCodesConfig, split: str, args, state) -> CodesManifest:
    dataset = load_split(config.data, split, train=False)
    manifest = CodesManifest(
        tokenizer_fingerprint=tok.fingerprint(), code_shape=tuple(tok.code_shape),
        codebook_size=tok.config.quantizer.codebook_size, num_classes=dataset.num_classes,
        split=split, num_items=len(dataset), flip_copies=args.flip_copies,
        label_names=list(dataset.label_names), shard_size=args.shard_size,
    )
    writer = CodeShardWriter(args.output_dir, manifest)
    pending = writer.pending_shards(state.process_index, state.num_processes)
    done = manifest.num_shards - len(writer.pending_shards(0, 1))
    if done:
        logger.info("%s: %d of %d shards already written, resuming", split, done, manifest.num_shards)
    safe = SafePoints(state.num_processes, state.device)  # a signal stops the processes after a shard
    for index in tqdm(safe.over(pending), total=len(pending), desc=f"codes {split}",
                      disable=not state.is_main_process):
        loader = shard_loader(dataset, manifest.shard_items(index), args.batch_size, config.data.num_workers)
        codes, labels = encode_items(tok, loader, args.flip_copies, state.device)
        writer.write_shard(index, codes, labels)
    if safe.signum:
        written = manifest.num_shards - len(writer.pending_shards(0, 1))
        raise interrupted(safe.signum, f"in the {split} split",
                          f"{written} of {manifest.num_shards} shards written to {writer.folder}")
    state.wait_for_everyone()
    return writer.finalize() if state.is_main_process else writer.manifest


def main(argv=None) -> None:
    parser = make_parser(__doc__.splitlines()[0], training_run=False)
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (or hub id)")
    parser.add_argument("--splits", default="train,test", help="comma-separated: train, test or split names")
    parser.add_argument("--flip_copies", action="store_true", help="also store codes of flipped images")
    parser.add_argument("--batch_size", type=count, default=128)
    parser.add_argument("--shard_size", type=count, default=10_000, help="images per shard file")
    config, args = parse_config(parser, ExtractCodesConfig, None, argv)
    expect_kind(args.tokenizer, "tokenizer", "--tokenizer", hub=True)
    expect_output(args.output_dir, "codes")
    logging.basicConfig(level=logging.INFO)
    configure_threads()
    state = process_state()
    tok = ProVQTokenizer.from_pretrained(args.tokenizer, device=state.device)
    if config.data.resolution != tok.config.resolution:
        raise ConfigError(f"data.resolution is {config.data.resolution} but the tokenizer was trained at "
                         f"{tok.config.resolution}: pass --data.resolution {tok.config.resolution}")
    with output_lock(args.output_dir, state):
        for split in args.splits.split(","):
            manifest = extract_split(tok, config, split, args, state)
            logger.info("%s: %d images -> %s codes", split, manifest.num_items, manifest.code_shape)
        if state.is_main_process:
            write_tokenizer_record(args.output_dir, args.tokenizer, tok.fingerprint())


def entry() -> None:
    """``provq-extract-codes`` and ``python extract_codes.py``."""
    run_command(command_name("extract_codes.py"), main, resume="rerun the same command: finished shards are kept")


if __name__ == "__main__":
    entry()

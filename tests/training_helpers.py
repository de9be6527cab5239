"""Helpers for the tests that run the training scripts: a tiny image folder, tiny configs, runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, classes: int = 4, per_class: int = 24, size: int = 16) -> Path:
    """Small PNGs in one sub-folder per class (the folder source splits them 90/10 by hash)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 64 + c * 48).astype(np.uint8)
            pixels[:, : 4 + i % 8] = 255 - 40 * c  # a bar: something to reconstruct
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def save_tiny_models(root: Path) -> dict[str, Path]:
    """An untrained ~3k-parameter tokenizer at 16 px (16 codes, 8x8 grid) and a prior bound to it,
    saved as root/tok and root/prior."""
    from generator import ARPrior, PriorConfig
    from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

    torch.manual_seed(0)
    tok = ProVQTokenizer(TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2],
                                         latent_channels=8, norm_num_groups=4,
                                         quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4)))
    prior = ARPrior(PriorConfig(codebook_size=16, code_height=8, code_width=8, num_classes=4, hidden_size=32,
                                num_layers=1, num_heads=2, intermediate_size=64, tokenizer_fingerprint=tok.fingerprint()))
    return {"tok": tok.save_pretrained(root / "tok"), "prior": prior.save_pretrained(root / "prior")}


def tiny_tokenizer_argv(dataset: Path, output_dir: Path, max_steps: int, **fields) -> list[str]:
    """train_tokenizer.py arguments for a ~3k-parameter tokenizer at 16 px (8x8 codes), fp32.

    `fields` override dotted fields: `train__save_every=5` -> `--tokenizer.train.save_every 5`
    (`data__...`, `model__...`, `loss__...`, `discriminator__...`, `quantizer__...`).
    """
    values = {
        "data.dataset": str(dataset), "data.resolution": 16,
        "model.resolution": 16, "model.base_channels": 8, "model.channel_multipliers": "[1,2]",
        "model.latent_channels": 8, "model.norm_num_groups": 4,
        "quantizer.codebook_size": 32, "quantizer.kmeans_buffer": 512,
        "train.batch_size": 8, "train.mixed_precision": "no", "train.log_every": 1,
        "train.save_every": 5, "train.image_every": 100, "train.eval_every": 0,
        "train.eval_batches": 1, "train.warmup_steps": 3, "train.compile": "false",
    }
    values.update({key.replace("__", "."): value for key, value in fields.items()})
    argv = ["--config", str(REPO / "configs" / "emoji32.yaml"), "--output_dir", str(output_dir),
            "--max_steps", str(max_steps)]
    for key, value in values.items():
        section = key.split(".")[0]
        prefix = {"data": "", "quantizer": "tokenizer.model."}.get(section, "tokenizer.")
        argv += [f"--{prefix}{key}", str(value)]
    return argv


def tiny_prior_argv(codes: Path, output_dir: Path, max_steps: int, **fields) -> list[str]:
    """train_prior.py arguments for a ~20k-parameter Llama prior; `fields` as in tiny_tokenizer_argv."""
    values = {
        "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
        "model.intermediate_size": 64, "train.batch_size": 8, "train.mixed_precision": "no",
        "train.log_every": 1, "train.save_every": 5, "train.image_every": 100, "train.eval_every": 0,
        "train.compile": "false",
    }
    values.update({key.replace("__", "."): value for key, value in fields.items()})
    argv = ["--config", str(REPO / "configs" / "emoji32.yaml"), "--codes", str(codes),
            "--output_dir", str(output_dir), "--max_steps", str(max_steps)]
    for key, value in values.items():
        argv += [f"--prior.{key}", str(value)]
    return argv


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; in-process runs start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(main, argv: list[str]):
    """Run a script's main in this process with one torch thread, like the subprocess runs:
    bit-identical comparisons need the same thread count (float sums depend on it)."""
    reset_accelerate()
    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return main(argv)
    finally:
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env
        torch.set_num_threads(saved_threads)
        reset_accelerate()


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths).rstrip(os.pathsep)
    return env


def logged_steps(metrics: Path) -> list[dict]:
    """Complete lines of a metrics.jsonl (the last one may be cut short by a kill)."""
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def wait_until(ready, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until `ready()` is true; an AssertionError (with the log's end) if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before it was ready:\n"
                                 + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def signal_when(command: list[str], ready, log: Path, signals: tuple[int, ...], timeout: float = 180) -> int:
    """Start `command`, send it `signals` (0.1 s apart) once `ready()` is true; its exit status."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=out)
        try:
            wait_until(ready, proc, log, timeout)
            for i, signum in enumerate(signals):
                time.sleep(0.1 if i else 0.0)
                proc.send_signal(signum)
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode


def pacing(driver_folder: Path, step: int):
    """A `ready` for signal_when: the DRIVER's "pace" mode is waiting before a micro-batch of `step`
    (or a later one), so a signal sent now lands in that wait."""
    def ready() -> bool:
        mark = driver_folder / "pacing"
        text = mark.read_text() if mark.exists() else ""
        return text.endswith("\n") and int(text) >= step
    return ready


def step_logged(metrics: Path, step: int):
    """A `ready` for signal_when: `metrics` shows `step` done."""
    return lambda: (rows := logged_steps(metrics)) and rows[-1]["step"] >= step


def kill_after_step(command: list[str], metrics: Path, step: int, log: Path, timeout: float = 180) -> int:
    """Start `command`, SIGKILL it once `metrics` shows `step` done; the last step it logged."""
    returncode = signal_when(command, step_logged(metrics, step), log, (signal.SIGKILL,), timeout)
    assert returncode == -signal.SIGKILL, f"rc {returncode}:\n{log.read_text()[-3000:]}"
    return max(row["step"] for row in logged_steps(metrics))


def run_script(command: list[str], log: Path, timeout: float = 300,
               returncode: int = 0) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=out,
                              timeout=timeout)
    assert done.returncode == returncode, f"rc {done.returncode}:\n{log.read_text()[-4000:]}"
    return done


def load_state_file(path: Path):
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".json":
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "time"}
    if path.suffix == ".md":  # an export's model card: its metrics are the run's, so equal runs, equal cards
        return path.read_text()
    return torch.load(path, map_location="cpu", weights_only=False)  # our own test files


def max_abs_difference(a, b, where: str = "") -> float:
    """Largest |a - b| over every float tensor of two nested states; anything else must be equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            return (a - b).abs().max().item() if a.numel() else 0.0
        assert torch.equal(a, b), where
        return 0.0
    if isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
        return 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {set(a) ^ set(b)}"
        return max([max_abs_difference(a[k], b[k], f"{where}.{k}") for k in a], default=0.0)
    if isinstance(a, list | tuple):
        assert len(a) == len(b), where
        return max([max_abs_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))],
                   default=0.0)
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0.0


def compare_folders(first: Path, second: Path, skip: tuple[str, ...] = ()) -> float:
    """Max |difference| over every state file of two checkpoint (or export) folders."""
    names = sorted(p.name for p in first.iterdir() if p.is_file())
    assert names == sorted(p.name for p in second.iterdir() if p.is_file())
    names = [n for n in names if not n.startswith(skip)] if skip else names
    return max(max_abs_difference(load_state_file(first / n), load_state_file(second / n), n)
               for n in names)


def metric_rows(metrics: Path, ignore=("images_per_s", "codes_per_s")) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ignore} for row in logged_steps(metrics)]


# Runs a script under test with a patch: `driver.py SCRIPT MODE AT ARGS...`. SCRIPT `train_tokenizer`
# calls provq.commands.train_tokenizer.main(ARGS); `train_tokenizer.py` runs it as the command line does (run_command: signals
# handled, errors as one line).
DRIVER = """
import importlib, os, pathlib, runpy, signal, sys, time
import generator.sampling as sampling, provq.training.checkpoint as checkpoint, provq.training.loop as loop
script, mode = sys.argv[1], sys.argv[2]
at, _, seconds = sys.argv[3].partition(":")
at, seconds = int(at), float(seconds or 1.0)
if mode == "pace":  # from step `at` on, 1 s (AT:SECONDS: SECONDS) per micro-batch: the test's signal lands mid-run
    batches, mark = loop.batches, pathlib.Path(__file__).with_name("pacing")
    def paced(dataloader, accelerator, start_step, grad_accum_steps=1):
        for i, batch in enumerate(batches(dataloader, accelerator, start_step, grad_accum_steps)):
            if start_step * grad_accum_steps + i >= at * grad_accum_steps:
                mark.write_text(f"{start_step + i // grad_accum_steps + 1}\\n")  # the step now waiting
                time.sleep(seconds)
            yield batch
    loop.batches = paced
elif mode == "pace_sampling":  # from batch `at` on, 1 s per sampled batch
    draw, calls = sampling.sample, []
    def paced_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) > at:
            time.sleep(1.0)
        return draw(*args, **kwargs)
    sampling.sample = paced_sample
elif mode == "kill_in_save":  # SIGKILL itself after save_state wrote step `at`, before its marker
    write = checkpoint.write_marker
    def killing(path, payload):
        if payload.get("step") == at:
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, payload)
    checkpoint.write_marker = killing
if script.endswith(".py"):
    sys.argv = [script, *sys.argv[4:]]
    runpy.run_path(script, run_name="__main__")
else:
    importlib.import_module("provq.commands." + script).main(sys.argv[4:])
"""


def assert_same_run(reference: Path, resumed: Path, export: str = "tokenizer", skip=()) -> float:
    """Bit-identical export, last checkpoint (weights, optimizers, EMA, buffers, RNGs) and log."""
    worst = compare_folders(reference / export, resumed / export)
    ref_ckpts = sorted((reference / "checkpoints").iterdir())
    assert [p.name for p in ref_ckpts] == [p.name for p in sorted((resumed / "checkpoints").iterdir())]
    worst = max(worst, compare_folders(ref_ckpts[-1], resumed / "checkpoints" / ref_ckpts[-1].name, skip))
    assert metric_rows(resumed / "metrics.jsonl") == metric_rows(reference / "metrics.jsonl")
    return worst


def run_driver(code: str, folder: Path) -> Path:
    """A Python file that patches the script under test (pacing, a kill) before its main()."""
    path = folder / "driver.py"
    path.write_text(code)
    return path


def probe_run(out_dir: str | Path, argv: list[str]) -> dict:
    """Run train_tokenizer.main recording, per micro-batch, the batch's dataset indices and the
    quantizer statistics, plus the codebook right after the k-means init and the final weights;
    saved to ``out_dir/probe_rank<RANK>.pt`` (one file per process under torchrun)."""
    import provq.training.loop as loop
    from provq.commands import train_tokenizer

    record = {"indices": [], "stats": [], "codebook_at_init": None}
    batches, train_step = loop.batches, train_tokenizer.train_step

    def recording_batches(*args, **kwargs):
        for batch in batches(*args, **kwargs):
            record["indices"].append(batch["index"].clone())
            yield batch

    def recording_step(parts, batch, ctx):
        tok = getattr(parts.model, "module", parts.model)
        initialized_before = bool(tok.quantizer.initialized)
        terms = train_step(parts, batch, ctx)
        record["stats"].append({k: v.item() for k, v in terms.shared.items() if k.startswith("quantizer/")})
        if bool(tok.quantizer.initialized) and not initialized_before:
            record["codebook_at_init"] = tok.quantizer.codebook.weight.detach().clone()
        record["model"] = tok
        return terms

    loop.batches, train_tokenizer.train_step = recording_batches, recording_step
    try:
        run_in_process(train_tokenizer.main, argv)
    finally:
        loop.batches, train_tokenizer.train_step = batches, train_step
    record["final"] = {k: v.clone() for k, v in record.pop("model").state_dict().items()}
    torch.save(record, Path(out_dir) / f"probe_rank{os.environ.get('RANK', '0')}.pt")
    return record

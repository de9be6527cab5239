"""What clusters and people do to a run (issue 34): signals, full disks, two writers.

SIGINT and SIGTERM stop a command at its next safe point with one line and exit status 130 / 143,
and the resumed run ends bit-identical to an uninterrupted one; a full disk or an unwritable folder
is one line naming the path and what was written, the previous checkpoint still the latest; a
second command on a run folder is refused naming the first. The signal tests start the real
command lines through training_helpers.DRIVER, which only slows them down so the signal lands
mid-run; references and resumed runs are in-process (bitwise the same as a subprocess).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from training_helpers import (
    DRIVER,
    REPO,
    assert_same_run,
    logged_steps,
    pacing,
    run_driver,
    run_in_process,
    save_tiny_models,
    signal_when,
    step_logged,
    subprocess_env,
    tiny_prior_argv,
    tiny_tokenizer_argv,
    wait_until,
)

from provq.commands import extract_codes, sample, train_prior, train_tokenizer
from provq.common import cli, signals
from provq.common.cli import run_command
from provq.common.locks import LOCK_NAME, output_lock
from provq.training import CheckpointManager

EMOJI32 = str(REPO / "configs" / "emoji32.yaml")
STEPS = 16  # h = 0 until step 6, hard from step 11; checkpoints every 5 steps, the last 2 kept
RUN = dict(quantizer__schedule__warmup=6, quantizer__schedule__transition=5, train__ema_decay=0.9,
           train__keep_checkpoints=2)
RESUME = {"train_tokenizer.py": "resume with --resume latest", "train_prior.py": "resume with --resume latest",
          "sample.py": "rerun the same command with --resume: finished batches are kept",
          "extract_codes.py": "rerun the same command: finished shards are kept"}


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, out, STEPS, **RUN))
    return out


def last_line(text: str) -> str:
    """The last line a command printed, after checking it printed no traceback."""
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.strip()][-1]


def command_here(command: str, main, argv: list[str], capsys) -> tuple[int, str]:
    """run_command in this process (signals handled, errors as one line): (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_in_process(lambda args: run_command(command, main, args, resume=RESUME[command]), argv)
    return stopped.value.code, capsys.readouterr().err


def stop_training(script: str, argv: list[str], out: Path, tmp_path: Path, signals: tuple[int, ...],
                  pace: str = "6") -> tuple[int, str]:
    """The real command, paced from step 6 and sent ``signals`` once step 8 waits for its batch (so
    step 7 is done, logged and past its checkpoint check)."""
    command = [sys.executable, str(run_driver(DRIVER, tmp_path)), script, "pace", pace, *argv]
    log = tmp_path / "stopped.log"
    code = signal_when(command, pacing(tmp_path, 8), log, signals)
    return code, log.read_text()


# ---- 1. signals ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_after_a_step_with_a_checkpoint(name, reference, image_folder, tmp_path):
    signum, out = signal.Signals[name], tmp_path / "run"
    argv = tiny_tokenizer_argv(image_folder, out, STEPS, **RUN)
    code, printed = stop_training("train_tokenizer.py", argv, out, tmp_path, (signum,))
    step = logged_steps(out / "metrics.jsonl")[-1]["step"]
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert code == 128 + signum and 7 <= step < 15
    assert last_line(printed) == (f"train_tokenizer.py: interrupted at step {step} by {signum.name}; "
                                  f"checkpoint {checkpoint}; resume with --resume latest")
    assert printed.count("interrupted") == 1
    assert CheckpointManager(out).resolve("latest") == checkpoint
    assert not (out / "tokenizer").exists() and not (out / LOCK_NAME).exists()
    run_in_process(train_tokenizer.main, argv + ["--resume", "latest"])
    assert assert_same_run(reference, out) == 0.0


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(reference, image_folder, tmp_path):
    out = tmp_path / "run"
    argv = tiny_tokenizer_argv(image_folder, out, STEPS, **RUN)
    # Both signals land while step 8 waits 5 s for its batch (0.1 s apart, however loaded the machine).
    code, printed = stop_training("train_tokenizer.py", argv, out, tmp_path, (signal.SIGINT, signal.SIGINT),
                                  pace="6:5")
    assert code == 130
    assert last_line(printed) == ("train_tokenizer.py: stopped at once by a second signal (SIGINT); "
                                  "resume with --resume latest")
    assert logged_steps(out / "metrics.jsonl")[-1]["step"] == 7  # at once: step 8 was not finished
    assert CheckpointManager(out).resolve("latest").name == "step_00000005"
    run_in_process(train_tokenizer.main, argv + ["--resume", "latest"])
    assert assert_same_run(reference, out) == 0.0


def test_a_second_signal_while_the_stop_is_reported_keeps_the_first_line(monkeypatch, capsys):
    """CI caught it: a second Ctrl-C that came after the first stop had reached its last line (while
    ``say`` collected garbage) raised in the except block, so the command died with a traceback and
    exit status 1 instead of 130."""
    collect = cli.gc.collect

    def signalled_collect():  # the second Ctrl-C arrives while the stop's line is being printed
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not signals.forced() and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes: it has run once this loop ends
        return collect()

    def stopped(argv):
        os.kill(os.getpid(), signal.SIGINT)  # the first one: recorded, the command stops at its safe point
        signals.pause(5, "at step 3")

    monkeypatch.setattr(cli.gc, "collect", signalled_collect)
    before = signal.getsignal(signal.SIGINT)  # pytest's, or an xdist worker's
    with pytest.raises(SystemExit) as exited:
        run_command("train_tokenizer.py", stopped, [], resume="resume with --resume latest")
    assert exited.value.code == 130
    assert last_line(capsys.readouterr().err) == ("train_tokenizer.py: interrupted at step 3 by SIGINT; "
                                                  "resume with --resume latest")
    assert signal.getsignal(signal.SIGINT) == before  # the handler is given back


def rank_1(launcher: subprocess.Popen) -> int:
    """The worker with RANK=1 among a torchrun launcher's children."""
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    return next(int(pid) for pid in children if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes())


@pytest.mark.slow
def test_under_torchrun_one_process_signalled_stops_all_at_the_same_step(image_folder, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log"
    argv = tiny_tokenizer_argv(image_folder, out, STEPS, **dict(RUN, train__batch_size=4))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with log.open("w") as printed:
        launcher = subprocess.Popen([*torchrun, str(run_driver(DRIVER, tmp_path)), "train_tokenizer.py", "pace", "3",
                                     *argv], cwd=REPO, env=subprocess_env(), stdout=printed, stderr=printed)
        try:
            wait_until(step_logged(out / "metrics.jsonl", 4), launcher, log)
            os.kill(rank_1(launcher), signal.SIGTERM)  # rank 0 hears of it only through the agreed flag
            launcher.wait(300)
        finally:
            launcher.kill()
            launcher.wait()
    step = logged_steps(out / "metrics.jsonl")[-1]["step"]
    lines = [line for line in log.read_text().splitlines() if "interrupted" in line]
    assert lines == [f"train_tokenizer.py: interrupted at step {step} by SIGTERM; checkpoint "
                     f"{out / 'checkpoints' / f'step_{step:08d}'}; resume with --resume latest"]
    # Rank 1 exits 143 once the checkpoint both wrote is complete; the launcher then SIGTERMs rank 0, which
    # has printed its line by then (it may be on its way out, with the default handler back: -15).
    assert "exitcode  : 143 (pid: " in log.read_text()
    assert CheckpointManager(out).resolve("latest").name == f"step_{step:08d}" and not (out / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def codes(reference, image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codes")
    run_in_process(extract_codes.main, ["--config", EMOJI32, "--output_dir", str(out),
                                        "--tokenizer", str(reference / "tokenizer"),
                                        "--data.dataset", str(image_folder), "--data.resolution", "16"])
    return out


@pytest.mark.slow
def test_sigterm_stops_the_prior_after_a_step_and_it_resumes_exactly(codes, tmp_path):
    def argv(out):
        return tiny_prior_argv(codes, out, STEPS, train__ema_decay=0.9, model__token_dropout=0.1)

    run_in_process(train_prior.main, argv(tmp_path / "reference"))
    out = tmp_path / "run"
    code, printed = stop_training("train_prior.py", argv(out), out, tmp_path, (signal.SIGTERM,))
    step = logged_steps(out / "metrics.jsonl")[-1]["step"]
    assert code == 143 and 7 <= step < 15
    assert re.fullmatch(rf"train_prior.py: interrupted at step {step} by SIGTERM; checkpoint \S+step_{step:08d}; "
                        "resume with --resume latest", last_line(printed))
    run_in_process(train_prior.main, argv(out) + ["--resume", "latest"])
    assert assert_same_run(tmp_path / "reference", out, export="prior") == 0.0


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def sample_argv(models, out: Path, *extra: str) -> list[str]:
    return ["--tokenizer", str(models["tok"]), "--prior", str(models["prior"]), "--output_dir", str(out),
            "--num_images", "6", "--batch_size", "1", *extra]


@pytest.mark.slow
def test_sigint_stops_sampling_after_a_batch_and_resume_keeps_it(models, tmp_path):
    out = tmp_path / "samples"
    command = [sys.executable, str(run_driver(DRIVER, tmp_path)), "sample.py", "pace_sampling", "1",
               *sample_argv(models, out)]
    code = signal_when(command, (out / "images" / "codes_000001.npy").is_file, tmp_path / "log", (signal.SIGINT,))
    kept = len(list((out / "images").glob("codes_*.npy")))
    assert code == 130 and 2 <= kept < 6 and not (out / "samples.npz").exists()
    assert last_line((tmp_path / "log").read_text()) == (
        f"sample.py: interrupted after {kept} of 6 batches by SIGINT; they are kept in {out / 'images'}; "
        "rerun the same command with --resume: finished batches are kept")
    run_in_process(sample.main, sample_argv(models, out, "--resume"))
    run_in_process(sample.main, sample_argv(models, tmp_path / "reference"))
    with np.load(out / "samples.npz") as resumed, np.load(tmp_path / "reference" / "samples.npz") as whole:
        assert all(np.array_equal(resumed[k], whole[k]) for k in ("arr_0", "labels", "codes"))


def extract_argv(tokenizer: Path, images: Path, out: Path) -> list[str]:
    return ["--config", EMOJI32, "--tokenizer", str(tokenizer), "--output_dir", str(out), "--shard_size", "16",
            "--data.dataset", str(images), "--data.resolution", "16"]


def test_sigterm_stops_code_extraction_after_a_shard(models, image_folder, tmp_path, monkeypatch, capsys):
    encode, calls = extract_codes.encode_items, []

    def signalled(*args):  # the scheduler's SIGTERM arrives while the first shard is encoded
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return encode(*args)

    out = tmp_path / "codes"
    monkeypatch.setattr(extract_codes, "encode_items", signalled)
    code, stderr = command_here("extract_codes.py", extract_codes.main, extract_argv(models["tok"], image_folder, out),
                                capsys)
    assert code == 143
    assert last_line(stderr) == (f"extract_codes.py: interrupted in the train split by SIGTERM; 1 of 6 shards written "
                                 f"to {out / 'train'}; rerun the same command: finished shards are kept")
    monkeypatch.undo()
    first = (out / "train" / "shard-00000.safetensors").stat().st_mtime_ns
    run_in_process(extract_codes.main, extract_argv(models["tok"], image_folder, out))
    run_in_process(extract_codes.main, extract_argv(models["tok"], image_folder, tmp_path / "whole"))
    assert (out / "train" / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not rewritten
    shards = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("shard-*"))
    assert len(shards) == 7 and shards == sorted(p.relative_to(out) for p in out.rglob("shard-*"))
    for shard in shards:
        resumed, whole = load_file(str(out / shard)), load_file(str(tmp_path / "whole" / shard))
        assert all(np.array_equal(resumed[k], whole[k]) for k in ("codes", "labels"))


# ---- 2. a full disk or an unwritable folder ---------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 8 MiB tmpfs mounted for the test (root and a mount command needed: skipped otherwise)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); the injected-error tests cover the rest")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the device is full."""
    filler = folder / "filler"
    with filler.open("wb") as f, pytest.raises(OSError) as full:
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
    assert full.value.errno == errno.ENOSPC
    return filler


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(reference, image_folder, tiny_disk,
                                                                       monkeypatch, capsys):
    out = tiny_disk / "run"
    argv = tiny_tokenizer_argv(image_folder, out, STEPS, **RUN)
    save, filled = CheckpointManager.save, []

    def filling(self, accelerator, step):
        if step == 10:
            filled.append(fill(tiny_disk))
        return save(self, accelerator, step)

    monkeypatch.setattr(CheckpointManager, "save", filling)
    code, stderr = command_here("train_tokenizer.py", train_tokenizer.main, argv, capsys)
    checkpoints = out / "checkpoints"
    assert code == 2
    assert re.fullmatch(rf"train_tokenizer.py: error: could not write the checkpoint of step 10 \({checkpoints}/"
                        rf"\.tmp_step_00000010\): no space left on the device.*; it was removed, and the latest "
                        rf"checkpoint is {checkpoints}/step_00000005: free space, then resume with --resume latest",
                        last_line(stderr))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000005"]
    monkeypatch.undo()
    filled[0].unlink()
    run_in_process(train_tokenizer.main, argv + ["--resume", "latest"])
    assert assert_same_run(reference, out) == 0.0


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# The metrics line fails as it is written: the module's own json, not everyone's.
JSON_WITHOUT_SPACE = SimpleNamespace(dumps=no_space, loads=json.loads)


# what is written -> (the command, where the error is injected, the one line's pattern)
WRITES = {
    "checkpoint": ("train_tokenizer.py", "accelerate.Accelerator.save_state",
                   r"could not write the checkpoint of step 2 \(\S+\.tmp_step_00000002\): {cause}; it was removed, "
                   r"and no checkpoint was written yet"),
    "export": ("train_tokenizer.py", "provq.common.pretrained.save_weights",
               r"could not write the tokenizer export \(\S+/run/tokenizer\): {cause}; the checkpoints are untouched: "
               r"the latest checkpoint is \S+step_00000002: free space, then resume with --resume latest"),
    "metrics": ("train_tokenizer.py", "provq.training.metrics_log.json",
                r"could not write the metrics log \(\S+/run/metrics.jsonl\): {cause}"),
    "samples": ("sample.py", "PIL.Image.Image.save", r"could not write the samples \(\S+/run/images\): {cause}"),
    "code shard": ("extract_codes.py", "generator.code_shards.save_file",
                   r"could not write a code shard \(\S+/run/train/shard-00000.safetensors\): {cause}"),
}
CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
          errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}


@pytest.mark.parametrize("what", sorted(WRITES))
def test_a_full_disk_while_writing_is_one_line_naming_the_path(what, models, image_folder, tmp_path, monkeypatch,
                                                               capsys):
    command, target, pattern = WRITES[what]
    out = tmp_path / "run"
    argv = {"train_tokenizer.py": lambda: tiny_tokenizer_argv(image_folder, out, 2, train__save_every=2),
            "sample.py": lambda: sample_argv(models, out),
            "extract_codes.py": lambda: extract_argv(models["tok"], image_folder, out)}[command]()
    monkeypatch.setattr(target, JSON_WITHOUT_SPACE if what == "metrics" else no_space)
    main = {"train_tokenizer.py": train_tokenizer.main, "sample.py": sample.main,
            "extract_codes.py": extract_codes.main}[command]
    code, stderr = command_here(command, main, argv, capsys)
    assert code == 2
    assert re.fullmatch(f"{command}: error: " + pattern.format(cause=CAUSES[errno.ENOSPC]), last_line(stderr))
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("code", sorted(CAUSES))
def test_each_storage_cause_is_named(code, image_folder, tmp_path, monkeypatch, capsys):
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("accelerate.Accelerator.save_state", refused)
    status, stderr = command_here("train_tokenizer.py", train_tokenizer.main,
                                  tiny_tokenizer_argv(image_folder, tmp_path / "run", 1), capsys)
    assert status == 2 and f"of step 1 ({tmp_path / 'run'}/checkpoints/.tmp_step_00000001): {CAUSES[code]};" in stderr


def test_a_library_error_without_an_errno_is_read_from_the_disk(tiny_disk):
    """torch.save on a full disk says only "unexpected pos": the folder's free space names the cause."""
    from provq.common.errors import StorageError
    from provq.common.files import writing

    filler = fill(tiny_disk)
    with pytest.raises(StorageError, match=r"could not write the state \(\S+/state.pt\): no space left on the device "
                                           r"\(RuntimeError: .*\)"):
        with writing(tiny_disk / "state.pt", "the state"):
            torch.save({"w": torch.zeros(10_000)}, tiny_disk / "state.pt")
    filler.unlink()
    with pytest.raises(RuntimeError, match="a bug"), writing(tiny_disk / "state.pt", "the state"):
        raise RuntimeError("a bug")  # with space left, an error without an errno stays what it is


# ---- 3. one writer per output folder ----------------------------------------------------------
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(
        image_folder, tmp_path, capsys, caplog):
    out, log = tmp_path / "run", tmp_path / "first.log"
    argv = tiny_tokenizer_argv(image_folder, out, 1000)
    with log.open("w") as printed:  # the first writer: a training paced to 1 s a step, until killed
        first = subprocess.Popen([sys.executable, str(run_driver(DRIVER, tmp_path)), "train_tokenizer.py", "pace",
                                  "1", *argv], cwd=REPO, env=subprocess_env(), stdout=printed, stderr=printed)
        try:
            wait_until(step_logged(out / "metrics.jsonl", 1), first, log)
            code, stderr = command_here("train_tokenizer.py", train_tokenizer.main,  # this process: the second
                                        tiny_tokenizer_argv(image_folder, out, 2), capsys)
            assert first.poll() is None
        finally:
            first.kill()  # SIGKILL: the lock file stays behind, naming a process that no longer exists
            first.wait()
    assert code == 2
    assert re.fullmatch(rf"train_tokenizer.py: error: --output_dir {out} is being written by another command "
                        rf"\(process {first.pid} on .*\); wait for it to end or choose another folder .*",
                        last_line(stderr))
    assert (out / LOCK_NAME).is_file()
    run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, out, 2))
    assert f"taking over {out / LOCK_NAME}: its holder (process {first.pid} on" in caplog.text
    assert (out / "tokenizer").is_dir() and not (out / LOCK_NAME).exists()


def test_only_the_main_process_takes_the_lock(tmp_path):
    class Rank1:
        is_main_process, num_processes, device = False, 1, "cpu"

    with output_lock(tmp_path):
        with output_lock(tmp_path, Rank1()):  # another process of the same launch: no refusal
            pass
        assert (tmp_path / LOCK_NAME).is_file()
    assert not (tmp_path / LOCK_NAME).exists()

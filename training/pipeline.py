"""The user-facing commands of both stages, built and run by the demo and the ablation.

Each stage runs as its own process, exactly the command a user would type, so
every stage can be rerun, resumed or checked by hand; a stage whose output
file exists is not run again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def train_tokenizer(config: str, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train_tokenizer.py", "--config", config, "--output_dir", str(output_dir),
            "--resume", "latest", *overrides]


def extract_codes(tokenizer: Path, config: str, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "extract_codes.py", "--tokenizer", str(tokenizer), "--config", config,
            "--output_dir", str(output_dir), *overrides]


def train_prior(config: str, codes: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train_prior.py", "--config", config, "--codes", str(codes),
            "--output_dir", str(output_dir), "--resume", "latest", *overrides]


def sample(tokenizer: Path, prior: Path, config: str, output_dir: Path, num_images: int,
           cfg_scale: float, *extra: str) -> list[str]:
    return [sys.executable, "sample.py", "--tokenizer", str(tokenizer), "--prior", str(prior),
            "--config", config, "--num_images", str(num_images), "--cfg_scale", str(cfg_scale),
            "--output_dir", str(output_dir), *extra]


def evaluate(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "eval", command, *args]


def data_describe(*args: str) -> list[str]:
    return [sys.executable, "-m", "data", "describe", *args]


def run_once(name: str, command: list[str], done: Path, timings: dict | None = None,
             capture_to: Path | None = None) -> bool:
    """Run ``command`` unless ``done`` exists; returns whether it ran. Output streams through."""
    if done.exists():
        print(f"[{name}] already done ({done}), skipping", flush=True)
        return False
    print(f"\n[{name}] {' '.join(command)}", flush=True)
    start = time.time()
    if capture_to is not None:  # commands that print their result as JSON on stdout
        result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        capture_to.parent.mkdir(parents=True, exist_ok=True)
        capture_to.write_text(result.stdout)
        print(result.stdout, flush=True)
    else:
        subprocess.run(command, check=True)
    if timings is not None:
        timings[name] = round(time.time() - start, 1)
    return True


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

"""The front door: a wheel, installed (not editable) into a fresh virtual environment, works from a
directory outside the clone: the library API samples and evaluates, every console command answers
--help, and the install holds only tokenizer, generator, eval and provq (issue 32)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib
from training_helpers import REPO, save_tiny_models

pytestmark = pytest.mark.slow

API_EXAMPLE = """
import sys, provq, torch
tok = provq.load_tokenizer(sys.argv[1])
prior = provq.load_prior(sys.argv[2], tokenizer=tok)
images = provq.generate(tok, prior, labels=[0, 1, 2], seed=0)
assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1, images.shape
again = provq.generate(tok, prior, labels=[0, 1, 2], seed=0, sampling=provq.SamplingConfig())
assert torch.equal(images, again)
codes = tok.encode(images)
assert codes.shape == (3, 8, 8) and int(codes.max()) < 16
print("api ok", provq.__file__, provq.DEFAULT_CFG_SCALE)
"""


def tracked_copy(dest: Path) -> Path:
    """The clone's tracked files as the working tree has them, copied to ``dest``: the wheel is built
    from what a clone holds, and setuptools' in-tree build/ folder (stale files of an earlier build would
    go into the wheel) is made in the copy, not in the clone."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel (no dependencies: those come from this environment's site-packages,
    added as a plain path so this environment's editable install of provq stays out)."""
    root = tmp_path_factory.mktemp("install")
    # setuptools at hand: no isolated build environment to download (pip makes one otherwise)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tracked_copy(root / "src")), "--no-deps", *isolation,
                    "-w", str(root / "dist"), "-q"], check=True, cwd=root)
    wheel = next((root / "dist").glob("provq-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, cwd=root)
    return env_dir


def run_outside(env_dir: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", PATH=f"{env_dir / 'bin'}:{env.get('PATH', '')}")
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_only_the_four_packages(installed):
    python = installed / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    packages = {p.name for p in site.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == {"provq", "tokenizer", "generator", "eval"}
    assert (site / "provq" / "configs" / "emoji32.yaml").is_file()  # the presets travel with the package


def test_the_api_example_runs_outside_the_clone(installed, tmp_path):
    models = save_tiny_models(tmp_path / "models")
    script = tmp_path / "example.py"
    script.write_text(API_EXAMPLE)
    done = run_outside(installed, str(installed / "bin" / "python"), str(script), str(models["tok"]),
                       str(models["prior"]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "api ok" in done.stdout and str(installed) in done.stdout and str(REPO) not in done.stdout


def test_the_readmes_python_example_runs_outside_the_clone(installed, image_folder, tmp_path):
    """The README's own lines, with the demo's folders replaced by tiny models and its dataset by a folder."""
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Use it from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    models = save_tiny_models(tmp_path / "models")
    example = (example.replace("runs/demo/tok/tokenizer", str(models["tok"]))
               .replace("runs/demo/prior/prior", str(models["prior"])).replace('"emoji"', repr(str(image_folder))))
    script = tmp_path / "readme_example.py"
    script.write_text(example)
    done = run_outside(installed, str(installed / "bin" / "python"), str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rfid, psnr = (float(x) for x in done.stdout.split()[-2:])
    assert rfid > 0 and 0 < psnr < 100


def test_every_console_command_answers_help_outside_the_clone(installed, tmp_path):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 8
    for name in scripts:
        done = run_outside(installed, str(installed / "bin" / name), "--help", cwd=tmp_path)
        assert done.returncode == 0 and "usage:" in done.stdout, f"{name}: {done.stderr[-2000:]}"

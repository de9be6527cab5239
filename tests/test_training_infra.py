"""Config builder, LR schedule, divergence checks and atomic checkpoints."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from training_helpers import REPO, reset_accelerate

import provq.training.accelerator as accelerator_module
from generator import ARPrior
from provq.commands import train_prior, train_tokenizer
from provq.common import machine
from provq.common.cli import make_parser, parse_config
from provq.common.errors import ConfigError, UserError
from provq.common.presets import load_preset
from provq.common.typed_config import build_config
from provq.training import (
    CheckpointManager,
    DivergenceError,
    TrainConfig,
    check_finite,
    make_accelerator,
    process_state,
)
from provq.training.optimization import warmup_cosine
from tokenizer import ProVQTokenizer


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5
    name: str | None = None
    mults: tuple[int, ...] = (1, 2)


@dataclass
class Stage:
    model: Inner = field(default_factory=Inner)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Run:
    stage: Stage = field(default_factory=Stage)


def test_build_config_types_and_defaults():
    cfg = build_config(Run, {"stage": {"model": {"size": 8, "rate": "1e-4", "mults": [1, 1, 2]}}})
    assert cfg.stage.model.size == 8
    assert cfg.stage.model.rate == pytest.approx(1e-4)
    assert cfg.stage.model.mults == (1, 1, 2)
    assert cfg.stage.train.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    "mapping, field_name",
    [
        ({"stage": {"model": {"sise": 8}}}, "stage.model.sise"),
        ({"stage": {"model": {"size": "big"}}}, "stage.model.size"),
        ({"stage": {"model": {"size": True}}}, "stage.model.size"),
        ({"stage": {"model": {"mults": [1, "x"]}}}, "stage.model.mults[1]"),
        ({"stage": {"train": {"mixed_precision": "fp8"}}}, "stage.train"),
    ],
)
def test_build_config_errors_name_the_field(mapping, field_name):
    with pytest.raises(ConfigError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        build_config(Run, mapping)


def test_parse_config_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("stage:\n  model:\n    size: 2\nprior:\n  x: 1\n")  # another stage's: not read
    argv = ["--config", str(preset), "--output_dir", "o", "--max_steps", "7", "--seed", "3",
            "--stage.model.size", "5", "--stage.model.name=abc"]
    cfg, args = parse_config(make_parser("t"), Run, "stage", argv)
    assert (cfg.stage.model.size, cfg.stage.model.name) == (5, "abc")
    assert (cfg.stage.train.max_steps, cfg.stage.train.seed) == (7, 3)
    assert args.output_dir == "o"
    with pytest.raises(ConfigError, match="stage.model.nope"):
        parse_config(make_parser("t"), Run, "stage", ["--config", str(preset), "--output_dir", "o",
                                                       "--stage.model.nope", "1"])
    # a section this command does not read, or a typo in a section name, is named, not ignored
    for typo in ("--prior.x", "--stgae.model.size"):
        with pytest.raises(ConfigError, match=f"reads no section '{typo[2:].split('.')[0]}'"):
            parse_config(make_parser("t"), Run, "stage", ["--config", str(preset), "--output_dir", "o",
                                                           typo, "1"])
    preset.write_text("stage:\n  model:\n    size: 2\nstgae:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'stgae'"):
        parse_config(make_parser("t"), Run, "stage", ["--config", str(preset), "--output_dir", "o"])


def test_warmup_cosine_endpoints():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_check_finite_names_step_and_term():
    check_finite(3, loss=torch.tensor(1.0))
    with pytest.raises(DivergenceError, match=r"step 5: 'perceptual'"):
        check_finite(5, loss=torch.tensor(1.0), perceptual=torch.tensor(float("nan")))


def test_checkpoints_are_atomic_pruned_and_resolved(tmp_path):
    accelerator = make_accelerator(TrainConfig(), tmp_path)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(accelerator, step)
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000003"]
    # a save killed half-way: a folder without the marker is skipped, never loaded
    (manager.root / "step_00000009").mkdir()
    assert manager.resolve("latest").name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.resolve(str(manager.root / "step_00000009"))
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert manager.load(accelerator, manager.resolve("latest")) == 3
    assert torch.equal(model.weight, before)
    assert CheckpointManager(tmp_path / "empty").resolve("latest") is None


def test_preset_base_is_deep_merged(tmp_path):
    (tmp_path / "a.yaml").write_text("stage:\n  model:\n    size: 2\n    rate: 0.25\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstage:\n  model:\n    size: 9\n")
    cfg, _ = parse_config(make_parser("t"), Run, "stage", ["--config", str(tmp_path / "b.yaml"),
                                                            "--output_dir", "o"])
    assert (cfg.stage.model.size, cfg.stage.model.rate) == (9, 0.25)


PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
CODE_GRID = {"emoji32": 8, "emoji32_fp32": 8, "emoji32_fsq": 8, "emoji32_lfq": 8, "imagenet256": 16, "imagenet100_256": 16,
             "imagenet256_fsq": 16, "imagenet256_lfq": 16}
CODES = {"emoji32": 1024, "emoji32_fp32": 1024, "emoji32_fsq": 1000, "emoji32_lfq": 1024, "imagenet256": 16384,
         "imagenet100_256": 16384, "imagenet256_fsq": 15360, "imagenet256_lfq": 16384}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_models_whose_stages_fit(name):
    """Each preset builds the scripts' typed configs and its models; the prior fits the codes."""
    mapping = load_preset(name)
    tokenizer_run = build_config(train_tokenizer.TrainTokenizerConfig, {k: mapping[k] for k in ("data", "tokenizer")})
    prior_run = build_config(train_prior.TrainPriorConfig, {"prior": mapping["prior"]})
    tok_config = tokenizer_run.tokenizer.model
    assert tok_config.resolution == tokenizer_run.data.resolution
    tok = ProVQTokenizer(tok_config)
    side = CODE_GRID[name]  # what each preset promises (README): 32 px -> 8x8 codes, 256 px -> 16x16
    assert tok.code_shape == (side, side) and tok.config.quantizer.codebook_size == CODES[name]
    with torch.no_grad():
        latents = tok.encoder(torch.zeros(1, 3, 64, 64))  # 64 px: cheap, and any size works
    assert latents.shape[-1] == 64 // tok.downsample_factor
    # What train_prior.py does with the codes' manifest: vocabulary and grid from the tokenizer.
    prior = ARPrior(dataclasses.replace(prior_run.prior.model, codebook_size=tok_config.quantizer.codebook_size,
                                        code_height=side, code_width=side))
    codes = torch.randint(tok_config.quantizer.codebook_size, (1, side, side))
    assert prior.flatten_codes(codes).shape == (1, side * side)
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        load_preset("nope")


def test_make_accelerator_refuses_lone_processes_of_a_multi_process_launch(tmp_path, monkeypatch):
    """A launch of 2 processes that Accelerate would run as 2 separate one-process runs is refused
    (each would write every file of the run folder)."""
    reset_accelerate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerator_module, "needs_cpu_group", lambda device=None: False)  # as if ignored
    with pytest.raises(UserError, match="launched as 2 processes.*torchrun --nproc_per_node"):
        make_accelerator(TrainConfig(), tmp_path)
    with pytest.raises(UserError, match="launched as 2 processes"):
        process_state()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert make_accelerator(TrainConfig(), tmp_path).num_processes == 1
    reset_accelerate()


def test_mixed_precision_auto_picks_by_a_probe_and_says_why(monkeypatch, caplog, tmp_path):
    from provq.training import accelerator as accel

    choice, why = accel.probe_precision(seconds=0.1, size=64)
    assert choice in ("bf16", "no") and "the fp32 rate on this CPU" in why
    monkeypatch.setattr(accel, "probe_precision", lambda seconds=0.5: ("no", "bf16 at 0.30x the fp32 rate"))
    assert accel.resolve_precision("auto") == ("no", "bf16 at 0.30x the fp32 rate")
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "X", "bf16_units": True})
    assert accel.resolve_precision("bf16") == ("bf16", None)  # an explicit choice is never probed
    caplog.set_level("WARNING")
    accelerator = make_accelerator(TrainConfig(mixed_precision="auto"), tmp_path)
    assert accelerator.mixed_precision == "no" and "mixed_precision auto: no (bf16 at 0.30x" in caplog.text


CPUINFO = "processor\t: {n}\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"


@pytest.mark.parametrize("flags, units, widest", [
    ("fpu sse2 avx avx2 fma", False, "AVX2"),  # an AVX2-only AMD EPYC: bf16 emulated
    ("fpu sse2 avx2 avx512f avx512bw", False, "AVX-512"),  # AVX-512 without its BF16 extension
    ("fpu sse2 avx2 avx512f avx512_bf16", True, "AVX-512 BF16"),
    ("fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile", True, "AMX"),
    ("fpu sse2 avx", False, "no AVX2"),
])
def test_cpu_description_reads_the_bf16_units_from_the_flags(tmp_path, flags, units, widest):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(CPUINFO.format(n=n, model="Some CPU", flags=flags) for n in range(2)))
    described = machine.cpu_description(cpuinfo)
    assert described["model"] == "Some CPU" and described["bf16_units"] is units and described["units"] == widest
    assert described["avx512_bf16"] is ("avx512_bf16" in flags) and described["amx_bf16"] is ("amx_bf16" in flags)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert machine.cpu_description(arm)["bf16_units"] is True and machine.cpu_description(arm)["units"] == "BF16"
    absent = machine.cpu_description(tmp_path / "absent")
    assert absent["bf16_units"] is None and absent["units"] is None  # no /proc: cannot tell


def test_explicit_bf16_on_a_cpu_without_bf16_units_is_refused_with_the_measured_rate(monkeypatch, tmp_path):
    from provq.training import accelerator as accel

    monkeypatch.setattr(accel.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "AVX2 CPU", "bf16_units": False})
    with pytest.raises(UserError, match=r"bf16 on a CPU without bf16 units \(AVX2 CPU.*matmul ran at .*x the fp32 "
                                        r"rate.*--tokenizer.train.mixed_precision auto"):
        make_accelerator(TrainConfig(mixed_precision="bf16"), tmp_path)
    assert accel.resolve_precision("no") == ("no", None)  # fp32 and auto are never refused
    assert accel.resolve_precision("auto")[0] in ("no", "bf16")
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "unknown", "bf16_units": None})
    assert accel.resolve_precision("bf16") == ("bf16", None)  # flags unread (no /proc): the user's choice

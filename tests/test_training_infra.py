"""Config builder, LR schedule, divergence checks and atomic checkpoints."""

from dataclasses import dataclass, field

import pytest
import torch

from training.checkpoint import CheckpointManager
from training.config import ConfigError, build_config, make_parser, parse_config
from training.runtime import (
    DivergenceError,
    TrainConfig,
    check_finite,
    make_accelerator,
    warmup_cosine,
)


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
    preset.write_text("stage:\n  model:\n    size: 2\nother_section:\n  x: 1\n")
    argv = ["--config", str(preset), "--output_dir", "o", "--max_steps", "7", "--seed", "3",
            "--stage.model.size", "5", "--stage.model.name=abc"]
    cfg, args = parse_config(make_parser("t"), Run, "stage", argv)
    assert (cfg.stage.model.size, cfg.stage.model.name) == (5, "abc")
    assert (cfg.stage.train.max_steps, cfg.stage.train.seed) == (7, 3)
    assert args.output_dir == "o"
    with pytest.raises(ConfigError, match="stage.model.nope"):
        parse_config(make_parser("t"), Run, "stage", ["--config", str(preset), "--output_dir", "o",
                                                       "--stage.model.nope", "1"])


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


def test_repository_presets_build():
    """Every preset in configs/ builds into the scripts' typed configs."""
    from pathlib import Path

    import train_prior
    import train_tokenizer
    from training.config import load_yaml

    for preset in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        mapping = load_yaml(preset)
        build_config(train_tokenizer.TokenizerRun, {k: mapping[k] for k in ("data", "tokenizer")})
        build_config(train_prior.PriorRun, {"prior": mapping["prior"]})

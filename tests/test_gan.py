"""The adversarial terms of train_tokenizer.py: the discriminator learns from its own loss only."""

from __future__ import annotations

import copy

import pytest
import torch
from training_helpers import run_in_process, tiny_tokenizer_argv

from provq import training
from provq.commands import train_tokenizer
from tokenizer import losses
from tokenizer.discriminator import DiscriminatorConfig, PatchDiscriminator

GAN_FROM_STEP_0 = dict(loss__gan_weight=0.1, loss__disc_start=0, loss__disc_loss_weight=0.5,
                       discriminator__base_channels=8, discriminator__num_layers=2,
                       train__disc_lr=1e-3, train__warmup_steps=0)


def test_the_generator_loss_leaves_no_gradient_in_the_discriminator():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2))
    fake = torch.randn(2, 3, 16, 16, requires_grad=True)
    gan = train_tokenizer.GAN(disc, torch.optim.Adam(disc.parameters()))
    accelerator = type("Unwrapping", (), {"unwrap_model": staticmethod(lambda m: m)})()
    train_tokenizer.generator_adversarial_loss(gan, fake, accelerator).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # the tokenizer side learns
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # ready for its own update


class DiscriminatorProbe:
    """Wraps discriminator_step: checks what the discriminator holds when its step begins, and
    recomputes its update from hinge_d_loss alone on a copy taken before the step."""

    def __init__(self, original):
        self.original, self.pairs, self.before, self.checked = original, [], None, 0

    def __call__(self, gan, real, fake, ctx, weight):
        disc = ctx.accelerator.unwrap_model(gan.disc)
        if not self.pairs:  # the step's first micro-batch: nothing may have reached the discriminator
            assert all(p.grad is None for p in disc.parameters()), "the generator's loss reached D"
            self.before = copy.deepcopy(disc)
            self.optimizer_state = copy.deepcopy(gan.optimizer.state_dict())  # Adam's moments so far
        self.pairs.append((real.clone(), fake.clone()))
        result = self.original(gan, real, fake, ctx, weight)
        if ctx.accelerator.sync_gradients:
            self.compare(disc, gan.optimizer.param_groups[0]["lr"], ctx, weight)
            self.pairs, self.checked = [], self.checked + 1
        return result

    def compare(self, disc, lr, ctx, weight):
        reference = self.before
        optimizer = training.make_optimizer(reference, ctx.train, lr)
        optimizer.load_state_dict(self.optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for real, fake in self.pairs:
            loss = weight * losses.hinge_d_loss(reference(real), reference(fake))
            (loss / len(self.pairs)).backward()  # as Accelerate scales an accumulated loss
        torch.nn.utils.clip_grad_norm_(reference.parameters(), ctx.train.grad_clip)
        optimizer.step()
        worst = max((a - b).abs().max().item() for a, b in zip(disc.parameters(), reference.parameters(), strict=True))
        assert worst == 0.0, f"the discriminator's update differs from its own loss's by {worst}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_discriminator_step_equals_the_update_of_its_own_loss(image_folder, tmp_path, monkeypatch,
                                                                accumulation):
    probe = DiscriminatorProbe(train_tokenizer.discriminator_step)
    monkeypatch.setattr(train_tokenizer, "discriminator_step", probe)
    argv = tiny_tokenizer_argv(image_folder, tmp_path / "run", 3, train__grad_accum_steps=accumulation,
                               train__batch_size=8 // accumulation, **GAN_FROM_STEP_0)
    run_in_process(train_tokenizer.main, argv)
    assert probe.checked == 3  # every step of the run, each with `accumulation` micro-batches


def test_the_gan_starts_at_llamagens_step():
    from tokenizer.losses import gan_active

    # LlamaGen: adopt_weight(..., global_step=train_steps + 1, threshold=disc_start) with train_steps
    # counting the steps already taken: with disc_start 20,000 the 20,000th step (index 19,999) is the first
    assert not gan_active(19_998, 20_000) and gan_active(19_999, 20_000)
    assert gan_active(0, 0) and gan_active(0, 1) and not gan_active(0, 2)

"""Draw docs/method.png, README's picture of the method, from the project's own schedule and quantizer.

    python docs/make_method_figure.py

Left: the hardness h over a run for hard codes, the three switches and ProVQ's cosine ramp (the
study's variants). Right: what the decoder gets, (1 - h) z_e + h z_q, for 2-D latents and an
8-code codebook fitted by k-means, at h = 0, 0.5 and 1.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from provq.ablation.variants import STUDY, VARIANTS, preset_ramp
from tokenizer.codebook_init import kmeans
from tokenizer.quantizer import ProgressiveQuantizer, QuantizerConfig
from tokenizer.schedule import ScheduleConfig, hardness

STEPS = 1000


def schedule_panel(ax) -> None:
    styles = {"vq+kmeans+l2": ":", "step+kmeans+l2": "--", "step@mid+kmeans+l2": "-.",
              "step@end+kmeans+l2": "--", "cosine+kmeans+l2": "-"}
    for name in STUDY["vq"]:
        v = VARIANTS[name]
        argv = v.overrides(1024, preset_ramp("emoji32"))  # the switch points placed on emoji32's ramp
        fields = dict(zip(argv[::2], argv[1::2], strict=True))
        ramp = dict(zip(("warmup", "transition"), preset_ramp("emoji32"), strict=True))
        config = ScheduleConfig(kind=v.schedule, **{k: float(fields.get(f"--tokenizer.model.quantizer.schedule.{k}", d))
                                                    for k, d in ramp.items()})
        curve = [hardness(s, config, STEPS) for s in range(STEPS)]
        label = name.split("+")[0].replace("vq", "hard codes")
        ax.plot([s / STEPS for s in range(STEPS)], curve, styles[name], label=label, linewidth=1.6)
    ax.set_xlabel("fraction of the run")
    ax.set_ylabel("hardness h")
    ax.set_title("the curriculum", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def latent_panels(axes) -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(400, 2, generator=generator) @ torch.tensor([[1.0, 0.3], [0.0, 0.6]])
    quantizer = ProgressiveQuantizer(2, QuantizerConfig(codebook_size=8, codebook_dim=None, l2_normalize=False,
                                                        kmeans_init=False))
    with torch.no_grad():
        quantizer.codebook.weight.copy_(kmeans(z, 8, iters=20, seed=0))
        for ax, h in zip(axes, (0.0, 0.5, 1.0), strict=True):
            out = quantizer(z[None], hardness=h).z_out[0]
            codes = quantizer.codebook.weight
            ax.scatter(codes[:, 0], codes[:, 1], marker="o", facecolors="none", edgecolors="black", s=90,
                       label="codes")
            ax.scatter(out[:, 0], out[:, 1], s=5, alpha=0.5, label="decoder input")
            ax.set_title(f"h = {h:g}: " + {0.0: "continuous", 0.5: "halfway", 1.0: "hard VQ"}[h], fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="lower right")


def main() -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
    schedule_panel(axes[0])
    latent_panels(axes[1:])
    fig.tight_layout()
    path = Path(__file__).resolve().parent / "method.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


if __name__ == "__main__":
    print(main())

"""Where a code sits: LlamaGen's 2D rotary embedding over the code grid, and its output dropouts,
fitted into transformers' Llama (Sun et al. 2024, autoregressive/models/gpt.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POSITION_EMBEDDINGS = ("rope_1d", "rope_2d")


def grid_angles(height: int, width: int, head_dim: int, base: float) -> torch.Tensor:
    """(height * width, head_dim // 2) rotation angles: half the frequencies turn with the row, half
    with the column, as LlamaGen's precompute_freqs_cis_2d (raster order)."""
    if head_dim % 4:
        raise ValueError(f"2D rotary positions need a head size divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float64) / half))
    rows = torch.arange(height, dtype=torch.float64)[:, None, None] * freqs
    cols = torch.arange(width, dtype=torch.float64)[None, :, None] * freqs
    grid = torch.cat([rows.expand(height, width, -1), cols.expand(height, width, -1)], dim=-1)
    return grid.reshape(height * width, half)


class GridRotaryEmbedding(nn.Module):
    """Replaces ``LlamaModel.rotary_emb``: position p of the sequence [class, code_0, ..., code_{N-2}]
    gets the 2D rotation of code p - 1's (row, column). The class token gets cos = sin = 0, as in
    LlamaGen (its query and key vanish; its value still reaches every code). A table lookup by
    position id, so KV-cached decoding sees exactly the positions a full pass does."""

    def __init__(self, llama_config, height: int, width: int):
        super().__init__()
        head_dim = llama_config.hidden_size // llama_config.num_attention_heads
        base = float((llama_config.rope_parameters or {}).get("rope_theta", 10000.0))
        angles = grid_angles(height, width, head_dim, base)
        emb = torch.cat([angles, angles], dim=-1)  # transformers' rotate_half layout
        zero = torch.zeros(1, head_dim, dtype=emb.dtype)
        # Non-persistent: a function of the config, so the weights file is the same as with 1D RoPE.
        self.register_buffer("cos_table", torch.cat([zero, emb.cos()]).float(), persistent=False)
        self.register_buffer("sin_table", torch.cat([zero, emb.sin()]).float(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids].to(x.dtype), self.sin_table[position_ids].to(x.dtype)


class OutputDropout:
    """A forward hook: dropout on a module's output while training (no new weights, same state dict)."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, self.rate, module.training)


def add_output_dropout(llama, residual: float, ffn: float) -> None:
    """LlamaGen's resid_dropout (after each attention output projection) and ffn_dropout (after each
    feed-forward output), which transformers' Llama does not have."""
    for layer in llama.model.layers:
        if residual > 0:
            layer.self_attn.o_proj.register_forward_hook(OutputDropout(residual))
        if ffn > 0:
            layer.mlp.down_proj.register_forward_hook(OutputDropout(ffn))

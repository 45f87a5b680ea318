"""Windowed Q-Former projector: encoder taps -> audio embeddings in the LLM's space (spec §3.1).

Every 15 encoder frames (0.3 s) become 3 query vectors by cross-attention to that window only,
so the output rate is 10 Hz. No self-attention between queries and no mask: the zero rows that
pad the last window are attended, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = (
            split(self.q_proj(queries)),
            split(self.k_proj(memory)),
            split(self.v_proj(memory)),
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(queries.shape))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * ratio, bias=bias)
        self.fc2 = nn.Linear(dim * ratio, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.cross_attention = CrossAttention(cfg.hidden_size, cfg.num_heads, cfg.attn_bias)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_ratio, cfg.mlp_bias)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        queries = queries + self.cross_attention(self.attn_norm(queries), memory)
        return queries + self.mlp(self.mlp_norm(queries))


class QFormer(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(QFormerLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            queries = layer(queries, memory)
        return queries


class WindowedQFormerProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p = cfg.hidden_size
        self.layer_norms = nn.ModuleList(
            nn.LayerNorm(cfg.encoder_dim, eps=cfg.layernorm_eps)
            for _ in range(cfg.num_encoder_layers)
        )
        self.layer_projector = nn.Linear(cfg.encoder_dim * cfg.num_encoder_layers, p)
        self.query = nn.Parameter(torch.zeros(1, cfg.queries_per_block, p))
        self.window_positions = nn.Parameter(torch.zeros(1, cfg.block_size, p))
        self.qformer = QFormer(cfg)
        self.out_norm = nn.LayerNorm(p, eps=cfg.layernorm_eps)
        self.out_linear = nn.Linear(p, cfg.llm_dim)

    def forward(
        self, taps: list[torch.Tensor], frame_ok: torch.Tensor | None = None
    ) -> torch.Tensor:
        """taps: encoder hidden states [B, T, H] -> [B, ceil(T/15)*3, llm_dim]. Frames where
        `frame_ok` is False (bucket padding) become the zero rows an unbucketed batch has."""
        x = torch.cat([norm(h) for norm, h in zip(self.layer_norms, taps, strict=True)], dim=-1)
        x = F.gelu(self.layer_projector(x))
        if frame_ok is not None:
            x = x * frame_ok[:, None].to(x.dtype)
        batch, frames, dim = x.shape
        size, rate = self.cfg.block_size, self.cfg.downsample_rate
        blocks = -(-frames // size)
        windows = F.pad(x, (0, 0, 0, blocks * size - frames)).view(batch * blocks, size, dim)
        group_means = windows.view(batch * blocks, size // rate, rate, dim).mean(dim=2)
        queries = self.query + group_means
        out = self.qformer(queries, windows + self.window_positions)
        out = self.out_linear(self.out_norm(out))
        return out.view(batch, blocks * self.cfg.queries_per_block, -1)

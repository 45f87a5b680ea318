"""The Granite LLM body used bidirectionally as the transcript editor (spec §4).

A batch arrives packed as one sequence of rows (no padding in the linear layers); RoPE positions
restart at 0 for each sample, and attention is block-diagonal: each sample attends only to
itself. Attention runs on a per-sample padded view with a key-padding mask, so its cost grows with
the sum of squared sample lengths, never with the square of the packed length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


@dataclass(frozen=True)
class PackedBatch:
    """Where each sample's rows sit in the packed sequence, and their padded view."""

    lengths: tuple[int, ...]
    sample_index: torch.Tensor  # [N] sample of each packed row
    position: torch.Tensor  # [N] position of each row inside its sample
    key_mask: torch.Tensor  # [B, 1, 1, Lmax] True where a key exists

    @classmethod
    def build(cls, lengths: list[int], device: torch.device) -> PackedBatch:
        lens = torch.tensor(lengths, device=device)
        sample_index = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        starts = torch.cumsum(lens, 0) - lens
        position = torch.arange(int(lens.sum()), device=device) - starts[sample_index]
        key_mask = torch.arange(max(lengths), device=device)[None, :] < lens[:, None]
        return cls(tuple(lengths), sample_index, position, key_mask[:, None, None, :])

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, Lmax, ...]"""
        out = rows.new_zeros(len(self.lengths), max(self.lengths), *rows.shape[1:])
        out[self.sample_index, self.position] = rows
        return out

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded[self.sample_index, self.position]


@lru_cache(maxsize=4)
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )


def rotary_tables(
    position: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] for the default (NeoX, rotate-half) RoPE, computed in fp32."""
    freqs = position.float()[:, None] * _inverse_frequencies(head_dim, theta, position.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d] rotated by per-row angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        d = cfg.attention_head_dim
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            d,
        )
        self.scale = cfg.attention_multiplier
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope) -> torch.Tensor:
        n = x.shape[0]
        q = rotate(self.q_proj(x).view(n, self.heads, self.head_dim), *rope)
        k = rotate(self.k_proj(x).view(n, self.kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        q, k, v = (batch.pad(t).transpose(1, 2) for t in (q, k, v))  # [B, heads, Lmax, d]
        mask = None if len(set(batch.lengths)) == 1 else batch.key_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(batch.unpad(out.transpose(1, 2)).reshape(n, -1))


class GatedMlp(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.residual_multiplier = cfg.residual_multiplier
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMlp(cfg)

    def forward(self, x: torch.Tensor, batch: PackedBatch, rope) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rope) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteBody(nn.Module):
    """`language_model.model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GraniteEditor(nn.Module):
    """`language_model.*`; the head is the (tied) embedding unless the config unties it."""

    def __init__(self, cfg: TextConfig, scale_logits: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale_logits = scale_logits
        self.model = GraniteBody(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Packed input embeddings [N, D] (before the x embedding_multiplier) -> final hidden."""
        batch = PackedBatch.build(lengths, embeds.device)
        x = embeds * self.cfg.embedding_multiplier
        rope = rotary_tables(
            batch.position, self.cfg.attention_head_dim, self.cfg.rope_theta, x.dtype
        )
        for layer in self.model.layers:
            x = layer(x, batch, rope)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = (
            self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        )
        logits = hidden @ head.T
        return logits / self.cfg.logits_scaling if self.scale_logits else logits

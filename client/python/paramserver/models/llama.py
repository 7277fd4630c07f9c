"""A LLaMA-style decoder-only language model in PyTorch: token embedding, blocks
of RMSNorm -> causal self-attention with rotary positions -> residual, RMSNorm ->
SwiGLU MLP -> residual, a final RMSNorm and an untied LM head. Tensor names
follow LLaMA's (`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`, `lm_head`), so the FRUGAL and
Subset-Norm/Subspace-Momentum rules project what the papers project.

The vocabulary is bytes (256 tokens): no tokenizer to train or ship. Sizes by
name (`config(name)`):

| size | dim | layers | heads | MLP | parameters | for |
|---|---|---|---|---|---|---|
| tiny | 128 | 4 | 4 | 352 | 0.87 M | tests |
| small | 256 | 6 | 8 | 704 | 4.86 M | 2 CPU cores, minutes |
| base | 768 | 12 | 12 | 2048 | 85.4 M | a GPU (GPT-2-small's 124 M less its 38 M of 50k-token embeddings) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a model."""

    dim: int
    layers: int
    heads: int
    hidden: int
    vocab: int = 256
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


SIZES: Dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=128, layers=4, heads=4, hidden=352),
    "small": LlamaConfig(dim=256, layers=6, heads=8, hidden=704),
    "base": LlamaConfig(dim=768, layers=12, heads=12, hidden=2048),
}


def config(size: str) -> LlamaConfig:
    """The configuration of a named size (tiny, small, base)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {sorted(SIZES)}")
    return SIZES[size]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the mean of squares taken over the last dimension in f32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> torch.Tensor:
    """cos and sin of every position's rotation angles, shape (2, seq_len, head_dim / 2)."""
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (batch, heads, seq, head_dim): each pair of features
    (the first and second halves, as LLaMA's Hugging Face layout does) turned by its angle."""
    cos, sin = tables[0, : x.shape[-2]].to(x.dtype), tables[1, : x.shape[-2]].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        if c.dim % c.heads or (c.dim // c.heads) % 2:
            raise ValueError(f"dim {c.dim} must split into {c.heads} heads of even size")
        self.heads, self.head_dim = c.heads, c.dim // c.heads
        self.q_proj = nn.Linear(c.dim, c.dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.dim, bias=False)
        self.o_proj = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        split = lambda t: t.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = rotate(q, tables), rotate(k, tables)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        attended = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq, dim))


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden, bias=False)
        self.down_proj = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm attention and MLP, each added to the residual stream."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = Mlp(c)

    def forward(self, x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), tables)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """The decoder; `forward(tokens)` gives next-token logits, `loss(tokens)` the mean
    cross-entropy of predicting each token from the ones before it."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab, bias=False)
        # Not state: rebuilt from the config, so it is a non-persistent buffer (no state_dict entry).
        self.register_buffer("rotary", rotary_tables(c.dim // c.heads, c.max_seq_len, c.rope_theta), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LLaMA's initialisation: normal(0, 0.02) for every matrix, ones for the norms."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:
                nn.init.ones_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[-1]} tokens; the model takes at most {self.config.max_seq_len}")
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, self.rotary)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token) over (batch, seq + 1) tokens."""
        return next_token_loss(self, tokens)


def next_token_loss(forward, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `forward`'s logits for tokens[:, :-1] against tokens[:, 1:]
    (`forward` is the model, or a wrapper of it such as DistributedDataParallel)."""
    logits = forward(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def parameter_count(size: str) -> int:
    """Parameters of a named size, without building the model."""
    c = config(size)
    per_layer = 4 * c.dim * c.dim + 3 * c.dim * c.hidden + 2 * c.dim
    return c.layers * per_layer + 2 * c.vocab * c.dim + c.dim


def build(size: str, seed: int = 0) -> Llama:
    """A freshly initialised model of a named size, the same for a given seed everywhere."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Llama(config(size))
    finally:
        torch.random.set_rng_state(generator_state)

"""A small LLaMA-style decoder (RMSNorm, rotary embeddings, SwiGLU) for the convergence benchmark.

Module names follow HF's LLaMA (``layers.i.attn.q_proj``, ``layers.i.mlp.gate_proj``, ``lm_head``), so
:func:`lowrank_optim.param_groups` with ``target_modules=["attn", "mlp"]`` picks the block weights and
leaves the embedding, norms and output head plain, as GaLore's pre-training script does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder hyper-parameters (byte vocabulary by default)."""

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ffn: int = 344
    max_len: int = 256
    rope_base: float = 10000.0

    def asdict(self) -> dict[str, float]:
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang and Sennrich 2019, arXiv:1910.07467)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables of rotary position embeddings (Su et al. 2021, arXiv:2104.09864)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs of channels (first half with second half, HF LLaMA's layout) of ``(B, H, T, D)``."""
    t = x.shape[-2]
    cos, sin = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"Invalid n_heads: {cfg.n_heads} does not divide d_model={cfg.d_model}")
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=False)
        self.down_proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """LLaMA-style causal language model; ``forward(tokens, targets)`` returns the mean cross-entropy."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_len, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LLaMA's init: normal(0, 0.02) for every linear and embedding weight, ones for norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(cfg: DecoderConfig, seed: int = 0, device: torch.device | str = "cpu") -> Decoder:
    """A freshly initialised decoder (same weights for the same seed on every run and device type), built
    directly on ``device`` (a LLaMA-1B decoder is not initialised on the CPU first)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Decoder(cfg)


#: The decoder at GaLore's LLaMA shapes (``configs/llama_*.json``: layers, width, SwiGLU width, heads,
#: vocabulary 32000), for end-to-end step timing (``benchmarks.throughput --mode e2e``); ``tiny`` is for tests.
LLAMA_DECODERS: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(vocab=96, d_model=64, n_layers=1, n_heads=4, d_ffn=160, max_len=64),
    "quick": DecoderConfig(vocab=4096, d_model=256, n_layers=2, n_heads=4, d_ffn=688, max_len=128),
    "60M": DecoderConfig(vocab=32000, d_model=512, n_layers=8, n_heads=8, d_ffn=1376, max_len=256),
    "130M": DecoderConfig(vocab=32000, d_model=768, n_layers=12, n_heads=12, d_ffn=2048, max_len=256),
    "350M": DecoderConfig(vocab=32000, d_model=1024, n_layers=24, n_heads=16, d_ffn=2736, max_len=256),
    "1B": DecoderConfig(vocab=32000, d_model=2048, n_layers=24, n_heads=32, d_ffn=5461, max_len=256),
}

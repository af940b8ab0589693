"""A small Llama-style decoder whose state dict uses Hugging Face Llama tensor names.

The benchmark's checkpoints are written as `model.safetensors` + `config.json`, so they go through the same
loader as users' checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 40
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 172
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> dict:
        """The `config.json` a Hugging Face Llama checkpoint of this shape would carry."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf(cls, config: dict) -> TinyConfig:
        kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
        if kv_heads != config["num_attention_heads"]:
            raise ValueError(f"grouped-query attention is not supported (num_key_value_heads={kv_heads})")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            rope_theta=config.get("rope_theta", 10000.0),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in the Hugging Face Llama layout (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q = rotate(self.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = rotate(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TinyLlama(nn.Module):
    """Causal decoder. `forward(tokens, pad)` masks padded keys, so left- and right-padded batches agree."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02 if isinstance(module, nn.Embedding) else 0.05)

    def rotary(self, n: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        positions = torch.arange(n, dtype=torch.float32)[None, :] - offsets[:, None].float()
        angles = positions[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (b, 1, n, dim)
        return angles.cos(), angles.sin()

    def forward(self, tokens: Tensor, pad: Tensor | None = None) -> Tensor:
        """Logits (b, n, vocab). `pad` marks padding (b, n); each position still attends to itself."""
        b, n = tokens.shape
        if pad is None:
            pad = torch.zeros_like(tokens, dtype=torch.bool)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = causal[None] & ~pad[:, None, :]
        allowed = allowed | torch.eye(n, dtype=torch.bool)[None]
        mask = allowed[:, None]  # (b, 1, n, n)
        cos, sin = self.rotary(n, pad.long().cumprod(dim=1).sum(dim=1))  # left padding shifts positions
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: TinyLlama, folder: Path) -> Path:
    """Write `model.safetensors` and `config.json` into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2, sort_keys=True) + "\n")
    return folder


def load_config(folder: Path) -> TinyConfig:
    return TinyConfig.from_hf(json.loads((Path(folder) / "config.json").read_text()))


def load_state(folder: Path) -> dict[str, Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def load_checkpoint(folder: Path) -> TinyLlama:
    model = TinyLlama(load_config(folder))
    model.load_state_dict(load_state(folder), strict=True)
    model.eval()
    return model


def build_model(config: TinyConfig, state: dict[str, Tensor]) -> TinyLlama:
    model = TinyLlama(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def is_finite(state: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())

"""The demo: a family of tiny Llama-shaped checkpoints generated from seeds (same arguments, same bytes).

`python -m mergelens_mcp.demo DIR` writes them into DIR (default `.demo`): a base, two compatible fine-tunes, a
fine-tune whose layer 2 update is reversed, one that is the exact opposite of the first, and an unrelated model.
Then `mergelens compare DIR/finetune_a DIR/finetune_b --base DIR/base --report report.html` shows the product.
The tests and the benchmarks build their checkpoints from the same generators.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Shape:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 256
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "intermediate_size": self.intermediate,
            "vocab_size": self.vocab, "rope_theta": 10000.0, "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": "bfloat16",
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (self.intermediate, h),
                p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes


def random_model(shape: Shape, seed: int) -> StateDict:
    """A freshly initialised model: N(0, 0.02) matrices, norms near 1."""
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for name, dims in shape.tensor_shapes().items():
        if len(dims) == 1:
            out[name] = 1.0 + 0.05 * torch.randn(dims, generator=g)
        else:
            out[name] = 0.02 * torch.randn(dims, generator=g)
    return out


def task_vector(
    base: StateDict, seed: int, strength: float = 0.08, rank: int = 4, noise: float = 0.01
) -> StateDict:
    """A fine-tune-like change: a low-rank update plus small dense noise, sized relative to each tensor."""
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for name, w in base.items():
        scale = float(w.norm()) / max(w.numel(), 1) ** 0.5
        if w.dim() == 2:
            r = min(rank, *w.shape)
            low = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g) / r**0.5
            delta = strength * scale * low + noise * scale * torch.randn(w.shape, generator=g)
        else:
            delta = noise * scale * torch.randn(w.shape, generator=g)
        out[name] = delta
    return out


def combine(base: StateDict, *deltas: tuple[float, StateDict], layers: set[int] | None = None) -> StateDict:
    """base + sum(coef * delta); with `layers`, the deltas apply only to those block indices."""
    out = {}
    for name, w in base.items():
        value = w.clone()
        index = _block_index(name)
        if layers is None or index in layers:
            for coef, delta in deltas:
                value += coef * delta[name]
        out[name] = value
    return out


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def save(
    state: StateDict, folder: Path, shape: Shape, *, dtype: torch.dtype = torch.bfloat16, shards: int = 1,
    extra: StateDict | None = None,
) -> Path:
    """Write `state` as safetensors (optionally sharded with an index) plus config.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
    tensors.update(extra or {})
    config = shape.config() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        chunk = names[s * per:(s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class Family:
    """Folders of one generated family of checkpoints."""

    base: Path
    finetune_a: Path
    finetune_b: Path
    flipped: Path
    opposed: Path
    unrelated: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def make_family(
    root: Path, shape: Shape | None = None, seed: int = 0, flipped_layers: frozenset[int] = frozenset({2})
) -> Family:
    """base, two compatible fine-tunes (a shared update plus their own), a fine-tune whose update is reversed
    in `flipped_layers`, one that is the exact opposite of finetune_a, and an unrelated model of the same
    shape."""
    shape = shape or Shape()
    base = random_model(shape, seed)
    shared = task_vector(base, seed + 1)
    own_a, own_b = task_vector(base, seed + 2), task_vector(base, seed + 3)
    ft_a = combine(base, (1.0, shared), (0.6, own_a))
    ft_b = combine(base, (1.0, shared), (0.6, own_b))
    flipped = {
        name: (2 * base[name] - ft_b[name]) if _block_index(name) in flipped_layers else ft_b[name]
        for name in base
    }
    opposed = {name: 2 * base[name] - ft_a[name] for name in base}
    paths = {
        "base": base, "finetune_a": ft_a, "finetune_b": ft_b, "flipped": flipped, "opposed": opposed,
        "unrelated": random_model(shape, seed + 100),
    }
    return Family(**{key: save(state, root / key, shape) for key, state in paths.items()})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else ".demo")
    family = make_family(root)
    for name, path in family.as_dict().items():
        print(f"{name:>11}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

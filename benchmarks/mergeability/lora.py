"""LoRA fine-tunes of the benchmark's model, saved as PEFT adapters.

`add_lora` wraps every linear module of the decoder layers (q, k, v, o, gate, up, down) of a copy of the base
in a `LoRALinear`: y = W x + (B (A x)) * scale, with W frozen, A (r x in) initialised as PEFT does (Kaiming
uniform, a = sqrt(5)), B (out x r) zero and scale = lora_alpha / r. Only A and B train.

`save_adapter` writes what `PeftModel.save_pretrained` writes for such a model: `adapter_config.json` (peft_type
LORA, r, lora_alpha, target_modules, base_model_name_or_path = the base checkpoint's folder) and
`adapter_model.safetensors` with PEFT's key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
The benchmark does not need peft to run; a test loads these files with real peft into transformers'
LlamaForCausalLM and checks the logits.

`merged_state` is what mergekit's `base+adapter` (PEFT's merge_and_unload) builds: base + (B @ A) * scale per
adapted tensor, in float32. The merge methods run on it exactly as on full fine-tunes.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from .model import TinyLlama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-`rank` update scaled by alpha / rank (PEFT's LoRA Linear)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear: the benchmark's linear layers have no bias")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def add_lora(base: TinyLlama, rank: int, alpha: float, seed: int) -> TinyLlama:
    """A copy of `base` whose decoder linear modules carry LoRA factors (seeded init); every base weight frozen."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def lora_factors(model: TinyLlama) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name (Hugging Face's, e.g. `model.layers.0.self_attn.q_proj`): (A, B)} of a model from add_lora."""
    return {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
            for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapter(model: TinyLlama, folder: Path, base_folder: Path, rank: int, alpha: float) -> Path:
    """Write `model`'s LoRA factors as a PEFT adapter folder whose base is the checkpoint in `base_folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factors = lora_factors(model)
    if not factors:
        raise ValueError("save_adapter: the model has no LoRA modules (make it with add_lora)")
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_folder).resolve()),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_adapter(folder: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
    """({module: (A, B)}, scale) of an adapter written by save_adapter (scale = lora_alpha / r)."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA adapters (no rsLoRA, DoRA or per-module ranks) are read here")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                factors[module] = (f.get_tensor(key), f.get_tensor(key.replace(".lora_A.", ".lora_B.")))
    return factors, config["lora_alpha"] / config["r"]


def merged_state(base: dict[str, Tensor], folder: Path) -> dict[str, Tensor]:
    """base + (B @ A) * scale on every adapted tensor (float32): the full model mergekit's `base+adapter` reads."""
    factors, scale = load_adapter(folder)
    state = {k: v.clone() for k, v in base.items()}
    for module, (a, b) in factors.items():
        name = f"{module}.weight"
        if name not in state:
            raise ValueError(f"{folder}: the adapter adapts {module}, which the base has no {name} for")
        state[name] = state[name] + (b @ a) * scale
    return state

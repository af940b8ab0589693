"""Activation similarity: linear CKA per layer between two models run on the same probe inputs.

Linear CKA (Kornblith et al., ICML 2019): for centred representations X (n x d1) and Y (n x d2) of the
same n inputs, CKA = |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F), in [0, 1], 1 for representations equal up to
rotation and isotropic scaling. It needs the optional `transformers` dependency (`pip install
mergelens-mcp[activations]`) for Hugging Face checkpoints; any other model can supply its own probe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, InputError
from ..security.limits import Limits
from ..security.paths import PathGuard
from .loading import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

# A probe maps a checkpoint folder to one representation matrix per layer: [embeddings, layer 0, layer 1, ...],
# each (n, d) with the same n rows (the same inputs, in the same order) for every model.
Probe = Callable[[Path], list[torch.Tensor]]


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two (n, d) representations of the same n inputs."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs: {x.shape[0]} rows vs {y.shape[0]}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = float(torch.linalg.matrix_norm(y.T @ x) ** 2)
    norm = float(torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))
    return 0.0 if norm == 0 else min(1.0, max(0.0, cross / norm))


def probe_texts() -> list[str]:
    """The short, varied English, code and maths probe set shipped with the package."""
    text = resources.files("mergelens_mcp").joinpath("data/probe_texts.txt").read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def hf_probe(texts: Sequence[str] | None = None, max_tokens: int = 64) -> Probe:
    """A probe for Hugging Face checkpoints: the model's own tokenizer, offline, per-token hidden states."""
    try:
        import transformers
    except ImportError:
        raise InputError(
            "activation CKA needs transformers: pip install 'mergelens-mcp[activations]'"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    inputs = list(texts or probe_texts())

    def probe(folder: Path) -> list[torch.Tensor]:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointFormatError(
                f"{folder}: transformers cannot load this checkpoint with its tokenizer for activation CKA "
                f"({type(exc).__name__}: {exc}); run without activations"
            ) from None
        model.eval()
        batch = tokenizer(inputs, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens)
        with torch.inference_mode():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        keep = batch["attention_mask"].bool()
        return [h[keep].float() for h in hidden]

    return probe


def layer_names(count: int) -> list[str]:
    """Names matching the weight metrics' layers: hidden state 0 is 'embed', state i+1 is 'layers.i'."""
    return ["embed", *(f"layers.{i}" for i in range(count - 1))]


def activation_cka(
    models: Sequence[Checkpoint | Path | str], probe: Probe, *, guard: PathGuard | None = None,
    limits: Limits | None = None,
) -> dict[tuple[int, int], dict[str, float]]:
    """Per-layer linear CKA for every pair of models, keyed by (i, j) model indices and layer name.

    Each model is a checkpoint already opened by `load_checkpoint`, or a folder, file or Hub id that is read
    through it here, with `guard` and `limits`: its paths are resolved inside the allowed roots and its
    headers checked against the caps before the probe (transformers) touches any of its files.
    """
    folders = [_checked_folder(model, f"model {i}", guard, limits) for i, model in enumerate(models)]
    reps = [probe(folder) for folder in folders]
    out: dict[tuple[int, int], dict[str, float]] = {}
    for i in range(len(reps)):
        for j in range(i + 1, len(reps)):
            same_rows = all(a.shape[0] == b.shape[0] for a, b in zip(reps[i], reps[j], strict=False))
            if len(reps[i]) != len(reps[j]) or not same_rows:
                raise CheckpointFormatError(
                    f"models {i} and {j} gave representations of different shapes on the probe "
                    "(different tokenizers or depths); activation CKA needs the same inputs"
                )
            names = layer_names(len(reps[i]))
            out[(i, j)] = {name: round(linear_cka(a, b), 6) for name, a, b in zip(names, reps[i], reps[j], strict=True)}
    return out


def _checked_folder(model: Checkpoint | Path | str, label: str, guard: PathGuard | None, limits: Limits | None) -> Path:
    """The folder of a checkpoint read through the guarded loader (headers within the caps)."""
    if isinstance(model, Checkpoint):
        return model.root
    with load_checkpoint(str(model), label, guard=guard, limits=limits) as ckpt:
        return ckpt.root

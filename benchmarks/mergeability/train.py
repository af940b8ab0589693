"""Seeded pretraining of the base model and per-task fine-tuning, one torch thread."""

from __future__ import annotations

import copy
import math

import torch
from torch.nn import functional as F

from .lora import add_lora
from .model import TinyConfig, TinyLlama
from .tasks import VOCAB_SIZE, Sampler, TestSet

BATCH = 64


def fit(
    model: TinyLlama, sampler: Sampler, steps: int, lr: float, seed: int, warmup: int = 50, decay: bool = True
) -> TinyLlama:
    """AdamW on `sampler`'s batches for `steps` steps; linear warmup, then cosine decay when `decay`."""
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]  # a LoRA model trains its factors only
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    for _ in range(steps):
        tokens, pad, loss_mask = sampler.batch(BATCH)
        logits = model(tokens, pad)[:, :-1]
        targets = tokens[:, 1:]
        mask = loss_mask[:, :-1]
        loss = F.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    return model


def pretrain(
    tasks: list[str], seed: int, steps: int, held_out: list[TestSet], lr: float = 3e-3, hidden: int = 64,
    layers: int = 2,
) -> TinyLlama:
    """The base model: trained from a seeded init on `tasks` only; `hidden` wide (MLP 172/64 x), `layers` deep."""
    torch.manual_seed(seed)
    intermediate = round(hidden * 172 / 64)
    model = TinyLlama(TinyConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                                 intermediate_size=intermediate))
    return fit(model, Sampler(tasks, seed, held_out), steps, lr, seed)


def finetune(
    base: TinyLlama, task: str, lr: float, steps: int, seed: int, held_out: list[TestSet]
) -> TinyLlama:
    """A copy of `base` trained on `task` alone."""
    model = copy.deepcopy(base)
    sampler = Sampler([task], seed + 1000 * round(lr * 1e5), held_out)
    return fit(model, sampler, steps, lr, seed, warmup=20)


def finetune_lora(
    base: TinyLlama, task: str, lr: float, steps: int, seed: int, held_out: list[TestSet], rank: int, alpha: float
) -> TinyLlama:
    """`base` with LoRA factors on its decoder linear modules, trained on `task` alone (base frozen).

    Same batches and schedule as `finetune` at the same lr; only the factors train.
    """
    model = add_lora(base, rank, alpha, seed)
    sampler = Sampler([task], seed + 1000 * round(lr * 1e5), held_out)
    return fit(model, sampler, steps, lr, seed, warmup=20)

"""Eight synthetic sequence tasks sharing one vocabulary, each with its own task token.

A sequence is `[task] x1 .. xn [sep] y1 .. ym [eos]`; accuracy is the exact match of the greedily generated
answer `y1 .. ym [eos]`. Test sets are seeded and held out: training never samples a test prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PAD, SEP, EOS, PLUS = 0, 1, 2, 3
DIGIT0 = 4  # digits 0-9 are tokens 4-13
TASK0 = 14  # task tokens follow the digits
VOCAB_SIZE = 40

Example = tuple[list[int], list[int]]  # (input digits, answer digits)


def _digits(rng: random.Random, low: int, high: int) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(low, high))]


def _operands(rng: random.Random) -> list[int]:
    """Two 3-digit operands separated by `+` (encoded as -1)."""
    a = [rng.randrange(10) for _ in range(3)]
    b = [rng.randrange(10) for _ in range(3)]
    return [*a, -1, *b]


def add_digitwise(x: list[int]) -> list[int]:
    """Digit-wise addition mod 10 of the operands on both sides of `+` (-1)."""
    cut = x.index(-1)
    return [(i + j) % 10 for i, j in zip(x[:cut], x[cut + 1 :], strict=True)]


def increment(x: list[int]) -> list[int]:
    """The digits read as a number (leading zeros kept), plus one; 99 -> 100."""
    value = int("".join(map(str, x))) + 1
    return [int(c) for c in str(value).zfill(len(x))]


# task -> (input sampler, answer)
DEFINITIONS: dict[str, tuple[Callable[[random.Random], list[int]], Callable[[list[int]], list[int]]]] = {
    "copy": (lambda rng: _digits(rng, 3, 7), lambda x: list(x)),
    "reverse": (lambda rng: _digits(rng, 3, 7), lambda x: x[::-1]),
    "sort": (lambda rng: _digits(rng, 3, 7), sorted),
    "add": (_operands, add_digitwise),
    "shift": (lambda rng: _digits(rng, 3, 7), lambda x: [(d + 3) % 10 for d in x]),
    "count": (lambda rng: _digits(rng, 1, 9), lambda x: [len(x)]),
    "max": (lambda rng: _digits(rng, 3, 7), lambda x: [max(x)]),
    "increment": (lambda rng: _digits(rng, 2, 6), increment),
}


def answer(task: str, x: list[int]) -> list[int]:
    return DEFINITIONS[task][1](x)


def sample(task: str, rng: random.Random) -> Example:
    x = DEFINITIONS[task][0](rng)
    return x, answer(task, x)


TASKS: tuple[str, ...] = tuple(DEFINITIONS)
PRETRAIN_TASKS: tuple[str, ...] = ("copy", "reverse", "sort", "max", "increment", "count")


def task_token(task: str) -> int:
    return TASK0 + TASKS.index(task)


def encode_prompt(task: str, x: list[int]) -> list[int]:
    return [task_token(task), *(PLUS if d < 0 else DIGIT0 + d for d in x), SEP]


def encode_answer(y: list[int]) -> list[int]:
    return [*(DIGIT0 + d for d in y), EOS]


@dataclass(frozen=True)
class TestSet:
    task: str
    prompts: list[list[int]]
    answers: list[list[int]]  # encoded, ending with EOS


def make_test_set(task: str, seed: int, size: int = 200) -> TestSet:
    """`size` distinct held-out examples of `task`; depends only on the arguments."""
    rng = random.Random(f"test/{task}/{seed}")
    seen: dict[tuple[int, ...], list[int]] = {}
    for _ in range(size * 50):
        if len(seen) == size:
            break
        x, y = sample(task, rng)
        seen.setdefault(tuple(encode_prompt(task, x)), encode_answer(y))
    return TestSet(task, [list(p) for p in seen], list(seen.values()))


class Sampler:
    """Seeded stream of training batches over some tasks, never yielding a held-out test prompt."""

    def __init__(self, tasks: list[str], seed: int, held_out: list[TestSet]) -> None:
        self.tasks = list(tasks)
        self.rng = random.Random(f"train/{','.join(tasks)}/{seed}")
        self.held_out = {tuple(p) for t in held_out for p in t.prompts}

    def example(self) -> tuple[list[int], list[int]]:
        while True:
            task = self.rng.choice(self.tasks)
            x, y = sample(task, self.rng)
            prompt = encode_prompt(task, x)
            if tuple(prompt) not in self.held_out:
                return prompt, encode_answer(y)

    def batch(self, size: int) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens, pad, loss_mask), right-padded; the loss covers the answer and its EOS."""
        pairs = [self.example() for _ in range(size)]
        n = max(len(p) + len(a) for p, a in pairs)
        tokens = torch.full((size, n), PAD, dtype=torch.long)
        loss_mask = torch.zeros((size, n), dtype=torch.bool)
        for i, (p, a) in enumerate(pairs):
            seq = p + a
            tokens[i, : len(seq)] = torch.tensor(seq)
            loss_mask[i, len(p) - 1 : len(seq) - 1] = True  # position t predicts token t+1
        pad = torch.arange(n)[None, :] >= torch.tensor([len(p) + len(a) for p, a in pairs])[:, None]
        return tokens, pad, loss_mask


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], max_new: int) -> Tensor:
    """Greedy continuation of left-padded prompts: (b, max_new) generated tokens."""
    n = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), n), PAD, dtype=torch.long)
    pad = torch.ones((len(prompts), n), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, n - len(p) :] = torch.tensor(p)
        pad[i, n - len(p) :] = False
    out = []
    for _ in range(max_new):
        nxt = model(tokens, pad)[:, -1].argmax(-1)
        out.append(nxt)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        pad = torch.cat((pad, torch.zeros_like(nxt[:, None], dtype=torch.bool)), dim=1)
    return torch.stack(out, dim=1)


def accuracy(model: torch.nn.Module, test: TestSet) -> float:
    """Share of test prompts whose greedy answer, up to and including EOS, matches exactly."""
    width = max(len(a) for a in test.answers)
    generated = generate(model, test.prompts, width).tolist()
    hits = sum(g[: len(a)] == a for g, a in zip(generated, test.answers, strict=True))
    return hits / len(test.answers)

"""LoRA adapters (PEFT) as comparison inputs, measured with exact low-rank algebra.

A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) is opened as an
`AdapterCheckpoint`: a checkpoint whose tensor table is its base's (the base found by `--base` or by the
config's `base_model_name_or_path`, under the same path guard), with the adapter's `modules_to_save` tensors
in place of the base's. An adapted module's task vector is `scale * B @ A` (scale = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA; `rank_pattern` / `alpha_pattern` per module) and is never formed densely:

- inner products, norms, cosines and distances go through r x r products,
  <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T)), and, against a dense tensor D, one pass of D A^T by row blocks;
- singular values and vectors come from the QR of the factors (B = Qb Rb, A^T = Qa Ra, SVD of Rb Ra^T): exact;
- element-wise statistics (sign conflict, the TIES threshold and mass fraction, the value histogram) are
  computed exactly on a seeded sample of rows (all rows when the tensor has at most SAMPLE_VALUES values).

The adapted weights (base + scale * B @ A) reuse the base's operand, so two adapters of one base share its
norm and their distance is that of their task vectors, exactly. Only the weights' own SVD (the spectral
metrics of the weights, which are not low-rank) forms base + delta densely. DoRA magnitude vectors are not
applied: the comparison says so in a finding.

Every other reader (merge simulation, preview, verify, model loading, the zoo's sketches) reads an adapter
through the tensor stream as the model it makes: `apply_delta` gives base + scale * B @ A densely. The base's
tensors are viewed through the base checkpoint's own mapping, however many adapters of it are read.
"""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, CheckpointNotFoundError, InputError
from ..models import AdapterInfo, Finding, FindingLevel
from ..security.limits import Limits
from ..security.paths import PathGuard, shown
from .loading import Checkpoint, _read_json_file, load_checkpoint, read_header
from .metrics import Magnitudes, Operand, PairSums, _Accumulator, pair_sums
from .spectral import SVD, decompose

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAMPLE_VALUES = 1 << 18  # values of the seeded row sample the element-wise statistics are exact on
SAMPLE_SEED = 0
BASE_SAMPLE_VALUES = 1 << 20  # values of the base's row sample for |W|^2 when adapters of one base are compared
# without reading it whole: 256 of a 4096-wide matrix's rows (see `BaseSample`)
ROW_BLOCK_VALUES = 1 << 20  # values per row block of a pass over a dense tensor
REFUSED_TYPES = {
    "IA3": "IA3 scales activations, it has no weight delta to compare",
    "PREFIX_TUNING": "prefix tuning adds virtual tokens, not weights",
    "PROMPT_TUNING": "prompt tuning adds virtual tokens, not weights",
    "P_TUNING": "p-tuning adds virtual tokens, not weights",
    "ADAPTION_PROMPT": "adaption prompts add virtual tokens, not weights",
}
_PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<rest>.+))?$"
)
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------- the adapter's config


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoRA `adapter_config.json` that the comparison reads."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str = ()
    modules_to_save: tuple[str, ...] = ()
    base_model: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def _pattern(self, patterns: dict[str, Any], module: str) -> Any:
        for key, value in patterns.items():  # PEFT's rule: the key matches the end of the module's name
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def rank(self, module: str) -> int:
        found = self._pattern(self.rank_pattern, module)
        return self.r if found is None else int(found)

    def scale(self, module: str, rank: int) -> float:
        found = self._pattern(self.alpha_pattern, module)
        alpha = self.lora_alpha if found is None else float(found)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def parse_config(data: Any, where: str) -> AdapterConfig:
    """The LoRA config in `data` (adapter_config.json's content); a CheckpointFormatError naming the field."""
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type in REFUSED_TYPES:
        raise CheckpointFormatError(
            f"{where}: a {peft_type} adapter is not supported ({REFUSED_TYPES[peft_type]}); "
            "mergelens compares LoRA adapters (peft_type LORA) and full checkpoints"
        )
    if peft_type != "LORA":
        raise CheckpointFormatError(
            f"{where}: unknown PEFT type {_short(data.get('peft_type'))}; mergelens compares LoRA adapters "
            "(peft_type LORA, DoRA and rsLoRA included) and full checkpoints"
        )
    r, alpha = data.get("r"), data.get("lora_alpha")
    if type(r) is not int or r <= 0:
        raise CheckpointFormatError(f"{where}: {ADAPTER_CONFIG} has rank r={_short(r)}; it must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointFormatError(f"{where}: {ADAPTER_CONFIG} has lora_alpha={_short(alpha)}; it must be a number")
    targets = data.get("target_modules") or ()
    targets = targets if isinstance(targets, str) else tuple(sorted(str(t) for t in targets))
    base = data.get("base_model_name_or_path")
    return AdapterConfig(
        r=r, lora_alpha=float(alpha), use_rslora=bool(data.get("use_rslora")), use_dora=bool(data.get("use_dora")),
        fan_in_fan_out=bool(data.get("fan_in_fan_out")), target_modules=targets,
        modules_to_save=tuple(str(m) for m in data.get("modules_to_save") or ()),
        base_model=str(base) if base else None,
        rank_pattern=_numbers(data.get("rank_pattern"), where, "rank_pattern"),
        alpha_pattern=_numbers(data.get("alpha_pattern"), where, "alpha_pattern"),
    )


def _numbers(value: Any, where: str, name: str) -> dict[str, Any]:
    if not value:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
    ):
        raise CheckpointFormatError(f"{where}: {ADAPTER_CONFIG} field {name} must map module names to numbers")
    return {str(k): v for k, v in value.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


# ----------------------------------------------------------------------------------- the adapter as a checkpoint


@dataclass(frozen=True)
class Factors:
    """Where one adapted tensor's factors are: delta = scale * left @ right, with left = B and right = A for a
    Linear; transposed for an Embedding or a fan-in-fan-out (Conv1D) layer."""

    module: str
    a_name: str
    b_name: str
    transposed: bool
    rank: int
    scale: float
    magnitude: str | None = None


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and ((path / ADAPTER_CONFIG).exists() or (path / ADAPTER_WEIGHTS).exists())


def open_adapter(
    folder: Path, source: str, label: str, *, guard: PathGuard, limits: Limits, base: Checkpoint | None = None
) -> AdapterCheckpoint:
    """The adapter in `folder` over `base`, or over the base its config names (resolved under `guard`)."""
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not (config_path.is_file() or config_path.is_symlink()):
        raise CheckpointFormatError(
            f"{label}: {folder} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}; a LoRA adapter needs both (save it "
            "with PeftModel.save_pretrained)"
        )
    if not (weights_path.is_file() or weights_path.is_symlink()):
        raise CheckpointFormatError(
            f"{label}: {folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; pickled adapter_model.bin is never "
            "loaded: save the adapter with safe_serialization=True"
        )
    config = parse_config(_read_json_file(guard.check_file(config_path, label), label), label)
    weights = guard.check_file(weights_path, label)
    factors = read_header(weights, limits, label)  # before the base is opened: a bad file leaves nothing open
    owns_base = base is None
    if base is None:
        if not config.base_model:
            raise CheckpointNotFoundError(
                f"{label}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass the base model with --base"
            )
        try:
            base = load_checkpoint(config.base_model, f"{label} base", guard=guard, limits=limits)
        except (CheckpointNotFoundError, InputError) as exc:
            raise type(exc)(f"{exc} (the base of the LoRA adapter {label}; pass it with --base)") from None
    if isinstance(base, AdapterCheckpoint):
        if owns_base:
            base.close()
        raise InputError(f"{label}: its base {shown(base.source)} is itself a LoRA adapter; pass a full base model")
    adapter = AdapterCheckpoint(
        label=label, source=source, root=folder, files=[weights, config_path, *base.files], tensors=dict(base.tensors),
        config=base.config, adapter_config=config, base_checkpoint=base,
    )
    adapter.owns_base = owns_base
    try:
        adapter._index(factors)
    except BaseException:
        adapter.close()
        raise
    return adapter


class AdapterCheckpoint(Checkpoint):
    """A LoRA adapter seen as a checkpoint: its base's tensors, with the adapted ones known by their factors
    (`factors`) and the modules_to_save tensors read from the adapter file."""

    def __init__(self, *, adapter_config: AdapterConfig, base_checkpoint: Checkpoint, **fields: Any) -> None:
        super().__init__(**fields)
        self.adapter_config = adapter_config
        self.base_checkpoint = base_checkpoint
        self.owns_base = False  # the base was opened for this adapter (from its config): closed with it
        self.adapted: dict[str, Factors] = {}  # base tensor name -> its factors
        self.saved: list[str] = []  # base tensor names replaced by modules_to_save tensors
        self._factor_infos: dict[str, Any] = {}

    def reopened(self, label: str | None = None, base: Checkpoint | None = None) -> AdapterCheckpoint:
        """A new, unopened copy (no header read again) over `base`, the copy of this adapter's base the caller
        holds; without one, over its own copy of the base, which it closes with itself."""
        copy = _rebuilt(self, label or self.label, base or self.base_checkpoint.reopened())
        copy.owns_base = base is None
        return copy

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its tables and paths (its base with it): the copy maps the files itself when it reads."""
        return (_rebuilt, (self.tables(), self.label, self.base_checkpoint))

    def tables(self) -> dict[str, Any]:
        """What a copy needs: paths, header tables, the adapter's config and its indexed factors."""
        return {"label": self.label, "source": self.source, "root": self.root, "files": self.files,
                "tensors": self.tensors, "config": self.config, "adapter_config": self.adapter_config,
                "owns_base": self.owns_base, "adapted": self.adapted, "saved": self.saved,
                "factor_infos": self._factor_infos}

    @property
    def model_root(self) -> Path:
        return self.base_checkpoint.model_root

    @property
    def target_modules(self) -> set[str]:
        """The adapted modules' short names (q_proj, ...): what `target_modules` matched."""
        return {f.module.rsplit(".", 1)[-1] for f in self.adapted.values()}

    def _index(self, factors: dict[str, Any]) -> None:
        parts: dict[str, dict[str, str]] = {}
        for key, info in factors.items():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            match = _PART.match(name)
            if match is None and ".base_layer." in name:  # the frozen base layer PEFT saves for embedding targets
                target = self._base_name(name.replace(".base_layer.", "."), name, shape=info.shape)
                if tuple(info.shape) != self.tensors[target].shape:
                    raise CheckpointFormatError(
                        f"{self.label}: {shown(key)} has shape {list(info.shape)}, the base's {target} "
                        f"{list(self.tensors[target].shape)}: adapters over a resized vocabulary are not supported"
                    )
                continue  # frozen during training: the base's own tensor
            if match is None:  # a modules_to_save tensor: dense, in place of the base's
                target = self._base_name(name, name, shape=info.shape)
                if tuple(info.shape) != self.tensors[target].shape:
                    raise CheckpointFormatError(
                        f"{self.label}: saved module tensor {shown(key)} has shape {list(info.shape)}, the base's "
                        f"{target} {list(self.tensors[target].shape)}: the adapter was made for another base"
                    )
                self.tensors[target] = info
                self.saved.append(target)
                continue
            if (match["rest"] or "").endswith("bias"):
                raise CheckpointFormatError(
                    f"{self.label}: {shown(key)} is a LoRA bias (lora_bias=True), which mergelens does not compare; "
                    "compare adapters trained without lora_bias"
                )
            parts.setdefault(match["module"], {})[match["part"]] = key
            self._factor_infos[key] = info
        for module, found in parts.items():
            self._add_module(module, found)
        if not self.adapted and not self.saved:
            raise CheckpointFormatError(f"{self.label}: {ADAPTER_WEIGHTS} holds no LoRA factors")

    def _add_module(self, module: str, found: dict[str, str]) -> None:
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_key = found.get("lora_embedding_A" if embedding else "lora_A")
        b_key = found.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            missing = "B" if a_key is not None else "A"
            raise CheckpointFormatError(f"{self.label}: module {shown(module)} has no lora_{missing} factor")
        a, b = self._factor_infos[a_key].shape, self._factor_infos[b_key].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise CheckpointFormatError(
                f"{self.label}: module {shown(module)}: factors A {list(a)} and B {list(b)} do not multiply "
                "(A must be r x in, B out x r); the adapter file is corrupt"
            )
        rank = a[0]
        expected = self.adapter_config.rank(module)
        if rank != expected:
            raise CheckpointFormatError(
                f"{self.label}: module {shown(module)} has rank {rank} in {ADAPTER_WEIGHTS} but {expected} in "
                f"{ADAPTER_CONFIG} (r / rank_pattern); the config does not belong to these weights"
            )
        transposed = embedding or self.adapter_config.fan_in_fan_out
        shape = (a[1], b[0]) if transposed else (b[0], a[1])
        target = self._base_name(f"{module}.weight", module, shape=shape)
        if self.tensors[target].shape != shape:
            raise CheckpointFormatError(
                f"{self.label}: module {shown(module)} gives a {list(shape)} delta but the base's {target} is "
                f"{list(self.tensors[target].shape)}: the adapter was made for another base"
            )
        self.adapted[target] = Factors(
            module, a_key, b_key, transposed, rank, self.adapter_config.scale(module, rank),
            found.get("lora_magnitude_vector"),
        )

    def _base_name(self, name: str, module: str, shape: Any) -> str:
        """The base's name for an adapter's tensor: PEFT keeps the model's own module path, but a base saved
        without (or with) its `model.` prefix is matched too."""
        candidates = [name, name.removeprefix("model."), f"model.{name}"]
        for candidate in candidates:
            if candidate in self.tensors:
                return candidate
        raise CheckpointFormatError(
            f"{self.label}: the adapter changes {shown(module)} but its base {self.base_checkpoint.label} has no "
            f"tensor {shown(name)}: the adapter was made for another base; pass its base with --base"
        )

    def factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Factors] | None:
        """(left, right, factors) of the tensor `name`, delta = left @ right with the scale folded into left,
        in float64 on `device`; None where the adapter does not change the tensor by factors."""
        found = self.adapted.get(name)
        if found is None:
            return None
        a, b = self._read_factor(found.a_name), self._read_factor(found.b_name)  # read per use: memory follows one
        left, right = (a.T, b.T) if found.transposed else (b, a)
        return (left * found.scale).to(device), right.to(device), found

    def _map(self, path: Path) -> mmap.mmap | None:
        """The base's files through the base checkpoint's own mapping (one per file, however many adapters of
        it are read); the adapter's file through its own."""
        if path in self.base_checkpoint.files:
            return self.base_checkpoint._map(path)
        return super()._map(path)

    def _mapping(self, path: Path) -> mmap.mmap | None:
        if path in self.base_checkpoint.files:
            return self.base_checkpoint._mapping(path)
        return super()._mapping(path)

    def _read_factor(self, key: str) -> torch.Tensor:
        info = self._factor_infos[key]
        reader = Checkpoint(self.label, self.source, self.root, [info.file], {key: info}, None)
        try:
            return reader.read(key, dtype=torch.float64)
        finally:
            reader.close()

    def factor_nbytes(self, name: str) -> int:
        """The stored bytes of tensor `name`'s two factors (0 where the adapter has none)."""
        found = self.adapted.get(name)
        return 0 if found is None else self._factor_infos[found.a_name].nbytes + self._factor_infos[found.b_name].nbytes

    @property
    def nbytes(self) -> int:
        """The bytes the adapter adds to a request: its factors and saved modules (its base counts once)."""
        return sum(i.nbytes for i in self._factor_infos.values()) + sum(self.tensors[n].nbytes for n in self.saved)

    def close(self) -> None:
        super().close()
        if self.owns_base:
            self.base_checkpoint.close()


def _rebuilt(adapter: AdapterCheckpoint | dict[str, Any], label: str, base: Checkpoint) -> AdapterCheckpoint:
    """An unopened adapter checkpoint with `adapter`'s tables (the adapter, or its `tables()`) over `base`."""
    state = adapter.tables() if isinstance(adapter, AdapterCheckpoint) else adapter
    copy = AdapterCheckpoint(
        label=label, source=state["source"], root=state["root"], files=state["files"],
        tensors=dict(state["tensors"]), config=state["config"], adapter_config=state["adapter_config"],
        base_checkpoint=base,
    )
    copy.owns_base = state["owns_base"]
    copy.adapted, copy.saved = dict(state["adapted"]), list(state["saved"])
    copy._factor_infos = dict(state["factor_infos"])
    return copy


def shared_base(models: list[Checkpoint]) -> Checkpoint | None:
    """The base the adapters among `models` were opened over, when they share one (None otherwise)."""
    bases = {id(m.base_checkpoint): m.base_checkpoint for m in models if isinstance(m, AdapterCheckpoint)}
    roots = {b.root for b in bases.values()}
    return next(iter(bases.values())) if len(roots) == 1 else None


def adapter_findings(models: list[Checkpoint], base: Checkpoint | None) -> list[Finding]:
    """What the adapters among `models` mean for the comparison: different bases (fatal), different targets,
    ranks, DoRA magnitudes not applied."""
    adapters = [m for m in models if isinstance(m, AdapterCheckpoint)]
    if not adapters:
        return []
    out: list[Finding] = []
    roots = {m.label: m.base_checkpoint.root.resolve() for m in adapters}
    if base is not None:
        roots["base"] = base.root.resolve()
    if len(set(roots.values())) > 1:
        where = ", ".join(f"{label}: {root}" for label, root in roots.items())
        out.append(Finding(
            level=FindingLevel.ERROR, code="adapter_base_mismatch",
            message=f"the LoRA adapters are over different bases ({where}): their deltas do not add to one model",
            fix="merge adapters trained on the same base, or pass that base with --base",
        ))
    targets = {m.label: m.target_modules for m in adapters}
    if len({frozenset(t) for t in targets.values()}) > 1:
        everywhere = set.intersection(*targets.values())
        partly = sorted(set.union(*targets.values()) - everywhere)
        out.append(Finding(
            level=FindingLevel.WARNING, code="adapter_target_mismatch",
            message=f"the adapters change different modules ({', '.join(partly)} in only some of them): where an "
            "adapter has no factors its task vector is zero",
            fix="a linear PEFT merge needs the same targets; use combination_type cat or svd, or mergekit",
        ))
    ranks = {m.label: sorted({f.rank for f in m.adapted.values()}) for m in adapters}
    if len({tuple(r) for r in ranks.values()}) > 1:
        out.append(Finding(
            level=FindingLevel.INFO, code="adapter_rank_mismatch",
            message="the adapters have different ranks (" + ", ".join(f"{k}: {v}" for k, v in ranks.items()) + ")",
            fix="PEFT's linear combination needs equal ranks; cat and svd do not",
        ))
    for m in adapters:
        declared = m.adapter_config.base_model
        if declared and not _same_source(declared, m.base_checkpoint):
            out.append(Finding(
                level=FindingLevel.WARNING, code="adapter_declared_base",
                message=f"{m.label}'s adapter_config.json names base {declared}; it was compared over "
                f"{m.base_checkpoint.source}, as given",
                fix="check that the adapter was trained on the base given (its shapes match it)",
            ))
        if m.adapter_config.use_dora:
            out.append(Finding(
                level=FindingLevel.WARNING, code="dora_magnitude_ignored",
                message=f"{m.label} is a DoRA adapter: its magnitude vectors are not applied; the metrics measure "
                "its direction update scale * B @ A only",
                fix="merge DoRA adapters with PEFT, which applies the magnitudes",
            ))
    return out


def _same_source(declared: str, base: Checkpoint) -> bool:
    if declared == base.source:
        return True
    try:
        return Path(declared).expanduser().resolve() == base.root.resolve()
    except (OSError, ValueError):
        return False


def adapter_info(ckpt: Checkpoint) -> AdapterInfo | None:
    """What the result says about a model that is a LoRA adapter (None for a full checkpoint)."""
    if not isinstance(ckpt, AdapterCheckpoint):
        return None
    config = ckpt.adapter_config
    return AdapterInfo(
        base=ckpt.base_checkpoint.source, ranks=sorted({f.rank for f in ckpt.adapted.values()}),
        lora_alpha=config.lora_alpha, use_rslora=config.use_rslora, use_dora=config.use_dora,
        target_modules=sorted(ckpt.target_modules), modules_to_save=list(config.modules_to_save),
        adapted_tensors=len(ckpt.adapted),
    )


def coverage_note(
    models: list[Checkpoint], tensors: list[str], unmeasured: list[str], sampled: list[str] | None = None,
    sample: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> list[str]:
    """What the result says about the adapters among `models`; `unmeasured`: the metrics left out because the
    base's tensors were not read (a comparison of adapters of one base); `sampled`: those estimated from its
    seeded row sample, `sample`: (rows read, rows sampled from, bytes read, the compared tensors' bytes)."""
    if not any(isinstance(m, AdapterCheckpoint) for m in models):
        return []
    adapted = low_rank_count(models, tensors)
    note = (
        f"LoRA adapters: {adapted} adapted tensor(s) measured from their factors (norms, cosines, distances and "
        "task-vector SVDs exact through r x r products); sign conflict, TIES thresholds, mass fraction and value "
        f"histograms exact on a seeded sample of rows (at most {SAMPLE_VALUES:,} values per tensor, all rows of "
        "smaller ones)"
    )
    if not unmeasured and not sampled:
        return [note + "; the weights' own SVDs form base + delta densely"]
    notes = [note]
    if sampled:
        rows, of, read, total = sample
        notes.append(
            "every model is a LoRA adapter of the base, which was read only on a seeded sample of rows (at most "
            f"{BASE_SAMPLE_VALUES:,} values per tensor, all rows of smaller ones: {rows:,} of {of:,} rows, "
            f"{read / max(total, 1):.1%} of its compared bytes): |W|^2 and <W, t_i> are the sample's sums scaled to "
            "all rows, |t_i|^2 and <t_a, t_b> exact from the factors, so |W + t_i|^2 = |W|^2 + 2 <W, t_i> + "
            "|t_i|^2; the weights' difference is the task vectors' (exact). Estimated so: "
            f"{', '.join(sampled)} (the KL histograms on the sampled rows, as with read_base); read_base=True "
            "(--read-base) measures them exactly"
        )
    if unmeasured:
        notes.append(
            f"not measured, as {BASE_NOT_READ}: {', '.join(unmeasured)}"
            + (" (the weights' SVDs need every row of the base)" if sampled else
               " (l2_distance divides the task vectors' difference by |W_a| + |W_b|, which hold the base)")
        )
    return notes


def low_rank_count(models: list[Checkpoint], tensors: list[str]) -> int:
    adapters = [m for m in models if isinstance(m, AdapterCheckpoint)]
    return sum(1 for n in tensors if any(n in m.adapted for m in adapters))


# ----------------------------------------------------------------------------------- the low-rank operand


def sample_rows(rows: int, cols: int, device: torch.device, values: int | None = None) -> torch.Tensor:
    """The seeded sample of rows element-wise statistics read: all of them up to `values` (SAMPLE_VALUES)
    values. A larger `values` draws a superset of a smaller one's rows (the same permutation, a longer prefix)."""
    keep = max(1, (SAMPLE_VALUES if values is None else values) // max(cols, 1))
    if keep >= rows:
        return torch.arange(rows, device=device)
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    return torch.randperm(rows, generator=generator)[:keep].sort().values.to(device)


class _Shaped(Operand):
    """An operand known by its (rows, cols) shape rather than a dense tensor."""

    shape: tuple[int, int]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def is_matrix(self) -> bool:
        return min(self.shape) > 1


class LowRankOperand(_Shaped):
    """dense + left @ right for a (rows, cols) tensor: a LoRA task vector (no dense part) or adapted weights
    (the base's operand as dense part). The metrics take it like any operand (see `exact_pair_sums`)."""

    low_rank = True

    def __init__(
        self, left: torch.Tensor, right: torch.Tensor, dense: Operand | None, *, rank: int, exact_max_elements: int
    ) -> None:
        self.left, self.right, self.dense = left, right, dense
        self.shape = (left.shape[0], right.shape[1])
        self.tensor = dense.tensor if dense is not None else left  # where the device is read
        self.base = None
        self.rank = rank
        self.exact_max_elements = exact_max_elements
        self.reference_norm = None

    # ---- element-wise statistics on the row sample

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The operand's values on rows `index`, float32, (len(index), cols)."""
        delta = self.left[index] @ self.right
        if self.dense is not None:
            delta = delta + dense_rows(self.dense, index).double()
        return delta.float()

    def row_sample(self) -> torch.Tensor:
        cached = self.__dict__.get("_row_sample")
        if cached is None:
            cached = self.__dict__["_row_sample"] = self.rows(sample_rows(*self.shape, self.left.device)).reshape(-1)
        return cached

    def sampled(self, size: int) -> torch.Tensor:
        return self.row_sample()

    @property
    def sample(self) -> torch.Tensor:  # type: ignore[override]
        return self.row_sample()

    @property
    def magnitudes(self) -> Magnitudes:  # type: ignore[override]
        cached = self.__dict__.get("_magnitudes")
        if cached is None:
            cached = self.__dict__["_magnitudes"] = Magnitudes(self.row_sample())
        return cached

    @property
    def value_range(self) -> tuple[float, float]:  # type: ignore[override]
        lo, hi = torch.aminmax(self.row_sample())
        return float(lo), float(hi)

    # ---- exact algebra

    @property
    def gram(self) -> float:
        """|left @ right|^2 = sum((L^T L) * (R R^T))."""
        cached = self.__dict__.get("_gram")
        if cached is None:
            cached = self.__dict__["_gram"] = float(((self.left.T @ self.left) * (self.right @ self.right.T)).sum())
        return cached

    @property
    def norm(self) -> float:  # type: ignore[override]
        cached = self.__dict__.get("_norm")
        if cached is None:
            total = self.gram
            if self.dense is not None:
                total += self.dense.norm**2 + 2 * dense_dot(self.dense, self)
            cached = self.__dict__["_norm"] = math.sqrt(max(total, 0.0))
        return cached

    @property
    def svd(self) -> SVD:  # type: ignore[override]
        cached = self.__dict__.get("_svd")
        if cached is None:
            cached = self.__dict__["_svd"] = self._decompose()
        return cached

    def _decompose(self) -> SVD:
        m, n = self.shape
        if self.dense is not None:  # weights are not low-rank: formed densely (float32, by row blocks) for their SVD
            full = torch.empty(m, n, device=self.left.device)
            step = max(1, ROW_BLOCK_VALUES // max(n, 1))
            for start in range(0, m, step):
                index = torch.arange(start, min(m, start + step), device=self.left.device)
                full[index] = self.rows(index)
            return decompose(full, self.rank, self.exact_max_elements, energy=self.norm**2)
        return low_rank_svd(self.left, self.right, self.rank)

    def exact_pair_sums(self, other: Operand, signs: bool) -> PairSums:
        return low_rank_pair_sums(self, other, signs)


@dataclass
class BaseSample:
    """The base's tensor read on a seeded sample of its rows (`sample_rows`, BASE_SAMPLE_VALUES values):
    |W|^2 estimated as the sample's sum of squares scaled by rows / sampled rows (unbiased; its relative error
    is about the spread (CV) of the rows' squared norms over sqrt(sampled rows)). The cross terms <W, t> and the
    values (KL histograms) use the rows of the element-wise sample (SAMPLE_VALUES: the first rows of the same
    seeded permutation, so a subset), where the task vectors' rows are formed anyway."""

    index: torch.Tensor  # the sampled rows, sorted
    values: torch.Tensor  # float32 (len(index), cols)
    rows: int
    nbytes: int  # stored bytes of the sampled rows
    inner: torch.Tensor | None = None  # positions in `index` of the element-wise sample's rows (None: all)

    @property
    def energy(self) -> float:
        """|W|^2, estimated from the sample."""
        cached = self.__dict__.get("_energy")
        if cached is None:
            scale = self.rows / max(len(self.index), 1)
            cached = self.__dict__["_energy"] = scale * float((self.values.double() ** 2).sum())
        return cached

    @property
    def norm(self) -> float:
        return math.sqrt(max(self.energy, 0.0))

    @property
    def inner_index(self) -> torch.Tensor:
        return self.index if self.inner is None else self.index[self.inner]

    @property
    def inner_values(self) -> torch.Tensor:
        return self.values if self.inner is None else self.values[self.inner]

    @property
    def inner_scale(self) -> float:
        return self.rows / max(len(self.inner_index), 1)


def read_base_sample(base: Checkpoint, name: str, rows: int, cols: int, device: torch.device) -> BaseSample:
    """The base's tensor `name` (its first `rows` rows) on its seeded row sample, read row by row."""
    cpu = torch.device("cpu")
    index = sample_rows(rows, cols, cpu, BASE_SAMPLE_VALUES)
    small = sample_rows(rows, cols, cpu)
    inner = None if len(small) >= len(index) else torch.searchsorted(index, small)
    values = base.rows(name, index).to(device)
    width = base.tensors[name].nbytes // max(base.tensors[name].numel, 1)
    return BaseSample(index.to(device), values, rows, len(index) * cols * width,
                      None if inner is None else inner.to(device))


class SampledWeights(_Shaped):
    """An adapter's weights W + t on one tensor, t = scale * B @ A its task vector (a rank-0 one where it
    leaves the tensor alone), with the base W read only on a `BaseSample`: |W|^2 and <W, t> are the sample's
    sums scaled by rows / sampled rows, |t|^2 and <t_a, t_b> exact from the factors, so
    |W + t|^2 = |W|^2 + 2 <W, t> + |t|^2 and <W + t_a, W + t_b> = |W|^2 + <W, t_a> + <W, t_b> + <t_a, t_b>;
    the difference of two adapters' weights is their task vectors' (exact). Its values (the KL histograms)
    are the sampled rows'. It has no SVD: the weights' spectral metrics are not measured."""

    low_rank = True
    has_svd = False

    def __init__(self, sample: BaseSample, task: LowRankOperand) -> None:
        self.sample_base, self.task = sample, task
        self.shape = task.shape
        self.tensor = task.left  # where the device is read
        self.base = None
        self.rank = task.rank
        self.exact_max_elements = task.exact_max_elements
        self.reference_norm = None

    @property
    def cross(self) -> float:
        """<W, t>, estimated from the sampled rows (exact rows of t: scale * B[rows] @ A)."""
        cached = self.__dict__.get("_cross")
        if cached is None:
            task = self.task
            sample = self.sample_base
            projected = sample.inner_values.double() @ task.right.T  # (sampled rows, r)
            value = float((projected * task.left[sample.inner_index]).sum()) if task.left.shape[1] else 0.0
            cached = self.__dict__["_cross"] = sample.inner_scale * value
        return cached

    @property
    def norm(self) -> float:  # type: ignore[override]
        cached = self.__dict__.get("_norm")
        if cached is None:
            total = self.sample_base.energy + 2 * self.cross + self.task.gram
            cached = self.__dict__["_norm"] = math.sqrt(max(total, 0.0))
        return cached

    @property
    def sample(self) -> torch.Tensor:  # type: ignore[override]
        cached = self.__dict__.get("_values")
        if cached is None:
            rows = self.sample_base.inner_values + self.task.rows(self.sample_base.inner_index)
            cached = self.__dict__["_values"] = rows.reshape(-1)
        return cached

    def sampled(self, size: int) -> torch.Tensor:
        return self.sample

    @property
    def value_range(self) -> tuple[float, float]:  # type: ignore[override]
        lo, hi = torch.aminmax(self.sample)
        return float(lo), float(hi)

    @property
    def svd(self) -> SVD:  # type: ignore[override]
        raise NotImplementedError("the weights' SVD needs the base's every row; it is not measured")

    def exact_pair_sums(self, other: Operand, signs: bool) -> PairSums:
        if not isinstance(other, SampledWeights) or other.sample_base is not self.sample_base:
            raise TypeError("sampled weights pair only with another adapter's on the same base sample")
        a, b = self.task, other.task
        between = _low_dot(a, b)
        dot = self.sample_base.energy + self.cross + other.cross + between
        distance = max(a.gram + b.gram - 2 * between, 0.0)
        return PairSums(dot, distance, None)


def low_rank_svd(left: torch.Tensor, right: torch.Tensor, rank: int) -> SVD:
    """The SVD of left @ right from the QR of its factors (exact), padded to the dense SVD's k columns with
    orthonormal directions of singular value 0."""
    m, n = left.shape[0], right.shape[1]
    full_dim = min(m, n)
    k = min(rank, full_dim)
    r = left.shape[1]
    if r:
        qb, rb = _qr(left)
        qa, ra = _qr(right.T)
        u_small, s, vh_small = torch.linalg.svd(rb @ ra.T)
        u, v = qb @ u_small, qa @ vh_small.T
    else:
        u, s, v = left.new_zeros(m, 0), left.new_zeros(0), left.new_zeros(n, 0)
    u, v = _complete(u, k), _complete(v, k)
    s = torch.cat([s, s.new_zeros(max(0, k - s.numel()))])
    total = float((s**2).sum())
    return SVD(u[:, :k].float(), s.float(), v[:, :k].float(), total, full_dim, True)


CHOLESKY_MIN_RATIO = 1e-4  # Cholesky QR while the factor's condition number stays under 1e4 (orthogonality ~1e-8)


def _qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = Q R with orthonormal Q (float64 factors, tall): Cholesky QR (one r x r Gram, a triangular solve;
    several times faster than Householder on tall factors), Householder QR where the factor is ill-conditioned."""
    upper, info = torch.linalg.cholesky_ex(x.T @ x, upper=True)
    diagonal = upper.diagonal().abs()
    if int(info) == 0 and float(diagonal.min()) > CHOLESKY_MIN_RATIO * float(diagonal.max()):
        return torch.linalg.solve_triangular(upper, x, upper=True, left=False), upper
    q, r = torch.linalg.qr(x)
    return q, r


def _complete(basis: torch.Tensor, k: int) -> torch.Tensor:
    """`basis` (orthonormal columns) extended to k orthonormal columns by seeded directions."""
    if basis.shape[1] >= k:
        return basis
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    extra = torch.randn(basis.shape[0], k - basis.shape[1], generator=generator, dtype=basis.dtype)
    q = torch.linalg.qr(torch.cat([basis, extra.to(basis.device)], dim=1)).Q
    return torch.cat([basis, q[:, basis.shape[1]:]], dim=1)


def dense_rows(op: Operand, index: torch.Tensor) -> torch.Tensor:
    """A dense operand's values on rows `index`, float32, (len(index), cols): the values `Operand.values`
    gives there."""
    tensor = op.tensor.reshape(op.tensor.shape[0], -1)
    x = tensor[index].float()
    if op.base is not None:
        x = x - op.base.reshape(op.base.shape[0], -1)[index].float()
    return x


def dense_dot(dense: Operand, low: LowRankOperand) -> float:
    """<dense, left @ right> in one pass over the dense operand by row blocks: sum((D_rows R^T) * L_rows)."""
    cache = low.__dict__.setdefault("_dense_dots", {})
    hit = cache.get(id(dense))
    if hit is not None and hit[0] is dense:
        return float(hit[1])
    m, n = low.shape
    step = max(1, ROW_BLOCK_VALUES // max(n, 1))
    right_t = low.right.T.float()
    total = 0.0
    device = low.left.device
    for start in range(0, m, step):
        index = torch.arange(start, min(m, start + step), device=device)
        projected = dense_rows(dense, index) @ right_t  # (rows, r)
        total += float((projected.double() * low.left[start:start + len(index)]).sum())
    cache[id(dense)] = (dense, total)
    return total


def _parts(op: Operand) -> tuple[Operand | None, LowRankOperand | None]:
    if isinstance(op, LowRankOperand):
        return op.dense, op
    return op, None


def _low_dot(x: LowRankOperand | None, y: LowRankOperand | None) -> float:
    if x is None or y is None:
        return 0.0
    if x is y:
        return x.gram
    return float(((x.left.T @ y.left) * (x.right @ y.right.T)).sum())


def _dense_pair(x: Operand | None, y: Operand | None) -> tuple[float, float]:
    """(<x, y>, |x - y|^2) of the dense parts."""
    if x is None and y is None:
        return 0.0, 0.0
    if x is None or y is None:
        only = x if x is not None else y
        assert only is not None
        return 0.0, only.norm**2
    if x is y:
        return x.norm**2, 0.0
    found = pair_sums(x, y)
    return found.dot, found.distance_sq


def _cross(dense: Operand | None, low: LowRankOperand | None) -> float:
    return 0.0 if dense is None or low is None else dense_dot(dense, low)


def low_rank_pair_sums(a: Operand, b: Operand, signs: bool) -> PairSums:
    """<a, b>, |a - b|^2 and (with `signs`) the sign counts on the row sample, for operands of which at least
    one is low-rank: a - b = (Da - Db) + (La - Lb), every term exact from the factors and one pass of each
    dense part against the factors."""
    da, la = _parts(a)
    db, lb = _parts(b)
    dd, dist_dd = _dense_pair(da, db)
    dot = dd + _cross(da, lb) + _cross(db, la) + _low_dot(la, lb)
    low_sq = _low_dot(la, la) + _low_dot(lb, lb) - 2 * _low_dot(la, lb)
    mixed = 0.0
    if da is not db:
        mixed = _cross(da, la) - _cross(da, lb) - _cross(db, la) + _cross(db, lb)
    distance = max(dist_dd + 2 * mixed + low_sq, 0.0)
    return PairSums(dot, distance, sampled_signs(a, b) if signs else None)


def _rows_of(op: Operand, index: torch.Tensor) -> torch.Tensor:
    return op.rows(index) if isinstance(op, LowRankOperand) else dense_rows(op, index)


def sampled_signs(a: Operand, b: Operand) -> tuple[float, float, float, float]:
    """TIES sign counts (both non-zero, conflicts; the same above both thresholds) on the seeded row sample."""
    rows = a.shape[0] if isinstance(a, LowRankOperand) else a.tensor.shape[0]
    device = (a.left if isinstance(a, LowRankOperand) else a.tensor).device
    index = sample_rows(rows, a.numel // rows, device)
    sums = _Accumulator((a.top_threshold, b.top_threshold))
    sums.add(_rows_of(a, index).reshape(-1), _rows_of(b, index).reshape(-1), distance=False)
    return sums.signs()


def apply_delta(ckpt: Checkpoint, name: str, view: torch.Tensor) -> torch.Tensor:
    """The model's tensor `name` as its weights, from `view` (its stored values, possibly cut to the first
    rows): for a LoRA adapter's adapted tensor, base + scale * B @ A in float32 (a new tensor; the dense
    consumers of the tensor stream need the weights themselves); otherwise `view` itself."""
    found = ckpt.factors(name, view.device) if isinstance(ckpt, AdapterCheckpoint) else None
    if found is None:
        return view
    left, right, _ = found
    return (view.double() + left[: view.shape[0]] @ right).float()


BASE_NOT_READ = (
    "it needs the base's values, of which a comparison of LoRA adapters of one base reads only a seeded sample "
    "of rows; read_base=True (--read-base) reads them all"
)


def adapters_of(models: list[Checkpoint], base: Checkpoint | None) -> bool:
    """Whether every model is a LoRA adapter of `base` (its folder): the comparison can then be measured from
    the factors, and the adapters' own tensors, without reading the base's."""
    if base is None or not models:
        return False
    root = base.root.resolve()
    return all(isinstance(m, AdapterCheckpoint) and m.base_checkpoint.root.resolve() == root for m in models)


def stores(model: Checkpoint, name: str) -> bool:
    """Whether the adapter `model` stores tensor `name` itself (modules_to_save), in place of its base's."""
    return isinstance(model, AdapterCheckpoint) and name in model.saved


def factor_nbytes(model: Checkpoint, name: str) -> int:
    return model.factor_nbytes(name) if isinstance(model, AdapterCheckpoint) else 0


def task_vector(
    ckpt: Checkpoint, name: str, rows: int, cols: int, device: torch.device, options: Any
) -> LowRankOperand:
    """The adapter's task vector on its tensor `name` (rows x cols, the first `rows` rows): scale * B @ A from
    its factors; zero (rank 0) where it has none."""
    found = ckpt.factors(name, device) if isinstance(ckpt, AdapterCheckpoint) else None
    if found is None:
        left = torch.zeros(rows, 0, dtype=torch.float64, device=device)
        right = torch.zeros(0, cols, dtype=torch.float64, device=device)
    else:
        left, right = found[0][:rows], found[1]
    return LowRankOperand(left, right, None, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements)


def lift(
    sources: list[tuple[Any, str]], weights: list[Operand], tasks: list[Operand], base: Operand | None,
    options: Any,
) -> None:
    """Replace, in place, the operands of adapter models by their exact low-rank forms: the task vector
    scale * B @ A (zero where the adapter leaves the tensor alone) and the weights base + that."""
    if base is None or not tasks:
        return
    rows, cols = base.tensor.shape[0], base.numel // max(base.tensor.shape[0], 1)
    for i, (ckpt, name) in enumerate(sources[: len(weights)]):
        if not isinstance(ckpt, AdapterCheckpoint) or name in ckpt.saved:
            continue
        task = tasks[i] = task_vector(ckpt, name, rows, cols, base.tensor.device, options)
        weights[i] = base if name not in ckpt.adapted else LowRankOperand(
            task.left, task.right, base, rank=options.svd_rank, exact_max_elements=options.exact_svd_max_elements
        )

"""Frozen pydantic results. Their JSON is the product's stable output format."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Verdict(str, Enum):
    HIGHLY_COMPATIBLE = "highly_compatible"
    COMPATIBLE = "compatible"
    RISKY = "risky"
    INCOMPATIBLE = "incompatible"


class MergeAdvice(str, Enum):
    """The decision, said once: merge (yes), merge and check the result (with_care), or do not (no)."""

    YES = "yes"
    WITH_CARE = "with_care"
    NO = "no"


class Severity(str, Enum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class FindingLevel(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Finding(Frozen):
    """One thing found before or besides the metrics (architecture, vocab, a config key, ...)."""

    level: FindingLevel
    code: str = Field(description="stable machine-readable kind, e.g. 'vocab_mismatch'")
    message: str
    fix: str | None = None
    path: str | None = Field(default=None, description="where it was found: a YAML path or a tensor name")


class ModelInfo(Frozen):
    label: str = Field(description="the model's short name in results: its folder's name, unique ('base': the base)")
    source: str = Field(description="what the caller gave: a path or a Hub id")
    resolved: str = Field(description="the local folder or file that was read")
    architecture: str | None = None
    n_tensors: int
    n_params: int
    dtypes: dict[str, int] = Field(description="dtype -> number of tensors")
    files: int
    skipped_tensors: list[str] = Field(default_factory=list, description="non-float tensors, not compared")
    nonfinite_values: int = Field(default=0, description="NaN/Inf values found; they were read as 0")
    adapter: AdapterInfo | None = Field(default=None, description="set when this model is a PEFT LoRA adapter")
    moved: float | None = Field(
        default=None, description="|model - base| / |base| over the tensors compared with the base: how far this "
        "model moved from the base (None without a base, and for the base)")
    moved_by_layer: dict[str, float] = Field(
        default_factory=dict, description="layer -> |model - base| / |base| over that layer's tensors")


class AdapterInfo(Frozen):
    """A PEFT LoRA adapter's settings, as its adapter_config.json and factors give them."""

    base: str = Field(description="the base it was opened over: --base, or its base_model_name_or_path")
    ranks: list[int] = Field(description="the distinct ranks of its factors")
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] = Field(description="the short names of the modules it adapts")
    modules_to_save: list[str] = Field(default_factory=list)
    adapted_tensors: int


class LayerMetrics(Frozen):
    """Every metric of one layer for one pair of models, aggregated over the layer's tensors."""

    model_a: str
    model_b: str
    layer_name: str = Field(description="'embed', 'layers.3', 'norm' or 'lm_head'")
    layer_index: int | None
    kind: str = Field(description="'embed', 'block', 'norm', 'lm_head' or 'other'")
    n_params: int
    tensor_names: list[str]
    metrics: dict[str, float] = Field(description="metric name -> value; see mergelens_mcp.analysis.metrics")
    components: dict[str, float] = Field(description="MCI component name -> 0..1 score (1 = good for merging)")
    score: float = Field(description="this layer's compatibility, 0-100")
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="metric name -> why it could not be computed on some of this layer's tensors (absent from "
        "`metrics` where it failed on all of them; never read as a number)",
    )

    def _get(self, name: str) -> float | None:
        return self.metrics.get(name)

    @property
    def cosine_similarity(self) -> float | None:
        return self._get("cosine_similarity")

    @property
    def l2_distance(self) -> float | None:
        return self._get("l2_distance")

    @property
    def kl_divergence(self) -> float | None:
        return self._get("kl_divergence")

    @property
    def spectral_overlap(self) -> float | None:
        return self._get("spectral_overlap")

    @property
    def effective_rank_ratio(self) -> float | None:
        return self._get("effective_rank_ratio")

    @property
    def task_cosine(self) -> float | None:
        return self._get("task_cosine")

    @property
    def sign_disagreement(self) -> float | None:
        return self._get("sign_disagreement")

    @property
    def tsv_interference(self) -> float | None:
        return self._get("tsv_interference")

    @property
    def task_vector_energy(self) -> float | None:
        return self._get("task_vector_energy")

    @property
    def magnitude_ratio(self) -> float | None:
        return self._get("magnitude_ratio")


class ConflictZone(Frozen):
    model_a: str
    model_b: str
    start_layer: int = Field(description="first layer index of the zone (-1: the embeddings; the block count: "
                             "the final norm and lm_head)")
    end_layer: int = Field(description="last layer index, inclusive")
    layer_names: list[str]
    severity: Severity
    score: float = Field(description="lowest layer score in the zone, 0-100")
    driving_metrics: list[str] = Field(description="MCI components that pulled the zone down, worst first")
    recommendation: str


class MetricReading(Frozen):
    """One number of one layer, in words: what it measures and whether its value helps a merge."""

    name: str
    value: float
    meaning: str | None = Field(default=None, description="what the metric measures (left out when said once)")
    component: str | None = Field(default=None, description="the MCI component it feeds, if any")
    component_score: float | None = Field(default=None, description="that component, 0..1 (1 = good)")
    assessment: str = Field(description="'good', 'acceptable', 'risky', 'bad' or 'informational'")
    why: str | None = Field(default=None, description="why the value helps or hurts a merge")


class LayerExplanation(Frozen):
    """One layer of one pair of models explained: each metric, the verdict on the layer and what to do."""

    model_a: str
    model_b: str
    layer_name: str
    layer_index: int | None
    kind: str
    n_params: int
    score: float = Field(description="this layer's compatibility, 0-100")
    verdict: Verdict
    summary: str
    readings: list[MetricReading]
    advice: list[str] = Field(description="what to do about this layer's weakest components, worst first")
    prediction: str | None = Field(
        default=None, description="what pushed the whole pair's predicted retention (the MCI's method) up or down: "
        "the MCI is a prediction for the whole merge, this layer's score the weight-space composite")


class PairScore(Frozen):
    model_a: str
    model_b: str
    score: float | None
    verdict: Verdict
    task_cosine: float | None = Field(
        default=None, description="cosine of the two task vectors (model - base) over every tensor compared with "
        "the base (None without a base)")


class MCI(Frozen):
    """Merge Compatibility Index: 0-100, higher is safer to merge."""

    score: float | None = Field(description="None when the models cannot be compared at all")
    verdict: Verdict
    confidence: str = Field(description="'high', 'medium' or 'low', with the reasons in `reasons`")
    components: dict[str, float] = Field(description="mean 0..1 score of each MCI component over layers")
    used_base: bool
    used_activations: bool = False
    reasons: list[str]
    method: str | None = Field(
        default=None, description="the merge method whose predicted retention x 100 the score is (the recommended "
        "one, or the best predicted where no strategy is given; capped at `composite` for a pair outside the fitted "
        "range); None: the score is the weight-space composite "
        "(three or more models, no predictions, or a recommendation to keep one model)")
    composite: float | None = Field(
        default=None, description="the hand-weighted weight-space composite, 0-100 (the per-layer scores and "
        "conflict zones use it; the score where `method` is None)")


class Coverage(Frozen):
    tensors_compared: int
    tensors_total: int
    params_compared: int
    matrix_params: int = Field(description="parameters in 2-D tensors (the spectral metrics' domain)")
    spectral_params: int = Field(description="2-D parameters the spectral metrics covered")
    exact_svd_tensors: int
    randomized_svd_tensors: int
    svd_rank: int = Field(description="top-k singular directions used by the spectral metrics")
    svd_oversample: int = Field(default=16, description="extra sketch columns of the randomized SVD")
    svd_power_iterations: int = Field(default=1, description="subspace iterations of the randomized SVD")
    exact_svd_max_elements: int = Field(
        default=512 * 512, description="matrices up to this many elements get an exact SVD, larger ones a randomized"
    )
    low_rank_tensors: int = Field(
        default=0, description="tensors measured from LoRA factors (exact algebra; element-wise on sampled rows)"
    )
    base_read: bool = Field(
        default=False, description="whether the base's tensors were read whole (a comparison of LoRA adapters "
        "of one base reads them whole only with read_base, else a seeded sample of their rows: base_sample_rows)"
    )
    not_measured: list[str] = Field(
        default_factory=list, description="metrics left out because the base's tensors were not read (each "
        "layer's `unavailable` says where); read_base measures them"
    )
    base_sampled: list[str] = Field(
        default_factory=list, description="metrics estimated from a seeded sample of the base's rows (LoRA "
        "adapters of one base compared without read_base); read_base measures them exactly"
    )
    base_sample_rows: int = Field(default=0, description="rows of the base's tensors read for those estimates")
    base_rows: int = Field(default=0, description="rows of the base's tensors they were sampled from")
    base_bytes_read: int = Field(default=0, description="stored bytes of the base read for those estimates")
    base_bytes_share: float = Field(
        default=0.0, description="share of the stored bytes of the base's compared tensors that were read"
    )


class MergeMethod(str, Enum):
    LINEAR = "linear"
    SLERP = "slerp"
    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"
    DARE_TIES = "dare_ties"
    DARE_LINEAR = "dare_linear"
    DELLA = "della"
    BREADCRUMBS = "breadcrumbs"
    BREADCRUMBS_TIES = "breadcrumbs_ties"
    MODEL_STOCK = "model_stock"
    PASSTHROUGH = "passthrough"


class Strategy(Frozen):
    method: MergeMethod
    confidence: float = Field(ge=0.0, le=1.0)
    rationale: list[str]
    runner_up: MergeMethod | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    mergekit_yaml: str
    peft_snippet: str | None = Field(
        default=None, description="for LoRA adapters: PEFT code merging them with add_weighted_adapter"
    )


class MethodPrediction(Frozen):
    """The expected outcome of merging with one method, from mergelens_mcp.analysis.predict."""

    retention: float = Field(ge=0.0, le=1.0, description="expected merged accuracy / each input's own, averaged")
    low: float = Field(ge=0.0, le=1.0, description="lower end of the 80% interval")
    high: float = Field(ge=0.0, le=1.0, description="upper end of the 80% interval")
    used_base: bool = Field(description="task-vector evidence (with a base) or weight-space evidence alone")
    contributions: dict[str, float] = Field(
        default_factory=dict, description="feature -> its push on the retention against the fit's average pair"
    )


class CompareResult(Frozen):
    """Everything `compare_models` found. For N models, layer metrics and zones cover every pair."""

    version: str
    models: list[ModelInfo]
    base: ModelInfo | None
    device: str
    mci: MCI
    pairwise: list[PairScore]
    layer_metrics: list[LayerMetrics]
    conflict_zones: list[ConflictZone]
    findings: list[Finding]
    coverage: Coverage
    notes: list[str] = Field(default_factory=list)
    strategy: Strategy | None = None
    elapsed_s: float
    merge_advised: MergeAdvice | None = Field(
        default=None, description="the decision: yes, with_care or no (from the verdict, findings and strategy)"
    )
    answer: str | None = Field(default=None, description="the decision in one sentence, to quote")
    names: dict[str, str] = Field(
        default_factory=dict, description="each model's short name (its folder's name; 'base') -> what the caller gave"
    )
    predictions: dict[str, MethodPrediction] = Field(
        default_factory=dict, description="merge method -> predicted retention with its interval (two models)"
    )

    def drafted(self, **updates: Any) -> CompareResult:
        """This result with `updates`, unvalidated: one step of completing a result that is validated once,
        when it is built (the engine's draft, completed by the strategy, the decision and the predictions)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_construct(**{**fields, **updates})


class LayerInterference(Frozen):
    """What a configured merge does to one layer, simulated on the real tensors without writing a model."""

    layer_name: str = Field(description="'embed', 'layers.3', 'norm', 'lm_head' or 'other'")
    layer_index: int | None
    n_params: int
    interference: float = Field(
        description="0..1 share of the inputs' weighted change that the merge discards or cancels here: "
        "sign-election losses for TIES-like methods, cancellation for the others"
    )
    sign_conflict: float | None = Field(
        default=None, description="share of the kept task-vector mass whose sign loses the election"
    )
    survival: dict[str, float] = Field(
        default_factory=dict,
        description="model -> share of its task vector's |.| mass kept by trimming or dropping",
    )
    slerp_linear_share: float | None = Field(
        default=None, description="SLERP: share of the layer's parameters in tensors where mergekit falls back "
                                  "to linear interpolation (it decides per whole tensor)"
    )


class LayerScore(str):
    """One layer's interference, as met when iterating `ConfigDiagnosis.interference_scores`: the entry has
    `.layer_name` and `.score`, and is itself the layer's name (a `str`), so code that iterates the names
    (`scores[name]`, `list(scores) == ["embed", ...]`) keeps working."""

    score: float

    def __new__(cls, layer_name: str, score: float) -> LayerScore:
        entry = super().__new__(cls, layer_name)
        entry.score = score
        return entry

    @property
    def layer_name(self) -> str:
        return str(self)

    def __getnewargs__(self) -> tuple[str, float]:  # type: ignore[override]
        return str(self), self.score


class InterferenceScores(dict[str, float]):
    """layer name -> interference (0..1): a dict in every way (indexing, `.items()`, `len`, `in`, JSON: a plain
    object), except that iterating it yields `LayerScore` entries, so both
    `for s in scores: print(s.layer_name, s.score)` and `for name in scores: scores[name]` work."""

    def __iter__(self) -> Iterator[LayerScore]:  # type: ignore[override]
        return (LayerScore(name, score) for name, score in dict.items(self))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # validated and serialized as dict[str, float] (the same JSON and JSON schema), then wrapped
        return core_schema.no_info_after_validator_function(cls, handler(dict[str, float]))


class ConfigDiagnosis(Frozen):
    """A mergekit YAML checked before merging, and its merge simulated where the models can be read."""

    valid: bool = Field(
        description="no error-level finding (mergekit runs some erroneous configs anyway, doing something "
        "else than intended: a reversed layer_range, a density of 1.5)"
    )
    merge_method: str | None
    findings: list[Finding]
    overall_interference: float | None = Field(
        description="parameter-weighted mean of the layers' interference; None when not simulated"
    )
    interference_scores: InterferenceScores = Field(
        default_factory=InterferenceScores, description="layer name -> interference, 0..1"
    )
    layers: list[LayerInterference] = Field(default_factory=list)
    models_checked: list[str] = Field(default_factory=list, description="model references that were read")
    notes: list[str] = Field(default_factory=list)


# ---- preview and verify (probe.py): merged weights measured on probe inputs ---------------------------------


class SourceRetention(Frozen):
    """How much of one source's behaviour a merged model keeps on the probe inputs that test that source."""

    source: str = Field(description="the source's name, as compare names it (its folder name)")
    probes: int = Field(description="probe records judged for this source")
    retention: float = Field(description="0..1: exp(-KL) for a language model, the sentence-embedding cosine "
                                         "for an encoder; 1 = the source's behaviour kept")
    kl: float | None = Field(default=None, description="mean next-token KL(source || merged), nats")
    agreement: float | None = Field(default=None, description="share of positions with the same greedy token")
    perplexity: float | None = Field(default=None, description="the merged model's perplexity on these probes")
    source_perplexity: float | None = Field(default=None, description="the source's own perplexity on them")
    best_source_perplexity: float | None = Field(
        default=None, description="the lowest perplexity any source has on these probes")
    hidden_similarity: float | None = Field(default=None, description="encoder: mean per-token cosine of the "
                                                                      "last hidden states")
    embedding_similarity: float | None = Field(default=None, description="encoder: mean cosine of the "
                                                                         "mean-pooled sentence embeddings")


class MethodPreview(Frozen):
    """One candidate merge, merged in memory and run on the probes."""

    method: str
    rank: int = Field(description="1 = the highest overall retention")
    retention: float = Field(description="mean of the sources' retention")
    sources: list[SourceRetention]
    mergekit_yaml: str = Field(description="the merge that was previewed")


class PreviewResult(Frozen):
    """Candidate merges measured on probe inputs before any merge is written."""

    models: list[str]
    base: str | None
    kind: str = Field(description="'causal_lm' (next-token measures) or 'encoder' (similarity measures)")
    probes: int
    probe_set: str = Field(description="'shipped' or the probe file's name")
    methods: list[MethodPreview] = Field(description="ranked, best first")
    best: str
    notes: list[str] = Field(default_factory=list)
    elapsed_s: float


class LayerMatch(Frozen):
    """One layer of a merged model explained by the sources' (task) vectors, least squares over its tensors."""

    layer_name: str
    coefficients: dict[str, float] = Field(description="source -> coefficient of its task vector (of its "
                                                       "weights without a base) in merged - base")
    residual: float = Field(description="0..1 share of |merged - base|^2 the sources do not explain")
    matches: str = Field(description="'all', 'base', 'none' or the one source the layer matches")
    config_error: float | None = Field(
        default=None, description="with a config: |merged - re-merged| / |re-merged - base| (L2 over the layer); "
        "for a random method re-merged with other masks, how far |merged - base| is from |re-merged - base|")
    config_matches: bool | None = Field(
        default=None, description="with a config: whether the layer is what it gives (within 10%; a random method "
        "re-merged with other masks: its change's norm within 10% + 2/sqrt(values) of the re-merge's)")


class VerifyResult(Frozen):
    """A written merge checked against its sources, its config and, with transformers, on probe inputs."""

    merged: str
    sources: list[str]
    base: str | None
    verdict: str = Field(description="'ok', 'warning' or 'failed'")
    reasons: list[str]
    next_steps: list[str]
    findings: list[Finding]
    layers: list[LayerMatch]
    behaviour: list[SourceRetention] = Field(default_factory=list,
                                             description="the merged model against each source, on the probes")
    notes: list[str] = Field(default_factory=list)
    elapsed_s: float


# ---- zoo (issue 16): N models read once into sketches -------------------------------------------------------


class ZooModel(Frozen):
    label: str = Field(description="the model's name in the zoo (its folder name)")
    source: str
    n_params: int
    sketch_bytes: int = Field(description="the sketch's size; the model's stored bytes are in `nbytes`")
    nbytes: int
    cached: bool = Field(description="the sketch came from the cache: the model was not read")


class ZooPair(Frozen):
    """One pair, estimated from the sketches: every number comes with its bound (the true value lies within
    value +- bound, at about 4 standard errors of the estimate)."""

    model_a: str
    model_b: str
    mci: float = Field(description="the weight-space composite MCI estimated from the sketches (not the predicted "
                       "retention compare_models reports as the MCI of two models)")
    mci_low: float
    mci_high: float
    verdict: Verdict
    cosine: float = Field(description="weight cosine, averaged over tensors by size")
    cosine_bound: float
    task_cosine: float | None = Field(default=None, description="task-vector cosine (with a base)")
    task_cosine_bound: float | None = None
    sign_disagreement: float | None = None
    sign_disagreement_bound: float | None = None
    near_duplicate: bool = Field(description="the two models are (almost) the same fine-tune")
    exact_mci: float | None = Field(default=None, description="the weight-space composite MCI computed exactly "
                                    "(--exact-top; compare's `mci.composite`)")


class ZooSet(Frozen):
    models: list[str]
    mci: float = Field(description="the weakest pair's MCI: a merge of all is as risky as its weakest pair")
    mci_low: float
    mean_mci: float
    verdict: Verdict


class ZooResult(Frozen):
    """Which of these models to merge: pairs, groups and the best sets, from one read of each model."""

    version: str
    models: list[ZooModel]
    base: str | None
    target: str | None = None
    pairs: list[ZooPair] = Field(description="every pair, best MCI first")
    best_sets: list[ZooSet] = Field(description="the best sets of 2..set_size models, best first")
    clusters: list[list[str]] = Field(description="groups whose members all pair at 'compatible' or better")
    near_duplicates: list[list[str]] = Field(description="groups of (almost) identical fine-tunes")
    conflicts: list[list[str]] = Field(description="pairs that are risky or incompatible to merge")
    strategy: Strategy | None = Field(default=None, description="the top choice's merge, computed exactly")
    notes: list[str] = Field(default_factory=list)
    backend: str = Field(description="'local' (this machine's process pool) or 'ray'")
    elapsed_s: float

"""preview_merge and verify_merge: merged weights measured on probe inputs (`probe.py`), before and after a
merge. Read-only: nothing is written; candidate merges live in memory only."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from .. import probe, service
from ..analysis.types import Cancelled, Progress
from ..models import Finding, LayerMatch, PreviewResult, SourceRetention, VerifyResult
from ..security.redact import redact_model
from .params import READ_ONLY, BaseModelPath, Detail, Models, RandomSeed
from .runtime import AppContext, guard_for, run_in_worker, state_of
from .views import View

ProbeFile = Annotated[
    str | None,
    Field(description="a probe file under the allowed folders: text lines, or JSONL records {\"text\": ...} or "
                      "{\"prompt\": ..., \"completion\": ...} with an optional \"source\" naming the model the "
                      "record tests (its name, e.g. its folder name, or its path); default: the shipped probes"),
]


class CandidateBrief(View):
    method: str
    rank: int
    retention: float = Field(description="0..1, mean over the sources; 1 = every source's behaviour kept")
    per_source: dict[str, float] = Field(description="source -> retention on the probes that test it")


class Preview(View):
    """Candidate merges measured on probe inputs, best first."""

    best: str = Field(description="the method whose merge keeps the most of every source's behaviour")
    kind: str = Field(description="'causal_lm': next-token KL, greedy agreement, perplexity; 'encoder': "
                                  "hidden-state and sentence-embedding similarity")
    probes: int
    probe_set: str
    ranking: list[CandidateBrief]
    best_mergekit_yaml: str
    notes: list[str]
    detail: PreviewResult | None = Field(default=None, description="every measure of every candidate "
                                                                   "(detail=true only)")


class Verification(View):
    """A written merge checked: ok, warning or failed, why, and what to try next."""

    verdict: str = Field(description="'ok', 'warning' or 'failed'")
    reasons: list[str]
    next_steps: list[str]
    findings: list[Finding] = Field(description="warnings and errors (NaN/Inf, shapes, config mismatches)")
    flagged_layers: list[LayerMatch] = Field(
        description="layers that match one source only, none, the base, or not the config")
    behaviour: list[SourceRetention] = Field(description="the merged model against each source on the probes")
    notes: list[str]
    detail: VerifyResult | None = Field(default=None, description="every layer and finding (detail=true only)")


def preview_view(result: PreviewResult, detail: bool) -> Preview:
    ranking = [CandidateBrief(method=m.method, rank=m.rank, retention=m.retention,
                              per_source={s.source: s.retention for s in m.sources}) for m in result.methods]
    return Preview(best=result.best, kind=result.kind, probes=result.probes, probe_set=result.probe_set,
                   ranking=ranking, best_mergekit_yaml=result.methods[0].mergekit_yaml if result.methods else "",
                   notes=result.notes, detail=result if detail else None)


def verify_view(result: VerifyResult, detail: bool) -> Verification:
    flagged = [lm for lm in result.layers if lm.matches != "all" or lm.config_matches is False]
    return Verification(
        verdict=result.verdict, reasons=result.reasons, next_steps=result.next_steps,
        findings=[f for f in result.findings if f.level.value != "info"], flagged_layers=flagged,
        behaviour=result.behaviour, notes=result.notes, detail=result if detail else None,
    )


async def preview_merge(
    models: Models,
    ctx: AppContext,
    base_model: BaseModelPath = None,
    methods: Annotated[list[str] | None, Field(
        description="merge methods to preview (linear, slerp, ties, dare_ties, task_arithmetic, ...); default: "
                    "the recommended method, its runner-up and linear")] = None,
    configs: Annotated[list[str] | None, Field(
        description="candidate mergekit configs of these models (paths under the allowed folders, or the YAML "
                    "text), previewed as written; with configs only, the weights are not compared first")] = None,
    probe_file: ProbeFile = None,
    random_seed: RandomSeed = 0,
    detail: Detail = False,
) -> Preview:
    state = state_of(ctx)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> PreviewResult:
        return state.isolated(probe.preview_merge, models, base_model, methods=methods, configs=configs,
                              probe=probe_file, settings=state.settings, guard=guard, progress=progress,
                              cancelled=cancelled, random_seed=random_seed,
                              about=service.labelled(models, base_model))

    return preview_view(redact_model(await run_in_worker(ctx, job)), detail)


async def verify_merge(
    merged_model: Annotated[str, Field(description="the merged model (folder, .safetensors file or Hub id)")],
    sources: Annotated[list[str], Field(min_length=1, description="the models that were merged, in the "
                                                                  "config's order")],
    ctx: AppContext,
    base_model: BaseModelPath = None,
    config: Annotated[str | None, Field(description="the mergekit YAML the merge was made with (a path or the "
                                                    "text): every tensor is merged again and compared")] = None,
    probe_file: ProbeFile = None,
    random_seed: RandomSeed = 0,
    detail: Detail = False,
) -> Verification:
    state = state_of(ctx)
    guard = await guard_for(ctx)

    def job(progress: Progress, cancelled: Cancelled) -> VerifyResult:
        return state.isolated(probe.verify_merge, merged_model, sources, base_model, config=config,
                              probe=probe_file, settings=state.settings, guard=guard, progress=progress,
                              cancelled=cancelled, random_seed=random_seed,
                              about=service.labelled([merged_model, *sources], base_model))

    return verify_view(redact_model(await run_in_worker(ctx, job)), detail)


def register(server: MCPServer) -> None:
    server.add_tool(
        preview_merge, title="Preview candidate merges on probe inputs",
        annotations=READ_ONLY,
        description=(
            "Before merging: merge each candidate method in memory (nothing is written), run it on probe "
            "inputs and compare it with every source on the same inputs (next-token KL, greedy-token "
            "agreement and perplexity for language models; embedding similarity for encoders). Returns the "
            "methods ranked by how much of each source's behaviour they keep, with the best one's mergekit "
            "YAML. Give a probe file with the user's own prompts when there is one. Slower than the weight "
            "analyses: it runs every model once (needs transformers)."
        ),
    )
    server.add_tool(
        verify_merge, title="Verify a merged model",
        annotations=READ_ONLY,
        description=(
            "After merging: check the merged model against its sources. Per layer, how much of each source's "
            "task vector it holds and what the sources do not explain (a layer swapped in from another model), "
            "NaN/Inf, shape and vocabulary changes; with the mergekit config, whether every tensor is what the "
            "config gives (wrong model, base, weights or slices, layer named); then, where transformers can run "
            "it, perplexity against each source on probes (more than 10% above the best source: warning; "
            "more than 2x: failed). Verdict ok / warning / failed with what to try next."
        ),
    )

"""Tensor names -> (layer, component), declaratively, for the common transformer naming schemes.

Covers Llama, Mistral, Qwen2, Gemma, Phi-3 (`model.layers.N.`), GPT-2 (`transformer.h.N.`),
GPT-NeoX (`gpt_neox.layers.N.`) and BERT (`encoder.layer.N.`), with a generic `.N.` fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
ANY_INDEX = re.compile(r"\.(\d+)\.")
EMBEDDINGS_NORM = re.compile(r"(^|\.)embeddings\.")

# First match wins; patterns are searched in the tensor name.
COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("lm_head", r"(^|\.)(lm_head|embed_out)\."),
        ("embed", r"(embed_tokens|wte|wpe|embed_in|word_embeddings|position_embeddings|token_type_embeddings)\."),
        ("norm", r"(norm|ln_\w*|layernorm|LayerNorm)\b"),
        ("attn_qkv", r"(qkv_proj|c_attn|query_key_value)\."),
        ("attn_q", r"(q_proj|\.query)\."),
        ("attn_k", r"(k_proj|\.key)\."),
        ("attn_v", r"(v_proj|\.value)\."),
        ("attn_o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|attention\.output\.dense)\."),
        ("mlp_gate_up", r"gate_up_proj\."),
        ("mlp_gate", r"(gate_proj|\.w1)\."),
        ("mlp_up", r"(up_proj|c_fc|dense_h_to_4h|intermediate\.dense|\.w3)\."),
        ("mlp_down", r"(down_proj|mlp\.c_proj|dense_4h_to_h|\.output\.dense|\.w2)\."),
    )
)

GROUP_ORDER = {"embed": 0, "block": 1, "norm": 2, "lm_head": 3, "other": 4}


@dataclass(frozen=True)
class TensorRole:
    layer_name: str  # 'embed', 'layers.3', 'norm', 'lm_head' or 'other'
    layer_index: int | None
    kind: str  # group kind: 'embed', 'block', 'norm', 'lm_head', 'other'
    component: str  # 'attn_q', 'mlp_down', 'norm', 'embed', ... or 'other'


def classify(name: str) -> TensorRole:
    """Where a tensor sits in the model."""
    component = next((kind for kind, pattern in COMPONENTS if pattern.search(name)), "other")
    match = BLOCK_INDEX.search(name) or ANY_INDEX.search(name)
    if match and component not in ("embed", "lm_head"):
        index = int(match.group(1))
        return TensorRole(f"layers.{index}", index, "block", component)
    if component == "norm" and EMBEDDINGS_NORM.search(name):  # BERT's embeddings.LayerNorm sits before block 0
        return TensorRole("embed", None, "embed", "norm")
    if component in ("embed", "lm_head", "norm"):
        return TensorRole(component, None, component, component)
    return TensorRole("other", None, "other", component)


def group_sort_key(role: TensorRole) -> tuple[int, int]:
    return GROUP_ORDER[role.kind], role.layer_index if role.layer_index is not None else 0


def position(role: TensorRole, n_blocks: int) -> int:
    """A layer's place on the depth axis: embeddings -1, blocks 0..N-1, final norm / head N, other N+1."""
    if role.kind == "block":
        assert role.layer_index is not None
        return role.layer_index
    return {"embed": -1, "norm": n_blocks, "lm_head": n_blocks, "other": n_blocks + 1}[role.kind]

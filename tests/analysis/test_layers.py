"""Tensor names -> (layer, component) for each naming scheme we claim, and the generic fallback."""

from __future__ import annotations

import pytest

from mergelens_mcp.analysis.layers import TensorRole, classify, position

LLAMA_LIKE = {  # Llama, Mistral, Qwen2 (with biases), Gemma and Phi-3 share the model.layers.N. scheme
    "model.embed_tokens.weight": ("embed", None, "embed"),
    "model.layers.0.self_attn.q_proj.weight": ("layers.0", 0, "attn_q"),
    "model.layers.0.self_attn.k_proj.weight": ("layers.0", 0, "attn_k"),
    "model.layers.3.self_attn.v_proj.weight": ("layers.3", 3, "attn_v"),
    "model.layers.3.self_attn.o_proj.weight": ("layers.3", 3, "attn_o"),
    "model.layers.11.mlp.gate_proj.weight": ("layers.11", 11, "mlp_gate"),
    "model.layers.11.mlp.up_proj.weight": ("layers.11", 11, "mlp_up"),
    "model.layers.11.mlp.down_proj.weight": ("layers.11", 11, "mlp_down"),
    "model.layers.2.input_layernorm.weight": ("layers.2", 2, "norm"),
    "model.layers.2.post_attention_layernorm.weight": ("layers.2", 2, "norm"),
    "model.norm.weight": ("norm", None, "norm"),
    "lm_head.weight": ("lm_head", None, "lm_head"),
}
QWEN2 = {
    "model.layers.5.self_attn.q_proj.bias": ("layers.5", 5, "attn_q"),
    "model.layers.5.self_attn.k_proj.bias": ("layers.5", 5, "attn_k"),
    "model.layers.5.self_attn.v_proj.bias": ("layers.5", 5, "attn_v"),
}
GEMMA = {
    "model.layers.1.pre_feedforward_layernorm.weight": ("layers.1", 1, "norm"),
    "model.layers.1.post_feedforward_layernorm.weight": ("layers.1", 1, "norm"),
}
PHI3 = {
    "model.layers.7.self_attn.qkv_proj.weight": ("layers.7", 7, "attn_qkv"),
    "model.layers.7.self_attn.o_proj.weight": ("layers.7", 7, "attn_o"),
    "model.layers.7.mlp.gate_up_proj.weight": ("layers.7", 7, "mlp_gate_up"),
    "model.layers.7.mlp.down_proj.weight": ("layers.7", 7, "mlp_down"),
}
MIXTRAL = {
    "model.layers.4.block_sparse_moe.experts.6.w1.weight": ("layers.4", 4, "mlp_gate"),
    "model.layers.4.block_sparse_moe.experts.6.w2.weight": ("layers.4", 4, "mlp_down"),
    "model.layers.4.block_sparse_moe.experts.6.w3.weight": ("layers.4", 4, "mlp_up"),
}
GPT2 = {
    "transformer.wte.weight": ("embed", None, "embed"),
    "transformer.wpe.weight": ("embed", None, "embed"),
    "transformer.h.0.ln_1.weight": ("layers.0", 0, "norm"),
    "transformer.h.0.attn.c_attn.weight": ("layers.0", 0, "attn_qkv"),
    "transformer.h.0.attn.c_proj.weight": ("layers.0", 0, "attn_o"),
    "transformer.h.9.ln_2.bias": ("layers.9", 9, "norm"),
    "transformer.h.9.mlp.c_fc.weight": ("layers.9", 9, "mlp_up"),
    "transformer.h.9.mlp.c_proj.weight": ("layers.9", 9, "mlp_down"),
    "transformer.ln_f.weight": ("norm", None, "norm"),
    "h.3.attn.c_attn.weight": ("layers.3", 3, "attn_qkv"),  # original GPT-2 files drop the prefix
}
GPT_NEOX = {
    "gpt_neox.embed_in.weight": ("embed", None, "embed"),
    "gpt_neox.layers.2.input_layernorm.weight": ("layers.2", 2, "norm"),
    "gpt_neox.layers.2.attention.query_key_value.weight": ("layers.2", 2, "attn_qkv"),
    "gpt_neox.layers.2.attention.dense.weight": ("layers.2", 2, "attn_o"),
    "gpt_neox.layers.2.mlp.dense_h_to_4h.weight": ("layers.2", 2, "mlp_up"),
    "gpt_neox.layers.2.mlp.dense_4h_to_h.weight": ("layers.2", 2, "mlp_down"),
    "gpt_neox.final_layer_norm.weight": ("norm", None, "norm"),
    "embed_out.weight": ("lm_head", None, "lm_head"),
}
BERT = {
    "bert.embeddings.word_embeddings.weight": ("embed", None, "embed"),
    "bert.embeddings.position_embeddings.weight": ("embed", None, "embed"),
    "bert.embeddings.token_type_embeddings.weight": ("embed", None, "embed"),
    "bert.embeddings.LayerNorm.weight": ("embed", None, "norm"),  # the embeddings' norm, not the final one
    "bert.encoder.layer.1.attention.self.query.weight": ("layers.1", 1, "attn_q"),
    "bert.encoder.layer.1.attention.self.key.weight": ("layers.1", 1, "attn_k"),
    "bert.encoder.layer.1.attention.self.value.weight": ("layers.1", 1, "attn_v"),
    "bert.encoder.layer.1.attention.output.dense.weight": ("layers.1", 1, "attn_o"),
    "bert.encoder.layer.1.attention.output.LayerNorm.weight": ("layers.1", 1, "norm"),
    "bert.encoder.layer.1.intermediate.dense.weight": ("layers.1", 1, "mlp_up"),
    "bert.encoder.layer.1.output.dense.weight": ("layers.1", 1, "mlp_down"),
    "bert.encoder.layer.1.output.LayerNorm.bias": ("layers.1", 1, "norm"),
}
GENERIC = {
    "encoder.stages.3.conv.weight": ("layers.3", 3, "other"),
    "backbone.blocks.12.mixer.in_proj.weight": ("layers.12", 12, "other"),
    "decoder.block.2.layer.0.SelfAttention.q.weight": ("layers.2", 2, "other"),
    "rotary.inv_freq": ("other", None, "other"),
}
SCHEMES = {
    "llama/mistral": LLAMA_LIKE, "qwen2": QWEN2, "gemma": GEMMA, "phi3": PHI3, "mixtral": MIXTRAL,
    "gpt2": GPT2, "gpt_neox": GPT_NEOX, "bert": BERT, "generic": GENERIC,
}
CASES = [(scheme, name, expected) for scheme, table in SCHEMES.items() for name, expected in table.items()]


@pytest.mark.parametrize(("scheme", "name", "expected"), CASES, ids=[f"{s}:{n}" for s, n, _ in CASES])
def test_tensor_names_map_to_their_layer_and_component(
    scheme: str, name: str, expected: tuple[str, int | None, str]
) -> None:
    role = classify(name)
    assert (role.layer_name, role.layer_index, role.component) == expected


def test_block_tensors_group_as_blocks_and_the_rest_by_their_kind() -> None:
    assert classify("model.layers.0.mlp.up_proj.weight").kind == "block"
    assert classify("model.layers.0.input_layernorm.weight").kind == "block"
    assert classify("model.embed_tokens.weight").kind == "embed"
    assert classify("model.norm.weight").kind == "norm"
    assert classify("lm_head.weight").kind == "lm_head"
    assert classify("rotary.inv_freq").kind == "other"


def test_positions_put_embeddings_first_blocks_in_order_and_the_head_last() -> None:
    names = ["lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight",
             "model.norm.weight", "model.layers.0.mlp.up_proj.weight", "rotary.inv_freq"]
    assert [position(classify(n), n_blocks=2) for n in names] == [2, 1, -1, 2, 0, 3]


def test_roles_are_frozen_values() -> None:
    role = classify("model.layers.0.self_attn.q_proj.weight")
    assert role == TensorRole("layers.0", 0, "block", "attn_q")
    with pytest.raises(AttributeError):
        role.layer_index = 1  # type: ignore[misc]

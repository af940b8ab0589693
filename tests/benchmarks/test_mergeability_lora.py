"""The benchmark's LoRA fine-tunes: real PEFT files that peft, transformers and the product read as adapters."""

import json

import pytest
import torch
from safetensors import safe_open

from benchmarks.mergeability.lora import TARGETS, LoRALinear, add_lora, load_adapter, merged_state, save_adapter
from benchmarks.mergeability.model import TinyConfig, TinyLlama, build_model, load_state, save_checkpoint
from benchmarks.mergeability.tasks import VOCAB_SIZE, make_test_set
from benchmarks.mergeability.train import finetune_lora

RANK, ALPHA = 4, 8.0


def seeded_base(seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(TinyConfig(vocab_size=VOCAB_SIZE)).eval()


def trained_looking(base: TinyLlama, seed: int) -> TinyLlama:
    """add_lora's model with B filled from a seed (B starts at zero, which would make every check trivial)."""
    model = add_lora(base, RANK, ALPHA, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = seeded_base()
    base_folder = save_checkpoint(base, tmp / "base")
    models = {name: trained_looking(base, seed) for name, seed in (("ad1", 1), ("ad2", 2))}
    folders = {name: save_adapter(m, tmp / name, base_folder, RANK, ALPHA) for name, m in models.items()}
    return base, base_folder, models, folders


def tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (2, 11), generator=torch.Generator().manual_seed(seed))


def test_the_adapter_file_has_peft_key_names_and_a_config_naming_its_base(saved):
    _, base_folder, _, folders = saved
    with safe_open(str(folders["ad1"] / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").get_shape() == [RANK, 172]
        assert f.get_slice("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").get_shape() == [64, RANK]
    assert len(keys) == 2 * 2 * len(TARGETS)  # 2 layers, 7 modules, A and B
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    config = json.loads((folders["ad1"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert config["target_modules"] == sorted(TARGETS)
    assert config["base_model_name_or_path"] == str(base_folder.resolve())


def test_peft_loads_the_adapter_into_transformers_llama_with_the_training_models_logits(saved):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, base_folder, models, folders = saved
    hf = LlamaForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(tokens()).logits, base(tokens()), atol=1e-5)  # the base itself first
        peft_model = PeftModel.from_pretrained(hf, str(folders["ad1"])).eval()
        theirs, ours = peft_model(tokens()).logits, models["ad1"](tokens())
    assert (ours - base(tokens())).abs().max() > 0.1  # the adapter changes the outputs
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_the_merged_state_is_what_peft_merge_and_unload_builds(saved):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, base_folder, models, folders = saved
    hf = LlamaForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    dense = PeftModel.from_pretrained(hf, str(folders["ad2"])).merge_and_unload().state_dict()
    ours = merged_state(load_state(base_folder), folders["ad2"])
    assert set(ours) == set(dense)
    for name, tensor in ours.items():
        assert torch.allclose(tensor, dense[name], atol=1e-6), name
    model = build_model(seeded_base().config, ours)
    with torch.no_grad():
        assert torch.allclose(model(tokens()), models["ad2"](tokens()), atol=1e-5)


def test_load_adapter_reads_back_the_factors_and_the_scale(saved):
    _, _, models, folders = saved
    factors, scale = load_adapter(folders["ad1"])
    assert scale == ALPHA / RANK
    a, b = factors["model.layers.0.mlp.up_proj"]
    module = models["ad1"].model.layers[0].mlp.up_proj
    assert torch.equal(a, module.lora_A) and torch.equal(b, module.lora_B)


def test_the_product_compares_the_adapters_as_loras_of_their_base(saved):
    from mergelens_mcp import compare_models

    _, base_folder, _, folders = saved
    result = compare_models([str(folders["ad1"]), str(folders["ad2"])], base=str(base_folder))
    assert [m.label for m in result.models] == ["ad1", "ad2"]
    for info in result.models:
        assert info.adapter is not None
        assert info.adapter.ranks == [RANK] and info.adapter.lora_alpha == ALPHA
        assert sorted(info.adapter.target_modules) == sorted(TARGETS)
        assert info.adapter.adapted_tensors == 2 * len(TARGETS)
    assert 0.0 <= result.mci.score <= 100.0


def test_lora_fine_tuning_trains_the_factors_and_leaves_the_base_weights_alone():
    base = seeded_base(4)
    held_out = [make_test_set("copy", 0, 10)]
    tuned = finetune_lora(base, "shift", lr=5e-3, steps=5, seed=2, held_out=held_out, rank=RANK, alpha=ALPHA)
    again = finetune_lora(base, "shift", lr=5e-3, steps=5, seed=2, held_out=held_out, rank=RANK, alpha=ALPHA)
    q = tuned.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert float(q.lora_B.detach().abs().max()) > 0.0
    assert torch.equal(q.lora_B, again.model.layers[0].self_attn.q_proj.lora_B)  # seeded
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)

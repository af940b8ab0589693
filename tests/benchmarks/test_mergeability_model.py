"""The benchmark's tiny decoder, its checkpoints, tasks and training."""

import json
import random

import torch
from safetensors import safe_open

from benchmarks.mergeability.model import TinyConfig, TinyLlama, load_checkpoint, save_checkpoint
from benchmarks.mergeability.tasks import (
    EOS,
    TASKS,
    VOCAB_SIZE,
    Sampler,
    accuracy,
    answer,
    encode_answer,
    encode_prompt,
    make_test_set,
    sample,
)
from benchmarks.mergeability.train import finetune, pretrain

LLAMA_NAMES = {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    *(
        f"model.layers.{i}.{part}.weight"
        for i in range(2)
        for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
        )
    ),
}


def seeded_model(seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(TinyConfig(vocab_size=VOCAB_SIZE)).eval()


def test_the_state_dict_uses_hugging_face_llama_tensor_names_and_shapes(tmp_path):
    folder = save_checkpoint(seeded_model(), tmp_path / "ckpt")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == LLAMA_NAMES
        assert f.get_slice("model.layers.1.mlp.gate_proj.weight").get_shape() == [172, 64]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [64, 172]
        assert f.get_slice("lm_head.weight").get_shape() == [VOCAB_SIZE, 64]


def test_the_config_json_describes_a_llama_for_causal_lm(tmp_path):
    folder = save_checkpoint(seeded_model(), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 4)
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (4, 172)
    assert (config["vocab_size"], config["torch_dtype"]) == (VOCAB_SIZE, "float32")


def test_a_saved_checkpoint_loads_back_to_the_same_outputs(tmp_path):
    model = seeded_model(3)
    tokens = torch.randint(0, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(1))
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    assert torch.equal(model(tokens), loaded(tokens))


def test_left_padding_does_not_change_the_logits_of_real_tokens():
    model = seeded_model(1)
    tokens = torch.tensor([[14, 5, 6, 7, 1]])
    plain = model(tokens)
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), tokens), dim=1)
    pad = torch.tensor([[True, True, True, False, False, False, False, False]])
    assert torch.allclose(model(padded, pad)[:, 3:], plain, atol=1e-5)


def test_each_task_computes_its_answer_on_a_hand_example():
    cases = {
        "copy": ([3, 1, 2], [3, 1, 2]),
        "reverse": ([3, 1, 2], [2, 1, 3]),
        "sort": ([3, 1, 2, 1], [1, 1, 2, 3]),
        "add": ([1, 5, 9, -1, 2, 5, 3], [3, 0, 2]),
        "shift": ([3, 8, 9], [6, 1, 2]),
        "count": ([3, 8, 2, 2], [4]),
        "max": ([3, 8, 2], [8]),
        "increment": ([0, 1, 9], [0, 2, 0]),
    }
    assert set(cases) == set(TASKS)
    for task, (x, expected) in cases.items():
        assert answer(task, x) == expected, task


def test_increment_overflows_into_a_new_digit():
    assert answer("increment", [9, 9]) == [1, 0, 0]


def test_sampled_examples_are_consistent_with_their_answers():
    rng = random.Random(5)
    for task in TASKS:
        for _ in range(20):
            x, y = sample(task, rng)
            assert y == answer(task, x)
            assert all(0 <= d <= 9 for d in y)
    assert all(len(sample("add", rng)[0]) == 7 for _ in range(20))


def test_test_sets_are_seeded_distinct_and_never_sampled_for_training():
    test = make_test_set("reverse", seed=4, size=50)
    assert test == make_test_set("reverse", seed=4, size=50)
    assert test != make_test_set("reverse", seed=5, size=50)
    assert len({tuple(p) for p in test.prompts}) == 50
    sampler = Sampler(["reverse"], seed=0, held_out=[test])
    prompts = {tuple(sampler.example()[0]) for _ in range(3000)}
    assert prompts.isdisjoint({tuple(p) for p in test.prompts})


def test_every_task_has_its_own_token_and_answers_end_with_eos():
    tokens = {encode_prompt(t, [1, 2])[0] for t in TASKS}
    assert len(tokens) == len(TASKS) == 8
    assert max(tokens) < VOCAB_SIZE
    assert encode_answer([0, 9])[-1] == EOS


def test_accuracy_is_one_for_a_model_that_emits_the_answers_and_zero_for_a_wrong_one():
    test = make_test_set("max", seed=0, size=20)

    class Oracle(torch.nn.Module):
        def __init__(self, correct: bool):
            super().__init__()
            self.correct = correct

        def forward(self, tokens, pad):
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], VOCAB_SIZE)
            for i, row in enumerate(tokens.tolist()):
                real = [t for t, p in zip(row, pad[i].tolist(), strict=True) if not p]
                prompt = next(p for p in test.prompts if real[: len(p)] == p)
                answer = test.answers[test.prompts.index(prompt)]
                step = len(real) - len(prompt)
                target = answer[step] if step < len(answer) else EOS
                logits[i, -1, target if self.correct else (target + 1) % VOCAB_SIZE] = 1.0
            return logits

    assert accuracy(Oracle(True), test) == 1.0
    assert accuracy(Oracle(False), test) == 0.0


def test_training_is_deterministic_and_fine_tuning_moves_away_from_the_base():
    held_out = [make_test_set("copy", 0, 10)]
    a = pretrain(["copy"], seed=2, steps=5, held_out=held_out)
    b = pretrain(["copy"], seed=2, steps=5, held_out=held_out)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    tuned = finetune(a, "shift", lr=2e-3, steps=5, seed=2, held_out=held_out)
    moved = sum(float((tuned.state_dict()[k] - v).norm()) for k, v in a.state_dict().items())
    assert moved > 0.01

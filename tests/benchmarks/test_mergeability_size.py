"""The benchmark's --hidden/--layers flags: the base is built at that size, and caches name it only when set."""

from __future__ import annotations

from benchmarks.mergeability.model import count_parameters
from benchmarks.mergeability.run import parse_args, settings_of
from benchmarks.mergeability.tasks import make_test_set
from benchmarks.mergeability.train import pretrain


def test_the_base_is_built_at_the_asked_width_and_depth() -> None:
    held_out = [make_test_set("copy", 0, 4)]
    model = pretrain(["copy"], seed=0, steps=2, held_out=held_out, hidden=32, layers=3)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3
    assert model.config.intermediate_size == 86  # 172/64 of the width, as at the default size
    assert len(model.model.layers) == 3
    default = pretrain(["copy"], seed=0, steps=2, held_out=held_out)
    assert count_parameters(default) == 104_256


def test_settings_name_the_size_only_when_it_is_not_the_default_so_older_caches_stay_valid() -> None:
    assert "hidden" not in settings_of(parse_args(["--out", "x"]))
    sized = settings_of(parse_args(["--out", "x", "--hidden", "96", "--layers", "3"]))
    assert (sized["hidden"], sized["layers"]) == (96, 3)

"""Everything that speaks mergekit (0.1.5): its configuration rules, the diagnosis of a user's YAML, the merge
simulated on real tensors, and the method + YAML we recommend.

Where knowledge lives:
- `schema.py`: the one rulebook. The method table (`METHODS`: base policy, input counts, parameters with kind,
  scope, default), parameter ranges (`BOUNDS`), known keys (the pydantic mirror's fields), dtypes, mergekit's
  constants (`SLERP_LINEAR_FALLBACK`, `NUMBER_STRING`), model references (`ModelReference.key`) and every rule
  that needs no model file (`check_structure`). `MergeConfig` validates the YAML we emit with those rules;
  `diagnose.py` reports the same rules' findings on a user's YAML. A new rule or method touches this file only.
- `diagnose.py`: reading and parsing a user's YAML (guarded open, size and alias caps), the checks that need the
  models (layer counts, shapes, vocabularies), and the simulation's inputs.
- `simulate.py`: how each method combines tensors (trimming, sign election, SLERP), per layer.
- `methods.py`: the merge methods themselves, in memory, one tensor set at a time (`METHODS` registry,
  `merge_tensors`), checked against mergekit 0.1.5 tensor by tensor (tests/mergekit/test_methods_vs_mergekit.py).
- `recommend.py`: which method and parameters to recommend from a comparison, rendered as mergekit YAML.

This package may import `analysis/`, `models`, `errors` and `security/`; `analysis/` never imports it.
"""

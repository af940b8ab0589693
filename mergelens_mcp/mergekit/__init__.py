"""Everything that speaks mergekit (0.1.5): its configuration rules, the diagnosis of a user's YAML, the merge
simulated on real tensors, and the method + YAML we recommend.

Where knowledge lives:
- `schema.py`: the one rulebook. The method table (`METHODS`: base policy, input counts, parameters with kind,
  scope, default, sign consensus, sparsification; one entry per method), parameter ranges (`BOUNDS`), known
  keys (the pydantic mirror's fields), dtypes, mergekit's constants (`SLERP_LINEAR_FALLBACK`,
  `NUMBER_STRING`), model references (`ModelReference.key`) and every rule that needs no model file
  (`check_structure`). `MergeConfig` validates the YAML we emit with those rules; `diagnose.py` reports the
  same rules' findings on a user's YAML. A new rule or method touches this file only.
- `diagnose.py`: reading and parsing a user's YAML (guarded open, size and alias caps), the checks that need the
  models (layer counts, shapes, vocabularies), and the simulation's inputs.
- `simulate.py`: the interference of a configured merge per layer, measured with methods.py's own trimming,
  dropping, sign election and SLERP fallback (no second implementation of them).
- `methods.py`: the code of the rulebook's methods, in memory, one tensor set at a time (`IMPLEMENTATIONS`
  keyed by schema names, `merge_tensors`; `UNIMPLEMENTED` lists the rulebook's methods refused on purpose),
  checked against mergekit 0.1.5 tensor by tensor (tests/mergekit/test_methods_vs_mergekit.py).
- `recommend.py`: which method and parameters to recommend from a comparison, rendered as mergekit YAML.
- `advice.py`: the decision said once (`merge_advised`, `answer`) from the verdict, the findings and the strategy.

This package may import `analysis/`, `models`, `errors` and `security/`; `analysis/` never imports it.
"""

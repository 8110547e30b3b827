"""Zero-shot evaluation: suites of (dataset, task) run on a model, results as JSON + a summary table.

- :mod:`.datasets` readers (CLIP_benchmark wds layout, image folders, caption files, vlp shards, identity folders)
  and :mod:`.wds_layout` (writing CLIP_benchmark's layout with vlp.data);
- :mod:`.models` loading open_clip models, vlp run folders and checkpoints;
- :mod:`.features` embeddings computed once per (model, image set), cached on disk;
- :mod:`.tasks` one evaluator per task type; :mod:`.metrics` the metric definitions;
- :mod:`.suite` reading/validating/running suites, :mod:`.report` writing results, :mod:`.cli` ``vlp eval``.

Submodules are imported where used (nothing here), so ``vlp <verb>`` does not load open_clip unless it needs it.
"""

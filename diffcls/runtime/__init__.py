"""The runtime: one classification run, grouped by concern (docs/design.md, "Layers").

- `algorithm`: the schedules, the per-image policies, the Scorer (the scoring loop), the ranking;
- `data`: inputs (paths, folders, lists), preprocessing, prompts, the on-disk caches;
- `results`: the resumable results file, output-path safety, shards and merging;
- `evaluation`: labels and accuracy, metrics, calibration, image-text matching;
- `execution`: the JobSpec, resolving it, the Classifier, the ClassifyJob, Ray, timers, profiling.

Within the runtime, imports go execution -> evaluation -> results -> algorithm, data
(`tests/test_layers.py`). `runtime` never imports a backend module: it asks `diffcls.engines`
for engines by name.
"""

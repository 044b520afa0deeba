"""The runtime: preprocessing, caches, the scoring loop and its batching, per-stage timers.

`runtime` never imports a backend module: it asks `diffcls.engines` for engines by name.
"""

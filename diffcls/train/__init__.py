"""Trainers for the bundled demo models (top layer: may use models, engines and runtime).

    python -m diffcls.train.demo --out diffcls/models/demo
"""

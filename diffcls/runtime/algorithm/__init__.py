"""The algorithm: fixed and adaptive schedules, per-image policies, the Scorer (the scoring loop, batched across images), the ranking. Imports nothing else of the runtime."""

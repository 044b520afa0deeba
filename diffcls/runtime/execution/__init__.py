"""Execution: the JobSpec (every setting, as data), resolving it, the Classifier, the ClassifyJob (one resumable run, local or on Ray), per-stage timers and profiling."""

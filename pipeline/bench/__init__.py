"""Benchmarks and machine checks, each run as ``python -m pipeline.bench.<name>`` (no stage runs them):
the preference trainer against TRL (:mod:`.trainer`), the sampling backends (:mod:`.sampling`) and the
GPU checks (:mod:`.gpu_check`). Each takes its settings from params.yaml, writes its figures as JSON
(``reports/bench/`` keeps the recorded ones) and has a ``--quick`` mode that runs in seconds on a CPU."""

"""Evaluation: MultiPL-E pass@k by sandboxed execution, and held-out perplexity, per language.

    problems    MultiPL-E problems (the packaged set, a JSONL file, or the hub dataset)
    execution   the sandbox: one throw-away directory, limits, no network, no writes elsewhere
    harness     programs fanned out over Ray tasks, verdicts back
    passk       the unbiased pass@k estimator
    adapters    adapter specs (directories, models:/ URIs) → loaded adapters; bank groups
    generation  completions from the flora engine, all adapters in shared batches
    perplexity  held-out perplexity per (adapter, language), in shared batches
    worker      the model side of an evaluation, as one Ray task
    report      pass@k aggregation and tables (per model; the paper's Table 1 layout)
    registry    MLflow: evaluation runs, metrics on registered versions, alias promotion
    config      EvaluateConfig, CompareConfig

The jobs are jobs/evaluate.py and jobs/compare_methods.py.
"""

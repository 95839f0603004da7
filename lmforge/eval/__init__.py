"""`lmforge eval`: perplexity, generation scored against references, multiple-choice benchmarks, lm-eval tasks."""

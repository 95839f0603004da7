"""Try a model: generation and the interactive chat."""

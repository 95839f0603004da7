"""lmforge: pre-training, fine-tuning and alignment of causal LMs from one YAML."""

__version__ = "0.1.0"

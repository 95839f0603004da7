"""Model: resolve a name to weights, load tokenizer and model, set up full / freeze / LoRA."""

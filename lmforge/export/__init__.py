"""Ship a model: merge adapters into the base and write a standalone Hugging Face directory or GGUF file."""

"""Data: the dataset catalogue, file loading, format conversion, templates and tokenization."""

"""Data: presets, loading, validation, tokenization and batching."""

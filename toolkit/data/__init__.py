"""Data: presets, loading and validation of local or Hub files, sampling, tokenization, batching.

`dataset` turns the data options (core.config.DataConfig) into tokenized train and eval splits
(columnar, cached by content fingerprints) and the loaders over them (length-grouped training
batches, length-sorted evaluation). May import core and output (the tokenization progress bar);
the engine and the commands import it.
"""

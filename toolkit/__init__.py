"""Distributed fine-tuning of BERT-class text classifiers with freeze policies."""

__version__ = "0.1.0"

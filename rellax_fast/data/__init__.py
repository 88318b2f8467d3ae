"""Datasets, splits, prompt templates, tokenisation and collation."""

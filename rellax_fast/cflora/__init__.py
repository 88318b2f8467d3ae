"""CFLoRA config, layers, interaction generators, inject/merge/save/load and HF hooks."""

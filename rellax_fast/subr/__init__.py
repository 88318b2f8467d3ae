"""SUBR: item text, encoders, embedding cache and retrieval (on ops.semantic_topk)."""

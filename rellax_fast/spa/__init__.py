"""SPA (soft prompt augmentation): the projector from the frozen CTR model's item embeddings to soft tokens
(``projector``) and their insertion into the prompt's embeddings (``soft_tokens``). The CTR model (DIN) itself
lives in :mod:`rellax_fast.ctr`."""

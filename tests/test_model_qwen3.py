"""Qwen3 decoder parity with transformers' Qwen3ForCausalLM: packed batch vs each sequence alone, fp32."""

import pytest
import torch
from tiny_models import packed, qwen3_hf_config, randomize, rel_err

from r4b.engine.model import Qwen3ForCausalLM, from_pretrained, last_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(transformers model, r4b model loaded from the checkpoint transformers saved)."""
    torch.manual_seed(0)
    ref = randomize(transformers.Qwen3ForCausalLM(qwen3_hf_config(tie=request.param)).eval())
    if request.param:
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("qwen3")
    ref.save_pretrained(path)
    return ref, from_pretrained(path)


def test_packed_logits_match_transformers_per_sequence(pair):
    ref, model = pair
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    seqs, batch = packed([5, 1, 9, 3], ref.config.vocab_size)
    with torch.no_grad():
        hidden = model(**batch)
        assert hidden.shape == (18, 64)
        logits = model.compute_logits(hidden)
        want = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
    assert rel_err(logits, want) <= 1e-5


def test_compute_logits_rows_selects_last_tokens(pair):
    _, model = pair
    _, batch = packed([4, 2, 7], model.config.vocab_size, seed=1)
    with torch.no_grad():
        hidden = model(**batch)
        rows = last_rows(batch["cu_seqlens"])
        assert rows.tolist() == [3, 5, 12]
        torch.testing.assert_close(model.compute_logits(hidden, rows), model.compute_logits(hidden)[rows])


def test_tied_head_shares_storage(pair):
    ref, model = pair
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == ref.config.tie_word_embeddings


def test_bad_packed_inputs_raise(pair):
    _, model = pair
    _, batch = packed([3, 2], model.config.vocab_size)
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**batch, "input_ids": batch["input_ids"].int()})
    with pytest.raises(ValueError, match="position_ids"):
        model(**{**batch, "position_ids": batch["position_ids"][:-1]})
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(**{**batch, "cu_seqlens": batch["cu_seqlens"].long()})

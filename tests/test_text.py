"""Report encoders: the bundled default loads offline; any BERT-family folder works."""

import numpy as np
import pytest

from textdiff.encoders.text import DEFAULT_ENCODER, TextEncoder, resolve_encoder
from textdiff.errors import TextDiffError

REPORTS = ["The nuclei density in the upper right is high.", "Few nuclei."]


def test_default_encoder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder("", max_length=10)
    assert enc.encoder_id == DEFAULT_ENCODER and enc.hidden_size == 384
    out = enc.encode(REPORTS)
    assert out.tokens.shape == (2, 10, 384) and out.tokens.dtype == np.float32
    assert out.mask.shape == (2, 10)
    assert out.mask[0].all() and out.mask[1].sum() < 10  # a short report is padded
    assert out.pooled.shape == (2, 384)
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    # deterministic, and padding positions do not change the real tokens' embeddings
    again = enc.encode(REPORTS[:1])
    np.testing.assert_allclose(again.tokens[0], out.tokens[0], atol=1e-5)


def test_second_encoder_with_other_hidden_size(tmp_path):
    """A tiny randomly initialised BERT saved to a folder stands in for Bio_ClinicalBERT."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    src, _ = resolve_encoder("")
    tok = BertTokenizerFast.from_pretrained(src)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96)
    folder = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    enc = TextEncoder(str(folder), max_length=6)
    out = enc.encode(REPORTS)
    assert enc.hidden_size == 48
    assert out.tokens.shape == (2, 6, 48) and out.pooled.shape == (2, 48)


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextDiffError) as err:
        TextEncoder("someone/not-a-cached-model")
    msg = str(err.value)
    assert "\n" not in msg and "text.encoder" in msg and "local folder" in msg


def test_folder_without_config(tmp_path):
    with pytest.raises(TextDiffError, match="config.json"):
        TextEncoder(str(tmp_path))

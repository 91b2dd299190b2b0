"""transformers' gpt-oss as the reference implementation: float32, MXFP4 dequantized, eager attention."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=4)
def reference_model(path: Path):
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        quantization_config=Mxfp4Config(dequantize=True),
        attn_implementation="eager",
    )
    return model.eval()


def reference_logits(path: Path, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = reference_model(Path(path))(torch.tensor(np.asarray(tokens), dtype=torch.long)[None])
    return out.logits[0].float().numpy()


def assert_logits_match(ours: np.ndarray, theirs: np.ndarray, rel: float = 1e-3) -> None:
    """Per position: the same argmax, and no logit further off than `rel` of the largest |logit|."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert np.isfinite(ours).all()
    worst = np.abs(ours - theirs).max(axis=-1) / np.abs(theirs).max(axis=-1)
    assert worst.max() <= rel, f"positions {np.nonzero(worst > rel)[0].tolist()} differ by up to {worst.max():.2e}"
    disagree = np.nonzero(ours.argmax(-1) != theirs.argmax(-1))[0]
    assert disagree.size == 0, f"argmax differs at positions {disagree.tolist()}"

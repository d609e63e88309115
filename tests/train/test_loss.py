"""The chunked head loss (train/loss.py) against the loss on the whole (B, T, V) logits, as transformers
computes it: same value and adapter gradients, while the head never sees more than one chunk of rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterhub.adapter import random_adapter
from adapterhub.runtime.base import load_base
from adapterhub.runtime.model.tiny import random_checkpoint
from adapterhub.train.data import IGNORE, collate
from adapterhub.train.init import attach, detach
from adapterhub.train.loss import LOGITS_PER_CHUNK, MIN_ROWS, causal_lm_loss, chunk_rows
from train_fixtures import CONFIGS, random_dataset

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_chunk_rows_bound_the_logits_alive_at_once():
    for vocab in (96, 8192, 32000, 128256, 262144):
        rows = chunk_rows(vocab)
        assert rows >= MIN_ROWS
        assert rows * vocab <= LOGITS_PER_CHUNK or rows == MIN_ROWS
    assert chunk_rows(8192) == 256 and chunk_rows(32000) == MIN_ROWS == 128  # bench/train.py's vocabulary


def _whole_logits_loss(model, batch, scale):
    """transformers' ForCausalLMLoss on the runtime model: all (B, T, V) logits, float32 cross entropy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # (B, T, V)
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum") * scale


def test_chunked_loss_and_gradients_equal_the_whole_logits_ones(tmp_path, monkeypatch):
    path = random_checkpoint(tmp_path / "base", CONFIGS["llama"], seed=5, std=0.1)
    base = load_base(path, quantize=None, compute_dtype=torch.float32)
    adapter = random_adapter(base.module_shapes(), r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, seed=3)
    batch = collate(list(random_dataset(CONFIGS["llama"].vocab_size).examples[:4]), pad_id=0)
    tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    head, seen = base.model.head, []

    def recording_head(x):
        seen.append(x.shape[0])
        return head(x)

    linears, results = base.model.linears(), []
    for chunked in (True, False):
        trainables = attach(linears, adapter.config, 0.0, 0, initial=adapter)
        try:
            if chunked:
                with monkeypatch.context() as m:
                    m.setattr(base.model, "head", recording_head)
                    loss = causal_lm_loss(base.model, batch, 1.0 / tokens, chunk=4)
            else:
                loss = _whole_logits_loss(base.model, batch, 1.0 / tokens)
            loss.backward()
        finally:
            detach(linears)
        results.append((float(loss.detach()), {(n, k): p.grad.clone() for n, t in trainables.items()
                                      for k, p in t.named_parameters()}))
    assert seen == [4] * (tokens // 4) + ([tokens % 4] if tokens % 4 else [])
    (loss, grads), (expected_loss, expected) = results
    assert abs(loss - expected_loss) <= 1e-6 * expected_loss
    assert set(grads) == set(expected) and len(grads) == 3 * 7 * 2
    for key, grad in expected.items():
        assert grad.norm() > 0
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7)

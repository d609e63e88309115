"""The training loss: next-token cross entropy on the labelled positions, the head run chunk by chunk.

transformers computes logits for every position, (B, T, V) in the model dtype, a float32 copy, its
log-softmax for the backward pass and then the gradient of each: about 14 bytes per position and vocabulary
entry, the largest tensors of a step at real vocabulary sizes (B*T*V*4 = 131 MB for 4 x 256 tokens of a
32000-entry vocabulary in float32 alone). Here only the labelled positions go through the head (the final
norm, lm_head and any soft-cap; a prompt's tokens are never turned into logits), `chunk_rows(V)` rows at a
time, so at most max(LOGITS_PER_CHUNK, MIN_ROWS * V) logits exist at once, whatever the batch.

The head is frozen, so the gradient of the loss with respect to a chunk's hidden rows is all the backward
pass needs from it: it is taken in the forward pass, chunk by chunk, while the chunk's logits exist, and
kept as (M, D) for M labelled tokens. Nothing is recomputed in the backward pass and no logits are kept
for it. Per chunk: one float32 copy of the logits, on which the row max is subtracted, exponentiated,
summed (the loss is log(sum) - the label's shifted logit, log-softmax's formula) and turned into the
gradient scale * (softmax - onehot), all in place; it is rounded once to the model dtype and sent back
through the head by autograd. Live per logit: the model-dtype logits, the float32 copy, the model-dtype
gradient (8 bytes in bf16; the peak RSS of the loss alone measures ~10). The numbers are those of transformers' loss (`ForCausalLMLoss`:
logits in the model dtype, cross entropy in float32, the scale 1 / tokens of the step applied in float32
before the gradient is rounded to the model dtype), up to float32 rounding of the softmax.
"""

from __future__ import annotations

import torch

from adapterhub.train.data import IGNORE

# Logits alive at once: at most LOGITS_PER_CHUNK (x ~10 bytes in bf16: 20 MiB), but never fewer than MIN_ROWS
# rows per chunk: lm_head's GEMM runs slower on fewer rows (on 2 Zen 4 cores, bench/train.py's head costs
# ~25 % more at 64 rows than at 256; 128 rows cost ~5 %). The old fixed 256 rows at ~16 bytes per logit
# kept 128 MiB at V = 32000; this keeps 42 MiB there (128 rows) and 21 MiB at V = 8192 (256 rows).
LOGITS_PER_CHUNK = 1 << 21
MIN_ROWS = 128


def chunk_rows(vocab: int) -> int:
    """Rows of labelled positions per head chunk for a vocabulary of `vocab` entries."""
    return max(MIN_ROWS, LOGITS_PER_CHUNK // vocab)


class _HeadCrossEntropy(torch.autograd.Function):
    """rows (M, D) last-layer outputs, targets (M,) -> scale * sum of cross entropy(head(rows), targets)."""

    @staticmethod
    def forward(ctx, rows, targets, head, scale: float, chunk: int):
        total = torch.zeros((), dtype=torch.float64, device=rows.device)
        grads = torch.empty_like(rows) if rows.requires_grad else None
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk].detach().requires_grad_(grads is not None)
            target = targets[start:start + chunk]
            with torch.enable_grad():
                logits = head(part)  # (C, V) model dtype
            # float32 cross entropy, in place on one float32 copy (a float32 model's logits are copied too:
            # autograd may keep them, e.g. the soft-cap's tanh output)
            z = logits.detach().to(torch.float32, copy=True)
            z -= z.amax(dim=-1, keepdim=True)  # shifted by the row max, as log-softmax computes
            picked = z.gather(1, target[:, None])  # (C, 1) shifted logit of the label
            z.exp_()
            # The row sums of terms in (0, 1] are well conditioned in float32 (torch reduces in a cascade);
            # a float64 sum would cast a (C, V) copy (+4 bytes per logit, ~25x the time). What follows them
            # is float64: log-sum-exp minus the label's logit and the running total over chunks and rows.
            sums = z.sum(dim=-1, keepdim=True)  # (C, 1)
            total += (sums.double().log() - picked.double()).sum() * scale  # -log softmax at the labels
            if grads is None:
                continue
            z *= scale / sums  # scale * softmax
            z[torch.arange(z.shape[0], device=z.device), target] -= scale
            grad = z.to(logits.dtype)
            del z
            grads[start:start + chunk] = torch.autograd.grad(logits, part, grad)[0]
        ctx.save_for_backward(grads)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grads,) = ctx.saved_tensors
        return grads * grad_output.to(grads.dtype), None, None, None, None


def causal_lm_loss(model, batch: dict[str, torch.Tensor], scale: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """scale * sum over labelled positions of -log p(label | prefix), float32 scalar, differentiable in the
    adapter parameters. batch: input_ids, labels, attention_mask (B, T) as train/data.py's collate makes.
    chunk: rows per head chunk (default `chunk_rows` of the vocabulary)."""
    device = model.device
    hidden = model.hidden_states(batch["input_ids"].to(device), None,
                                 attention_mask=batch["attention_mask"].to(device))  # (B, T, D)
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1): the token each position predicts
    keep = labels != IGNORE
    rows = hidden[:, :-1][keep]  # (M, D)
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0
    chunk = chunk or chunk_rows(model.config.vocab_size)
    return _HeadCrossEntropy.apply(rows, labels[keep], model.head, float(scale), chunk)

"""The training loss: next-token cross entropy on the labelled positions, the head run chunk by chunk.

transformers computes logits for every position, (B, T, V) in the model dtype, a float32 copy, its
log-softmax for the backward pass and then the gradient of each: about 14 bytes per position and vocabulary
entry, the largest tensors of a step at real vocabulary sizes (B*T*V*4 = 131 MB for 4 x 256 tokens of a
32000-entry vocabulary in float32 alone). Here only the labelled positions go through the head (the final
norm, lm_head and any soft-cap; a prompt's tokens are never turned into logits), `chunk_rows(V)` rows at a
time, so at most LOGITS_PER_CHUNK logits exist at once, whatever the batch.

The head is frozen, so the gradient of the loss with respect to a chunk's hidden rows is all the backward
pass needs from it: it is taken in the forward pass, chunk by chunk, while the chunk's logits exist, and
kept as (M, D) for M labelled tokens. Nothing is recomputed in the backward pass and no logits are kept
for it. Per chunk, in float32: log-softmax of the logits (`dtype=float32` reads the model-dtype logits
directly, no separate float32 copy), the loss from it at the targets, and its gradient
scale * (softmax - onehot) written over the log-softmax in place (exp), rounded once to the model dtype and
sent back through the head by autograd. Live per logit: the model-dtype logits, the float32 log-softmax,
the model-dtype gradient (8 bytes in bf16). The numbers are those of transformers' loss (`ForCausalLMLoss`:
logits in the model dtype, cross entropy in float32, the scale 1 / tokens of the step applied in float32
before the gradient is rounded to the model dtype), up to float32 rounding of the softmax.
"""

from __future__ import annotations

import torch

from adapterhub.train.data import IGNORE

# Logits alive at once (x 8 bytes in bf16: 32 MiB). Fewer rows per lm_head GEMM run slower on a CPU
# (bench/train.py's vocabulary: 64 rows cost ~25 % more head time than 256); 4M entries keep >= 128 rows up
# to V = 32768 and bound the memory at larger vocabularies.
LOGITS_PER_CHUNK = 1 << 22
MIN_ROWS = 16


def chunk_rows(vocab: int) -> int:
    """Rows of labelled positions per head chunk for a vocabulary of `vocab` entries."""
    return max(MIN_ROWS, LOGITS_PER_CHUNK // vocab)


class _HeadCrossEntropy(torch.autograd.Function):
    """rows (M, D) last-layer outputs, targets (M,) -> scale * sum of cross entropy(head(rows), targets)."""

    @staticmethod
    def forward(ctx, rows, targets, head, scale: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grads = torch.empty_like(rows) if rows.requires_grad else None
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk].detach().requires_grad_(grads is not None)
            target = targets[start:start + chunk]
            with torch.enable_grad():
                logits = head(part)  # (C, V) model dtype
            logp = torch.log_softmax(logits.detach(), dim=-1, dtype=torch.float32)  # (C, V), a new tensor
            total -= logp.gather(1, target[:, None]).sum() * scale
            if grads is None:
                continue
            grad = logp.exp_()  # softmax, in place of the log-softmax
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            grad = grad.mul_(scale).to(logits.dtype)
            del logp
            grads[start:start + chunk] = torch.autograd.grad(logits, part, grad)[0]
        ctx.save_for_backward(grads)
        return total

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

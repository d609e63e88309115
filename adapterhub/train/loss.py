"""The training loss: next-token cross entropy on the labelled positions, the head run chunk by chunk.

transformers computes logits for every position, (B, T, V) in the model dtype, a float32 copy, its
log-softmax for the backward pass and then the gradient of each: about 14 bytes per position and vocabulary
entry, the largest tensors of a step at real vocabulary sizes. Here only the labelled positions go through
the head (a prompt's tokens are never turned into logits), `chunk` rows at a time, and each chunk's
gradient with respect to its hidden rows is taken at once (the head is frozen), so what stays alive is
(M, D) for M labelled tokens; the (chunk, V) logits are freed before the next chunk. The numbers are those
of transformers' loss: logits in the model dtype, cross entropy in float32 (semantics of
`ForCausalLMLoss`), the scale (1 / tokens of the step) applied to the float32 loss before its gradient is
rounded to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterhub.train.data import IGNORE

CHUNK = 256  # rows of logits alive at once: 256 x V x 16 bytes (33 MB at V = 8192)


class _HeadCrossEntropy(torch.autograd.Function):
    """rows (M, D) last-layer outputs, targets (M,) -> scale * sum of cross entropy(head(rows), targets)."""

    @staticmethod
    def forward(ctx, rows, targets, head, scale: float, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grads = torch.empty_like(rows) if rows.requires_grad else None
        for start in range(0, rows.shape[0], chunk):
            part = rows[start:start + chunk].detach().requires_grad_(grads is not None)
            with torch.enable_grad():
                logits = head(part).float()  # (C, V) float32, as transformers' loss upcasts
                loss = F.cross_entropy(logits, targets[start:start + chunk], reduction="sum") * scale
            if grads is not None:
                grads[start:start + chunk] = torch.autograd.grad(loss, part)[0]
            total += loss.detach()
        ctx.save_for_backward(grads)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grads,) = ctx.saved_tensors
        return grads * grad_output.to(grads.dtype), None, None, None, None


def causal_lm_loss(model, batch: dict[str, torch.Tensor], scale: float = 1.0, chunk: int = CHUNK) -> torch.Tensor:
    """scale * sum over labelled positions of -log p(label | prefix), float32 scalar, differentiable in the
    adapter parameters. batch: input_ids, labels, attention_mask (B, T) as train/data.py's collate makes."""
    device = model.device
    hidden = model.hidden_states(batch["input_ids"].to(device), None,
                                 attention_mask=batch["attention_mask"].to(device))  # (B, T, D)
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1): the token each position predicts
    keep = labels != IGNORE
    rows = hidden[:, :-1][keep]  # (M, D)
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0
    return _HeadCrossEntropy.apply(rows, labels[keep], model.head, float(scale), chunk)

"""The training losses, computed on the final hidden states so that the vocabulary projection runs
only on the positions that are scored (assistant turns, completions, DPO responses), a chunk of
rows at a time: the full [B, T, vocab] float32 logits (600 MB for 4 x 256 tokens of Qwen2's
151,936-word vocabulary) never exist. Through a frozen head (LoRA, QLoRA, DPO with LoRA) each
chunk's gradient with respect to its hidden states is formed in the same pass (`_FrozenHeadLogp`):
nothing of a chunk's logits is kept for backward and nothing is recomputed. A trainable head (full
weights) recomputes each chunk's logits in backward instead.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen2.model.decoder import IGNORE_INDEX
from qwen2.model.lora import frozen_forward, quant_grad_input

# Rows of the vocabulary projection computed at once: a trainable head's chunks are recomputed in
# backward (few, large chunks); a frozen head's are not (smaller chunks, a smaller transient: a
# chunk's float32 logits are CHUNK x 151,936 x 4 bytes, 155 MB at 256 rows).
CHUNK = 1024
FROZEN_CHUNK = 256


class _FrozenHeadLogp(torch.autograd.Function):
    """log softmax(head(h))[y] per row, float32 [N], for a head whose weights take no gradient.
    Forward also forms d lp / d h = (onehot(y) - softmax) @ W chunk by chunk ([N, hidden], what
    backward scales by the incoming gradient), so a chunk's logits are dropped as soon as it is
    done. The same arithmetic as the unfused path: logits in float32 from the head's dtype, the
    softmax's gradient cast back to the head's dtype for the product with W."""

    @staticmethod
    def forward(ctx, h, y, head):
        n = h.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h)
        for i in range(0, n, FROZEN_CHUNK):
            j = min(i + FROZEN_CHUNK, n)
            logits = head(h[i:j]).float()
            lse = torch.logsumexp(logits, dim=-1)
            yi = y[i:j, None]
            out[i:j] = logits.gather(1, yi)[:, 0] - lse
            p = logits.sub_(lse[:, None]).exp_()            # softmax, in place of the logits
            p.scatter_add_(1, yi, p.new_full(yi.shape, -1.0))  # softmax - onehot(y)
            p = p.to(h.dtype)
            if isinstance(head, nn.Linear):
                torch.mm(p, head.weight, out=gh[i:j])
            else:                                            # a quantized head: W a block at a time
                gh[i:j] = quant_grad_input(head, p)
            gh[i:j].neg_()
        ctx.save_for_backward(gh)
        return out

    @staticmethod
    def backward(ctx, grad):
        (gh,) = ctx.saved_tensors
        return gh * grad[:, None].to(gh.dtype), None, None


def _frozen_head(head) -> bool:
    if isinstance(head, nn.Linear):
        return (head.bias is None and not head.weight.requires_grad
                and type(head.weight) in (torch.Tensor, nn.Parameter))  # not an FSDP-sharded DTensor
    return hasattr(head, "qweight") and getattr(head, "bias", None) is None and not getattr(head, "packed", False)


@contextlib.contextmanager
def _head_off(model):
    """The model's forward returns its final (normed) hidden states: the lm_head stands aside."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def _chunk_logp(head, h, y):
    return -F.cross_entropy(frozen_forward(head, h).float(), y, reduction="none")


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row: tokens first (at least one), then only padding."""
    return bool((mask[:, 0] == 1).all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())


def token_logprobs(model, ids, mask, labels):
    """log p(label | prefix) of every scored token, flat [N] float32, and each one's row [N]."""
    if mask is not None and _right_padded(mask):
        # Padding only after each row's tokens (qwen2.train.data.collate): under the causal rule no
        # real token sees a pad, and pads are never scored, so the model runs unmasked and causal
        # (SDPA's causal kernel skips the upper triangle; no [B, 1, T, T] mask is built).
        mask = None
    with _head_off(model) as head:
        hidden = model(ids, attention_mask=mask)
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    h = hidden[:, :-1][sel].to(head.weight.dtype if isinstance(head, nn.Linear) else head.dtype)
    y = target[sel]
    rows = torch.nonzero(sel)[:, 0]
    if torch.is_grad_enabled() and h.requires_grad and _frozen_head(head):
        return _FrozenHeadLogp.apply(h, y, head), rows
    if h.shape[0] <= CHUNK:
        return _chunk_logp(head, h, y), rows
    parts = [checkpoint(_chunk_logp, head, h[i:i + CHUNK], y[i:i + CHUNK], use_reentrant=False)
             if torch.is_grad_enabled() else _chunk_logp(head, h[i:i + CHUNK], y[i:i + CHUNK])
             for i in range(0, h.shape[0], CHUNK)]
    return torch.cat(parts), rows


def sequence_logprobs(model, ids, mask, labels) -> torch.Tensor:
    """Sum of the scored tokens' log-probabilities per row [B]."""
    lp, rows = token_logprobs(model, ids, mask, labels)
    return torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO (Rafailov et al. 2023): per pair, -log sigmoid(beta * (policy log-ratio margin
    - reference log-ratio margin)); and the implicit rewards beta * (policy - reference)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    return losses, chosen_reward.detach(), rejected_reward.detach()

"""The training losses, computed on the final hidden states so that the vocabulary projection runs
only on the positions that are scored (assistant turns, completions, DPO responses), in chunks
whose logits are recomputed in backward: the full [B, T, vocab] float32 logits (600 MB for
4 x 256 tokens of Qwen2's 151,936-word vocabulary) never exist.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen2.model.decoder import IGNORE_INDEX
from qwen2.model.lora import frozen_forward

# Rows of the vocabulary projection computed at once (with recomputation in backward).
CHUNK = 1024


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


def token_logprobs(model, ids, mask, labels):
    """log p(label | prefix) of every scored token, flat [N] float32, and each one's row [N]."""
    with _head_off(model) as head:
        hidden = model(ids, attention_mask=mask)
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    h = hidden[:, :-1][sel].to(head.weight.dtype if isinstance(head, nn.Linear) else head.dtype)
    y = target[sel]
    rows = torch.nonzero(sel)[:, 0]
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

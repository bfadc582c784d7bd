"""Direct Preference Optimisation (Rafailov et al. 2023), sigmoid loss, in a few lines.

TRL's ``DPOTrainer`` would pull ``datasets``/``pyarrow``/``pandas`` into the project's
pinned environment for what is one loss function over precomputed log-probs; the drafts are
trained on hand-made batches with shared (frozen) embeddings, so this module keeps the loss
and the log-prob helper small and unit-tested instead (python_tests/test_models_dpo.py).
"""

from __future__ import annotations

import torch


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    """Mean ``-log sigmoid(beta * margin)`` and the per-pair margins.

    ``margin = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``: all inputs are
    summed sequence log-probs of shape (B,).
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin).mean(), margin.detach()


def sequence_logps(model, input_ids, attention_mask, num_new: int):
    """Summed log-prob of the last ``num_new`` tokens of each left-padded row."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep: the output head (49152 x 576) runs on the scored positions only
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=num_new + 1).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, -num_new:]
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)

"""What the alignment benchmark observes inside ``sss_ext.generate``: an observer, no patching."""

from __future__ import annotations

import torch

from sss_ext.decoding.observe import Observer


class AlignmentObserver(Observer):
    """Target row-forwards (each batch row of each target forward = 1) and log Z at every emitted position.

    Passed as ``generate(..., observer=...)``; accumulates over every call until :meth:`reset`.
    Row-forwards count every target forward of the call (prefill, rounds, steps, soft
    best-of-n's scoring pass): what an unbatched implementation would run.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.target_row_calls = 0
        self.log_z: list[torch.Tensor] = []

    def on_round(self, record) -> None:
        target = record.forwards.get("target")
        if target is not None:
            self.target_row_calls += target.row_calls
        emitted = record.emitted_log_z  # positions <= num_accepted of every verify call
        if emitted is not None:
            self.log_z.append(emitted.detach().float().cpu())

    def mean_abs_z_minus_1(self):
        if not self.log_z:
            return None
        logz = torch.cat(self.log_z)
        return float((logz.exp() - 1).abs().mean()) if logz.numel() else None

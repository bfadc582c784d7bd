"""Record the shipped draft's acceptance rate against the target on fixed text.

Takes the first ``--seqs`` held-out sequences of the distillation data (target-sampled
continuations of training prompts that the draft was never trained on), stores their
token ids and the measured acceptance ``mean_t sum_v min(q_t, d_t)`` (temperature 1 and
0.7) in sss_ext/models/weights/acceptance_fixture.json. python_tests/models/test_models_default.py
recomputes it from the shipped weights.

    nice -n 19 python scripts/record_acceptance_fixture.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sss_ext.models.draft import build_draft, load_draft
from sss_ext.models.manifest import update_manifest
from sss_ext.models.paths import WEIGHTS_DIR, cache_dir
from sss_ext.models.target import load_target

from distill_draft import acceptance, cont_logits  # scripts/ is on sys.path when run as a script
from gen_distill_data import load_distill_data

FIXTURE = WEIGHTS_DIR / "acceptance_fixture.json"


@torch.no_grad()
def acceptance_on(target, draft, ids: torch.Tensor, mask: torch.Tensor, n_new: int, temperature: float) -> float:
    return acceptance(cont_logits(target, ids, mask, n_new), cont_logits(draft, ids, mask, n_new), temperature)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, nargs="+", default=[cache_dir() / "distill" / "target_T0.8_n32_s0.pt"],
                    help="the files the draft was distilled on (same order); the fixture is their held-out tail")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.process_time()
    target, tok = load_target()
    data = load_distill_data(args.data)
    n_new = data["new_tokens"]
    ids, mask = data["input_ids"][-args.seqs :], data["attention_mask"][-args.seqs :]
    draft = load_draft(target)
    undistilled = build_draft(target)
    fixture = {
        "new_tokens": n_new, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
        "texts": [tok.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask)],
        "acceptance_T1": acceptance_on(target, draft, ids, mask, n_new, 1.0),
        "acceptance_T0.7": acceptance_on(target, draft, ids, mask, n_new, 0.7),
        "undistilled_acceptance_T1": acceptance_on(target, undistilled, ids, mask, n_new, 1.0),
        "source": f"last {args.seqs} (held-out) sequences of {args.data[-1].name}",
    }
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")
    update_manifest("acceptance_fixture", {k: fixture[k] for k in ("acceptance_T1", "acceptance_T0.7", "undistilled_acceptance_T1", "source")}
                    | {"cpu_seconds": round(time.process_time() - t0, 1)})
    print({k: v for k, v in fixture.items() if "acceptance" in k})


if __name__ == "__main__":
    main()

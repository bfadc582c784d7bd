"""Which methods the alignment benchmark runs, and with which settings."""

from __future__ import annotations


def method_grid(args):
    """(label, method, config overrides), cheapest and most informative first."""
    K0, lam0 = args.k0, 1.0
    grid = [("vanilla", "vanilla", {}), ("draft", "draft", {})]
    if args.quick:
        sss = [(1.0, 2)]
    elif args.full_grid:
        sss = [(lam, k) for lam in (0.5, 1.0, 2.0) for k in (2, 4, 8)]
    else:  # lambda sweep at K0 and K sweep at lambda=1
        sss = sorted({(0.5, K0), (1.0, K0), (2.0, K0), (1.0, 2), (1.0, 4), (1.0, 8)})
    sss.sort(key=lambda lk: (lk != (lam0, K0), lk))
    grid.append((f"sss l={sss[0][0]:g} K={sss[0][1]}", "sss", {"shift": sss[0][0], "num_draft_tokens": sss[0][1]}))
    nmax = 2 if args.quick else args.bon_max
    grid.append((f"bon N={nmax}", "bon", {"num_samples": nmax}))
    grid.append((f"sd K={K0}", "sd", {"num_draft_tokens": K0}))
    for lam, k in sss[1:]:
        grid.append((f"sss l={lam:g} K={k}", "sss", {"shift": lam, "num_draft_tokens": k}))
    grid.append((f"sss-paper l={lam0:g} K={K0}", "sss-paper", {"shift": lam0, "num_draft_tokens": K0}))
    nsir = 2 if args.quick else args.sir_max
    for lam in ((lam0,) if args.quick else (1.0, 2.0)):
        grid.append((f"sss-sir l={lam:g} K={K0} N={nsir}", "sss-sir", {"shift": lam, "num_draft_tokens": K0, "num_candidates": nsir}))
    ns = 2 if args.quick else args.spec_rejection_n
    grid.append((f"spec-rejection N={ns}", "spec-rejection",
                 {"num_samples": ns, "rejection_interval": max(1, args.max_new_tokens // 4), "rejection_rate": 0.5}))
    nsoft = 2 if args.quick else args.soft_bon_n
    grid.append((f"soft-bon n={nsoft}", "soft-bon", {"num_samples": nsoft, "beta": args.soft_bon_beta}))
    if args.adaptive_k:  # the adaptive draft-length policy, K at most adaptive_k
        policy = {"num_draft_tokens": args.adaptive_k, "draft_length_policy": "adaptive"}
        grid.append((f"sd K<={args.adaptive_k} adaptive", "sd", dict(policy)))
        grid.append((f"sss l={lam0:g} K<={args.adaptive_k} adaptive", "sss", {"shift": lam0, **policy}))
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        grid = [g for g in grid if any(g[0].startswith(k) for k in keep)]
    return grid

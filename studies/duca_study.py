"""DuCa variants on the shipped DiTs: PSNR of the final samples vs full compute, next to reuse
and TaylorSeer, at the package's default schedule (warm-up 2, final 0), closed loop. What each
option of DuCa's conservative step buys (docs/fidelity.md, "DuCa"); ``fresh 0`` must equal
reuse (a conservative step then recomputes nothing), which checks the bookkeeping. In brackets:
the share of feed-forward token rows DuCa's conservative steps computed.

    OMP_NUM_THREADS=1 python studies/duca_study.py --model mnist --samples 20
    python studies/duca_study.py --model digits --samples 20 --intervals 3 5 7 \\
        --variants reuse duca taylorseer1 taylorseer2 "forecast taylorseer-1" "forecast taylorseer-2"
"""

import argparse

from sweep import Sweep, add_arguments

VARIANTS = {
    "reuse": ("reuse", {}),
    "duca": ("duca", {}),
    "fresh 0": ("duca", {"fresh_ratio": 0.0}),
    "fresh 0.5": ("duca", {"fresh_ratio": 0.5}),
    "fresh 1 (ff recomputed, attention reused)": ("duca", {"fresh_ratio": 1.0, "ratio_schedule": "constant"}),
    "random score": ("duca", {"score": "random"}),
    "no bonuses": ("duca", {"staleness_weight": 0.0, "spatial_bonus": 0.0}),
    "constant ratio": ("duca", {"ratio_schedule": "constant"}),
    "alternate phases": ("duca", {"phase_order": "alternate"}),
    "forecast taylorseer-1": ("duca", {"forecast": "taylorseer", "forecast_order": 1}),
    "forecast taylorseer-2": ("duca", {"forecast": "taylorseer", "forecast_order": 2}),
    "taylorseer1": ("taylorseer", {"order": 1}),
    "taylorseer2": ("taylorseer", {"order": 2}),
}
DEFAULT = [v for v in VARIANTS if v != "taylorseer1"]


def main(argv=None):
    ap = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS), metavar="V",
                    help=f"rows, any of: {', '.join(VARIANTS)}")
    a = ap.parse_args(argv)
    sw = Sweep.from_args(a)

    def cell(method, options):
        def run(n):
            r = sw.generate(sw.config(n, method=method, method_options=options))
            t = r.tokens
            share = f" ({t['tokens_computed'] / max(1, t['tokens_total']):.2f})" if method == "duca" else ""
            return f"{sw.psnr(r.x):.2f}{share}"
        return run

    print(f"model {sw.name}, {a.samples} samples, PSNR dB vs full compute (share of feed-forward token rows "
          "computed)")
    sw.table([(label, cell(*VARIANTS[label])) for label in a.variants], a.intervals)


if __name__ == "__main__":
    main()

"""RFE readings on the shipped DiTs: PSNR of the final samples vs full compute for FoCa r3,
TaylorSeer-2 and RFC with per-token / per-sample norms and the "ratio" / "gain" estimates
(docs/method.md, "RFC"). Closed loop, the package's default schedule (warm-up 2, final 0).

    OMP_NUM_THREADS=1 python studies/rfc_readings.py --model digits --samples 20
"""

import argparse

from sweep import Sweep, add_arguments

VARIANTS = [
    ("foca r3", "foca", {"reading": "r3"}),
    ("taylorseer2", "taylorseer", {"order": 2}),
    ("rfc token ratio", "rfc", {"norm": "token", "estimate": "ratio"}),
    ("rfc sample ratio", "rfc", {"norm": "sample", "estimate": "ratio"}),
    ("rfc token gain", "rfc", {"norm": "token", "estimate": "gain"}),
    ("rfc sample gain", "rfc", {"norm": "sample", "estimate": "gain"}),
    ("rfc(ts2) sample ratio", "rfc", {"base": "taylorseer", "order": 2, "norm": "sample"}),
]


def main(argv=None):
    ap = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--clip", type=float, nargs="*", default=[])
    ap.add_argument("--only-clip", action="store_true", help="only the rfc sample ratio rows with --clip values")
    a = ap.parse_args(argv)
    sw = Sweep.from_args(a)
    variants = ([] if a.only_clip else list(VARIANTS)) + [
        (f"rfc sample ratio clip {c:g}", "rfc", {"norm": "sample", "clip": c}) for c in a.clip]

    def cell(method, options):
        return lambda n: f"{sw.psnr(sw.generate(sw.config(n, method=method, method_options=options)).x):.1f}"

    print(f"model {sw.name}, {a.samples} samples, PSNR dB vs full compute")
    sw.table([(label, cell(method, options)) for label, method, options in variants], a.intervals)


if __name__ == "__main__":
    main()

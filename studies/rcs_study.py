"""RCS readings on the shipped DiTs at equal compute: for each N, the fixed schedule's PSNR and
that of RCS variants whose threshold is calibrated (on the first 10 samples, as the harness does)
to compute as many steps of a generation as the fixed schedule (docs/method.md, "RFC").

    OMP_NUM_THREADS=1 python studies/rcs_study.py --model digits --samples 20
"""

import argparse

from foca_kernels.demo.harness import ADAPTIVE, HarnessConfig, calibrate_rcs

from sweep import Sweep, add_arguments

VARIANTS = {
    "accumulated, max gap 2N": dict(rcs_accumulate=True),
    "per step, max gap 2N": dict(rcs_accumulate=False),
    "accumulated, max gap N+1": dict(rcs_accumulate=True, rcs_max_gap=None),
}


def main(argv=None):
    ap = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    ap.add_argument("--methods", nargs="+", default=["foca", "rfc"],  # the demo's RCS runs, by their method
                    choices=[m[:-len("-rcs")] for m in ADAPTIVE])
    a = ap.parse_args(argv)
    sw = Sweep.from_args(a)

    def fixed(method):
        def run(n):
            cfg = sw.config(n, method=method)
            return f"{sw.psnr(sw.generate(cfg).x):.1f} ({cfg.pattern(sw.steps).count('F')})"
        return run

    def rcs(method, options):
        def run(n):
            o = dict(options)
            if "rcs_max_gap" in o:
                o["rcs_max_gap"] = n + 1
            hc = HarnessConfig(methods=[f"{method}-rcs"], intervals=[n], samples=a.samples, num_steps=sw.steps,
                               model=sw.name, model_dir=a.model_dir, rcs_options=o, progress=False)
            threshold = calibrate_rcs(sw.dit, hc, f"{method}-rcs", n, sw.labels[:10])
            r = sw.generate(hc.cache_config(f"{method}-rcs", n, threshold))
            return f"{sw.psnr(r.x):.1f} ({r.info.pattern.count('F')})"
        return run

    print(f"model {sw.name}, {a.samples} samples, PSNR dB vs full compute (RCS: threshold calibrated to the "
          "fixed schedule's full steps; realised full steps in brackets)")
    rows = []
    for method in a.methods:
        rows.append((f"{method} fixed", fixed(method)))
        rows += [(f"{method} rcs {label}", rcs(method, options)) for label, options in VARIANTS.items()]
    sw.table(rows, a.intervals, first="method, schedule")


if __name__ == "__main__":
    main()

"""Intrinsic-dimension estimators on manifolds of known dimension: ours against scikit-dimension, same points.

For each manifold of skdim's benchmark (Hein & Audibert 2005; Campadelli et al. 2015, via
``skdim.datasets.BenchmarkManifolds``, generated offline), each size n and noise level, TwoNN, MLE and lPCA
are run by ``analysis.lid`` and by skdim on the *same* array. The table gives our estimate, its relative
error to the true dimension, and our relative difference to skdim (lPCA: whether the integers are equal).

    python benchmarks/validate_id.py                 # full table -> benchmarks/results/validate_id.md
    python benchmarks/validate_id.py --n 1000 --noise 0 --out -   # smaller, printed only

Runs in about two minutes on 2 CPU cores (skdim's per-point lPCA.fit_pw takes most of it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import skdim  # noqa: E402
import torch  # noqa: E402

from analysis.lid import MLE, TwoNN, lPCA  # noqa: E402

# Low- to high-dimensional, linear and curved; true dimensions 1 to 20.
MANIFOLDS = [
    "M5a_Helix1d",
    "M7_Roll",
    "M11_Moebius",
    "M2_Affine_3to5",
    "M4_Nonlinear",
    "M1_Sphere",
    "M10a_Cubic",
    "M9_Affine",
    "M12_Norm",
]
K_MLE = 20  # skdim's default n_neighbors for MLE
K_PW = 64  # neighbourhood of the pointwise lPCA (as TwoNN.fit_pw's default)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(sizes: list[int], noises: list[float], seed: int) -> tuple[list[dict], dict[str, float]]:
    rows, seconds = [], {"ours": 0.0, "skdim": 0.0, "ours_pw": 0.0, "skdim_pw": 0.0}
    for n in sizes:
        for noise in noises:
            bm = skdim.datasets.BenchmarkManifolds(random_state=seed)
            truth = bm.truth["Intrinsic Dimension"]
            # generate(name) fails for some names in skdim 0.5; generating all of them is cheap.
            data = bm.generate(n=n, noise=noise)
            for name in MANIFOLDS:
                X, d = data[name], int(truth[name])
                ours_t, t1 = _timed(lambda X=X: TwoNN().fit(X).dimension_)
                ours_m, t2 = _timed(lambda X=X: MLE(n_neighbors=K_MLE).fit(X).dimension_)
                ours_p, t3 = _timed(lambda X=X: lPCA().fit(X).dimension_)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # skdim's lPCA gap_ divides by zero eigenvalues
                    ref_t, s1 = _timed(lambda X=X: skdim.id.TwoNN().fit(X).dimension_)
                    ref_m, s2 = _timed(lambda X=X: skdim.id.MLE().fit(X, n_neighbors=K_MLE, comb="mle").dimension_)
                    ref_p, s3 = _timed(lambda X=X: skdim.id.lPCA().fit(X).dimension_)
                    ref_pw, s4 = _timed(lambda X=X: skdim.id.lPCA().fit_pw(X, n_neighbors=K_PW).dimension_pw_)
                ours_pw, t4 = _timed(lambda X=X: lPCA().fit_pw(X, n_neighbors=K_PW).dimension_pw_)
                seconds["ours"] += t1 + t2 + t3
                seconds["skdim"] += s1 + s2 + s3
                seconds["ours_pw"] += t4
                seconds["skdim_pw"] += s4
                rows.append(
                    {
                        "manifold": name,
                        "D": X.shape[1],
                        "d": d,
                        "n": n,
                        "noise": noise,
                        "twonn": ours_t,
                        "twonn_skdim": float(ref_t),
                        "mle": ours_m,
                        "mle_skdim": float(ref_m),
                        "lpca": ours_p,
                        "lpca_skdim": int(ref_p),
                        "lpca_pw": float(np.mean(ours_pw)),
                        "lpca_pw_same": float(np.mean(ours_pw == ref_pw)),
                    }
                )
    return rows, seconds


def _est(value: float, d: int) -> str:
    return f"{value:.2f} ({(value - d) / d:+.0%})"


def _rel(a: float, b: float) -> str:
    return f"{abs(a - b) / abs(b):.0e}"


def table(rows: list[dict], seconds: dict[str, float]) -> str:
    lines = [
        "| manifold | D | d | n | noise | TwoNN (err) | vs skdim | MLE k=20 (err) | vs skdim | lPCA FO | skdim "
        f"| local lPCA k={K_PW}, mean (err) | = skdim |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['manifold']} | {r['D']} | {r['d']} | {r['n']} | {r['noise']:g} "
            f"| {_est(r['twonn'], r['d'])} | {_rel(r['twonn'], r['twonn_skdim'])} "
            f"| {_est(r['mle'], r['d'])} | {_rel(r['mle'], r['mle_skdim'])} "
            f"| {r['lpca']} | {'=' if r['lpca'] == r['lpca_skdim'] else r['lpca_skdim']} "
            f"| {_est(r['lpca_pw'], r['d'])} | {r['lpca_pw_same']:.0%} |"
        )
    rel_t = max(abs(r["twonn"] - r["twonn_skdim"]) / abs(r["twonn_skdim"]) for r in rows)
    rel_m = max(abs(r["mle"] - r["mle_skdim"]) / abs(r["mle_skdim"]) for r in rows)
    same_p = sum(r["lpca"] == r["lpca_skdim"] for r in rows)
    same_pw = min(r["lpca_pw_same"] for r in rows)

    def mare(key: str, subset: list[dict]) -> str:
        return f"{np.mean([abs(r[key] - r['d']) / r['d'] for r in subset]):.1%}" if subset else "-"

    low = [r for r in rows if r["d"] <= 5]
    high = [r for r in rows if r["d"] >= 10]
    lines += [
        "",
        f"Agreement with skdim on the same points: TwoNN max relative difference {rel_t:.1e}, "
        f"MLE {rel_m:.1e}, lPCA identical in {same_p}/{len(rows)} cases, local lPCA identical at "
        f"{same_pw:.2%} of points or more.",
        "",
        "Mean absolute relative error to the true dimension (d <= 5 / d >= 10): "
        f"TwoNN {mare('twonn', low)} / {mare('twonn', high)}, MLE {mare('mle', low)} / {mare('mle', high)}, "
        f"lPCA {mare('lpca', low)} / {mare('lpca', high)}, "
        f"local lPCA {mare('lpca_pw', low)} / {mare('lpca_pw', high)}.",
        "",
        f"Time for all global fits: ours {seconds['ours']:.1f} s, skdim {seconds['skdim']:.1f} s; "
        f"pointwise lPCA: ours {seconds['ours_pw']:.1f} s, skdim {seconds['skdim_pw']:.1f} s "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 4000], help="points per manifold")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01], help="skdim noise levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/validate_id.md"), help="'-' to skip")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, seconds = run(args.n, args.noise, args.seed)
    text = table(rows, seconds)
    print(text)
    if args.out != "-":
        header = (
            "# Intrinsic-dimension validation: ours vs scikit-dimension on manifolds of known dimension\n\n"
            f"`python benchmarks/validate_id.py` (skdim {skdim.__version__}, torch {torch.__version__}, "
            f"seed {args.seed}; skdim's BenchmarkManifolds with uniform noise of the given width). "
            "D: ambient dimension, d: true intrinsic dimension; (err): relative error of our estimate to d; "
            "vs skdim: |ours - skdim| / skdim on the same points; lPCA: '=' when skdim gives the same integer.\n\n"
        )
        Path(args.out).write_text(header + text + "\n")
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

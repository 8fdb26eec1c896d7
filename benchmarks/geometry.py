"""Geometry estimators side by side in one run: our kNN core, TwoNN/MLE and TDA vs skdim and ripser.

For every shape the reference is "the full-matmul limit": the FLOPs of the full n x n x d pairwise product
(2 n^2 d) divided by the float32 GFLOP/s this machine reaches on exactly that matmul, measured in the same
run, interleaved with our estimators (matmul, TwoNN, MLE, shared, matmul, ...) so that the shared machine's
drifting speed hits both sides of the ratio alike. Timings are the minimum of ``--repeats`` runs; reference
implementations that take longer than ~20 s are run once. Writes ``benchmarks/results/geometry.json`` and
``geometry.md``.

    python benchmarks/geometry.py               # ~6 minutes on a 2-core CPU
    python benchmarks/geometry.py --repeats 9
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAPES = [(2000, 128), (5000, 768), (20000, 768)]
SKDIM_BUDGET_S = 60.0


def cloud(n: int, d: int, seed: int = 0, rank: int = 30, noise: float = 0.1) -> torch.Tensor:
    """Hidden-state-like float32 cloud: a rank-``rank`` Gaussian embedded in R^d plus isotropic noise,
    generated in row chunks so that no large temporaries exist."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, d, generator=g) / rank**0.5
    X = torch.empty(n, d)
    for s in range(0, n, 2000):
        e = min(n, s + 2000)
        X[s:e] = torch.randn(e - s, rank, generator=g) @ A + noise * torch.randn(e - s, d, generator=g)
    return X


def timed(fn, repeats: int) -> tuple[float, object]:
    """Minimum wall time over ``repeats`` calls (one call if the first takes > 20 s) and the last result."""
    best, out = float("inf"), None
    for r in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        if r == 0 and best > 20:
            break
    return best, out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def interleaved(fns: dict, repeats: int) -> dict:
    """Wall times (one per round) and last result of each function, the functions run in turn ``repeats``
    times, so that drift of a shared machine's speed hits all of them alike (a ratio of two is then fair)."""
    times = {name: [] for name in fns}
    out = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], out[name]) for name in fns}


def round_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: robust to a loaded machine, where the
    minima of the two may come from rounds under different load."""
    return statistics.median(t / r for t, r in zip(times, ref, strict=True))


def bench_lid(repeats: int) -> tuple[dict, dict]:
    """Our global estimators interleaved with the full matmul of the same shape ("the limit"), then skdim's."""
    import skdim

    from analysis.lid import MLE, TwoNN, twonn_mle

    out, limits = {}, {}
    skdim_rate = None  # seconds per (n^2 d) of skdim's MLE at the previous shape, to predict the next
    for n, d in SHAPES:
        key = f"{n}x{d}"
        X = cloud(n, d)
        Xn = X.numpy()
        timed_ = interleaved(
            {
                "limit": lambda X=X: X @ X.T,
                "twonn": lambda X=X: TwoNN().fit(X).dimension_,
                "mle": lambda X=X: MLE(n_neighbors=20).fit(X).dimension_,
                "shared": lambda X=X: twonn_mle(X, n_neighbors=20),
            },
            repeats,
        )
        lims = timed_["limit"][0]
        lim = min(lims)
        flops = 2.0 * n * n * d
        limits[key] = {"matmul_s": lim, "gflops": flops / lim / 1e9, "limit_s": lim}
        print(f"[limit] {key}: full matmul {lim:.3f} s = {flops / lim / 1e9:.0f} GFLOP/s", flush=True)
        (ts_tw, tw), (ts_mle, mle), (ts_sh, (tw2, mle2)) = timed_["twonn"], timed_["mle"], timed_["shared"]
        t_tw, t_mle, t_sh = min(ts_tw), min(ts_mle), min(ts_sh)
        row = {
            "ours_twonn_s": t_tw,
            "ours_mle_s": t_mle,
            "ours_twonn_mle_s": t_sh,
            "twonn_over_limit": t_tw / lim,
            "mle_over_limit": t_mle / lim,
            "twonn_mle_over_limit": t_sh / lim,
            "twonn_mle_over_limit_median_round": round_ratio(ts_sh, lims),
            "twonn": tw,
            "mle": mle,
            # twonn_mle keeps float32 search values good to ~1e-5 where the estimators alone recompute all.
            "shared_vs_separate_rel_diff": max(rel(tw2, tw), rel(mle2, mle)),
        }
        predicted = None if skdim_rate is None else skdim_rate * n * n * d
        if predicted is not None and predicted > SKDIM_BUDGET_S:
            row["skdim"] = f"skipped: predicted {predicted:.0f} s per estimator from the previous shape"
        else:
            reps = 1 if n >= 20000 else repeats
            t_stw, stw = timed(lambda Xn=Xn: skdim.id.TwoNN().fit(Xn).dimension_, reps)
            t_smle, smle = timed(lambda Xn=Xn: skdim.id.MLE().fit(Xn, n_neighbors=20, comb="mle").dimension_, reps)
            skdim_rate = max(t_stw, t_smle) / (n * n * d)
            row.update(
                {
                    "skdim_twonn_s": t_stw,
                    "skdim_mle_s": t_smle,
                    "skdim_twonn": float(stw),
                    "skdim_mle": float(smle),
                    "twonn_rel_diff": rel(tw, stw),
                    "mle_rel_diff": rel(mle, smle),
                    "speedup_twonn": t_stw / t_tw,
                    "speedup_mle": t_smle / t_mle,
                    "speedup_shared_vs_skdim_both": (t_stw + t_smle) / t_sh,
                }
            )
        out[key] = row
        print(f"[lid] {key}: {json.dumps(row, default=str)}", flush=True)
    return limits, out


def bench_pointwise(repeats: int) -> dict:
    import skdim

    from analysis.lid import TwoNN

    X = cloud(5000, 768, seed=1)
    t_ours, ours = timed(lambda: TwoNN().fit_pw(X, n_neighbors=64).dimension_pw_, repeats)
    t_ref, ref = timed(lambda: skdim.id.TwoNN().fit_pw(X.numpy(), n_neighbors=64).dimension_pw_, 1)
    diff = np.abs(ours - ref) / np.abs(ref)
    row = {
        "shape": "5000x768",
        "n_neighbors": 64,
        "ours_s": t_ours,
        "skdim_s": t_ref,
        "speedup": t_ref / t_ours,
        "median_rel_diff": float(np.median(diff)),
        "p99_rel_diff": float(np.quantile(diff, 0.99)),
        "mean_lid_ours": float(ours.mean()),
        "mean_lid_skdim": float(ref.mean()),
    }
    print(f"[pointwise] {json.dumps(row)}", flush=True)
    return row


def bench_tda(repeats: int) -> dict:
    from ripser import ripser

    from analysis.tda import PersistentHomology, maxmin_landmarks

    out = {}
    ripser_too_slow = False
    for n in (1000, 2000, 20000):
        X = cloud(n, 768, seed=2)
        t_ours, ph = timed(lambda X=X: PersistentHomology(n_landmarks=500).fit(X), repeats)
        t_lm, _ = timed(lambda X=X: maxmin_landmarks(X, 500), repeats)
        row = {"ours_s": t_ours, "landmarks_s": t_lm, "ripser_on_landmarks_s": None, "features": ph.features_}
        L = X[ph.landmarks_].numpy().astype(np.float64)
        row["ripser_on_landmarks_s"], ref_l = timed(lambda L=L: ripser(L, maxdim=1)["dgms"], 1)
        row["diagrams_equal_ripser_on_landmarks"] = bool(
            all(
                a.shape == b.shape and np.allclose(np.sort(a, 0), np.sort(b, 0), rtol=1e-9, atol=1e-12)
                for a, b in zip(ph.diagrams_, ref_l, strict=True)
            )
        )
        if n <= 2000 and not ripser_too_slow:
            t_full, full = timed(lambda X=X: ripser(X.numpy().astype(np.float64), maxdim=1)["dgms"], 1)
            row["ripser_all_points_s"] = t_full
            row["speedup_vs_ripser_all_points"] = t_full / t_ours
            row["ripser_all_points_h1_bars"] = len(full[1])
            ripser_too_slow = t_full > 60
        out[f"{n}x768"] = row
        print(f"[tda] {n}x768: {json.dumps(row, default=float)}", flush=True)
    return out


_MEMORY_CHILD = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from benchmarks.geometry import cloud
from analysis.knn import knn_from_points
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
X = cloud(20000, 768)
knn_from_points(X[:3000], 20)  # load kernels before the baseline
base = rss()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
th = threading.Thread(target=sample)
th.start()
knn_from_points(X, 20)
done.set()
th.join()
print(base, max(peak[0], rss()))
"""


def bench_memory() -> dict:
    """Peak RSS growth of knn_from_points(20000 x 768 float32, k=20) in a fresh process: resident set size
    sampled every 0.5 ms from /proc/self/statm during the call, minus the RSS just before it (input and a
    warm-up already allocated)."""
    from analysis.knn import _POOL_FACTOR

    code = _MEMORY_CHILD.format(root=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, peak = (int(v) for v in res.stdout.split()[-2:])
    n, d, k = 20000, 768, 20
    row = {
        "shape": f"{n}x{d} float32, k={k}",
        "method": "RSS sampled every 0.5 ms from /proc/self/statm during the call minus RSS before, fresh process",
        "peak_growth_mib": (peak - base) / 2**20,
        "input_mib": n * d * 4 / 2**20,
        "largest_block_mib": 2**22 * 4 / 2**20,
        "float64_centred_copy_mib": n * d * 8 / 2**20,
        "running_topk_pools_mib": n * _POOL_FACTOR * k * (4 + 8) / 2**20,
    }
    print(f"[memory] {json.dumps(row)}", flush=True)
    return row


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Geometry benchmark (`python benchmarks/geometry.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, {m['date']}; 1-minute load average {m['load_average_1min_at_start']:.1f} at the start "
        f"and {res['load_average_1min_at_end']:.1f} at the end ({m['cores']} cores: above ~{m['cores']} the machine "
        f"was shared). Times: minimum of {res['repeats']} runs, the limit interleaved with ours (reference runs over "
        "20 s: one run). Data: float32 rank-30 Gaussian in R^d plus noise 0.1.",
        "",
        "## The full-matmul limit (float32 `X @ X.T`, 2 n^2 d FLOPs)",
        "",
        "| shape | matmul / limit | GFLOP/s |",
        "|---|---|---|",
    ]
    for key, r in res["limits"].items():
        lines.append(f"| {key} | {r['limit_s']:.3f} s | {r['gflops']:.0f} |")
    lines += [
        "",
        "## Global TwoNN and MLE (k = 20)",
        "",
        "| shape | ours TwoNN | ours MLE | ours twonn_mle (shared) | shared / limit (minima; median of rounds) "
        "| skdim TwoNN | skdim MLE | rel. diff TwoNN | rel. diff MLE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res["lid"].items():
        if "skdim_twonn_s" in r:
            sk = (
                f"{r['skdim_twonn_s']:.2f} s | {r['skdim_mle_s']:.2f} s | {r['twonn_rel_diff']:.1e} "
                f"| {r['mle_rel_diff']:.1e}"
            )
        else:
            sk = f"{r['skdim']} | | |"
        lines.append(
            f"| {key} | {r['ours_twonn_s']:.3f} s ({r['twonn_over_limit']:.2f}x) | {r['ours_mle_s']:.3f} s "
            f"({r['mle_over_limit']:.2f}x) | {r['ours_twonn_mle_s']:.3f} s | **{r['twonn_mle_over_limit']:.2f}x**; "
            f"{r['twonn_mle_over_limit_median_round']:.2f}x | {sk} |"
        )
    p = res["pointwise"]
    lines += [
        "",
        "## Pointwise TwoNN (`fit_pw`, n_neighbors = 64, 5000 x 768)",
        "",
        "| ours | skdim | speed-up | median rel. diff | p99 rel. diff | mean LID ours / skdim |",
        "|---|---|---|---|---|---|",
        f"| {p['ours_s']:.2f} s | {p['skdim_s']:.1f} s | {p['speedup']:.0f}x | {p['median_rel_diff']:.1e} "
        f"| {p['p99_rel_diff']:.1e} | {p['mean_lid_ours']:.3f} / {p['mean_lid_skdim']:.3f} |",
        "",
        "## Persistent homology (500 max-min landmarks, H0 + H1)",
        "",
        "| shape | ours (landmarks + ripser) | of which landmarks | ripser on the landmarks alone | ripser on all "
        "points | diagrams = ripser(X[landmarks]) |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in res["tda"].items():
        full = f"{r['ripser_all_points_s']:.1f} s" if "ripser_all_points_s" in r else "not run"
        lines.append(
            f"| {key} | {r['ours_s']:.2f} s | {r['landmarks_s']:.2f} s | {r['ripser_on_landmarks_s']:.2f} s "
            f"| {full} | {r['diagrams_equal_ripser_on_landmarks']} |"
        )
    mem = res["memory"]
    lines += [
        "",
        "## Peak memory of the kNN core",
        "",
        f"{mem['shape']}: peak RSS growth **{mem['peak_growth_mib']:.0f} MiB** ({mem['method']}); input "
        f"{mem['input_mib']:.0f} MiB, largest distance block {mem['largest_block_mib']:.0f} MiB, running top-k pools "
        f"{mem['running_topk_pools_mib']:.0f} MiB, float64 centred copy for the refinement "
        f"{mem['float64_centred_copy_mib']:.0f} MiB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    start = time.perf_counter()
    res = {"machine": machine(), "repeats": args.repeats}
    res["limits"], res["lid"] = bench_lid(args.repeats)
    res["pointwise"] = bench_pointwise(args.repeats)
    res["tda"] = bench_tda(args.repeats)
    res["memory"] = bench_memory()
    res["total_s"] = time.perf_counter() - start
    res["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "geometry.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (args.out / "geometry.md").write_text(markdown(res))
    print(f"total {res['total_s']:.0f} s; wrote {args.out / 'geometry.json'} and geometry.md")


if __name__ == "__main__":
    main()

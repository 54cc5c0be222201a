"""How long ``medray probe``'s curves take: 20,000 embeddings x 10 training-set sizes x 5 repeats.

Synthetic 768-d embeddings of 5,000 patients (4 records each) with two labels that a
linear head can partly find; the curve computation of ``medray probe``
(:func:`medray.platform.probing.learning_curves`) is timed per head, in-process (the job
adds reading the output and writing JSON). Writes ``benchmarks/results/probe.json``.

    python benchmarks/probe.py [--records 20000] [--dim 768] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from medray.platform.probing import ProbeData, learning_curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--per-patient", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heads", default="logreg,mlp")
    ap.add_argument("--out", default="benchmarks/results/probe.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    patients = args.records // args.per_patient
    owner = np.repeat(np.arange(patients), args.per_patient)
    latent = rng.normal(size=(patients, 2))[owner]
    y = (latent + rng.normal(size=(len(owner), 2)) * 0.7 > 0).astype(np.float64)
    x = rng.normal(size=(len(owner), args.dim)).astype(np.float32)
    x[:, :2] += (0.3 * latent).astype(np.float32)
    data = ProbeData(x, y, owner.astype(str), ["a", "b"])
    results = {}
    for head in args.heads.split(","):
        t0 = time.perf_counter()
        curves = learning_curves(data, heads=[head], repeats=args.repeats, seed=0)
        results[head] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "sizes": curves["sizes"],
            "auroc_mean": curves["curves"][head]["auroc_mean"],
        }
        print(f"{head}: {results[head]['seconds']} s for {len(curves['sizes'])} sizes x {args.repeats} repeats")
    doc = {
        "benchmark": "probe",
        "records": len(owner),
        "patients": patients,
        "dim": args.dim,
        "repeats": args.repeats,
        "heads": results,
        "total_seconds": round(sum(r["seconds"] for r in results.values()), 2),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m": os.getloadavg()[0],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"total {doc['total_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()

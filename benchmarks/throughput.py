"""Whole-process throughput: ``medray embed`` against a plain single-process loop; writes JSON.

Regimes (each a ratio measured side by side in one run, the two commands
interleaved, best of ``--rounds``):

* ``decode``: JPEG 2000 lossless 512² 12-bit DICOMs and a tiny ViT (64 px, 2
  layers), so decoding is the work;
* ``overhead``: 32×32 PNGs and the same tiny ViT, so per-record cost is the work;
* ``resume``: ``medray embed`` run again on its finished ``overhead`` output
  (nothing left to do);
* ``ceiling``: plain loops on half the ``overhead`` inputs: as written (torch's
  threads on every core), with one thread, and two one-thread loops at once:
  what two cores allow for this work;
* ``growth``: ``medray embed`` alone on 2,000, 20,000 and 200,000 small PNGs:
  wall time per size, seconds per extra record, the driver's peak memory.

The ``overhead`` regime also runs on half its inputs, so the marginal rate
(extra records ÷ extra seconds, start-up cancelled) is reported for both.

The plain loop is what a research group would write: list the files, read,
decode and preprocess each with the same functions medray uses (so the
embeddings can be compared), run the model in batches, write one Parquet file;
no Ray. Both are timed as whole processes (imports, Ray start-up and all);
their steady rates (records/s after start-up) are reported beside.

Usage::

    python benchmarks/throughput.py [--regimes decode,overhead,resume] [--n-decode 1200] [--n-overhead 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MEDRAY = str(Path(sys.executable).with_name("medray"))


def _make_pngs(root: Path, n: int, size: int = 32) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if len(list(root.glob("*.png"))) == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:06d}.png")


def _make_dicoms(root: Path, n: int, size: int = 512) -> None:
    sys.path.insert(0, str(HERE))
    from embed_pipeline import _make_dicoms as make  # the repo's DICOM generator (12-bit CR)

    root.mkdir(parents=True, exist_ok=True)
    if len(list(root.glob("*.dcm"))) != n:
        make(root, n, size, "j2k")


def _make_checkpoint(root: Path) -> str:
    sys.path.insert(0, str(HERE))
    from embed_pipeline import _make_checkpoint as make

    out = root / "ckpt"
    if not (out / "config.json").is_file():
        make(root, image_size=64, hidden=192, layers=2)
    return str(out)


def loop(input_dir: str, ckpt: str, out: str, batch: int) -> None:
    """The plain single-process loop (run as ``throughput.py loop ...``): prints JSON with its rates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medray.encoders import create_encoder, create_preprocessor, get_spec
    from medray.platform.decoders import decode_bytes

    t_import = time.perf_counter()
    spec = get_spec("hf_image", checkpoint=ckpt)
    enc, pre = create_encoder(spec), create_preprocessor(spec)
    paths = sorted(p for p in Path(input_dir).iterdir() if p.is_file())
    names, vectors, pending, pending_names = [], [], [], []
    t0 = time.perf_counter()
    for p in paths:
        dec = decode_bytes(p.read_bytes(), name=p.name)
        pending.append(pre.preprocess([f.image for f in dec.frames]))
        pending_names.append(str(p))
        if len(pending) == batch:
            vectors.append(enc.embed(np.concatenate(pending)))
            names += pending_names
            pending, pending_names = [], []
    if pending:
        vectors.append(enc.embed(np.concatenate(pending)))
        names += pending_names
    emb = np.concatenate(vectors).astype(np.float32)
    pq.write_table(
        pa.table({"uri": names, "embedding": pa.array(list(emb), pa.list_(pa.float32(), emb.shape[1]))}),
        Path(out) / "loop.parquet",
    )
    t1 = time.perf_counter()
    print(
        json.dumps({"records": len(names), "loop_s": t1 - t0, "setup_s": t0 - t_import, "rate": len(names) / (t1 - t0)})
    )


def _run(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return wall, proc.stdout


def _medray(input_dir: Path, out: Path, ckpt: str, extra: list[str]) -> list[str]:
    return [
        MEDRAY,
        "embed",
        f"input={input_dir}",
        f"output={out}",
        "encoder=hf_image",
        f"encoder.checkpoint={ckpt}",
        "tracking.enabled=false",
        *extra,
    ]


def _parity(loop_out: Path, medray_out: Path) -> float:
    import pyarrow.parquet as pq

    a = pq.read_table(loop_out / "loop.parquet").to_pydict()
    b = pq.read_table(medray_out / "embeddings").select(["uri", "embedding"]).to_pydict()
    mine = dict(zip(b["uri"], b["embedding"]))
    worst = 0.0
    for uri, vec in zip(a["uri"], a["embedding"]):
        other = mine.get(uri) or mine.get("file://" + uri)
        if other is None:
            return float("inf")
        worst = max(worst, float(np.abs(np.asarray(vec) - np.asarray(other)).max()))
    return worst


def regime(name: str, input_dir: Path, work: Path, ckpt: str, rounds: int, batch: int, extra: list[str]) -> dict:
    """``medray embed`` vs the loop, interleaved; best of ``rounds`` each."""
    import shutil

    env = dict(os.environ, MEDRAY_PROGRESS="0")
    loops, pipes = [], []
    parity = None
    for r in range(rounds):
        loop_out = work / f"{name}-loop-{r}"
        shutil.rmtree(loop_out, ignore_errors=True)
        loop_out.mkdir(parents=True)
        wall, out = _run(
            [sys.executable, str(Path(__file__)), "loop", str(input_dir), ckpt, str(loop_out), str(batch)], env
        )
        loops.append({"wall_s": wall, **json.loads(out.strip().splitlines()[-1])})
        med_out = work / f"{name}-medray-{r}"
        shutil.rmtree(med_out, ignore_errors=True)
        wall, _ = _run(_medray(input_dir, med_out, ckpt, extra), env)
        summary = json.loads((med_out / "summary.json").read_text())
        pipes.append(
            {
                "wall_s": wall,
                "records": summary.get("records_embedded"),
                "steady_records_per_s": summary.get("steady_records_per_s"),
                "pipeline_s": summary.get("pipeline_s"),
                "first_row_s": summary.get("first_row_s"),
                "driver_peak_rss_mb": summary.get("driver_peak_rss_mb"),
                "driver_seconds": summary.get("driver_seconds"),
            }
        )
        if parity is None:
            parity = _parity(loop_out, med_out)
        print(f"{name} round {r}: loop {loops[-1]['wall_s']:.1f}s, medray {wall:.1f}s", flush=True)
    best_loop = min(loops, key=lambda x: x["wall_s"])
    best_pipe = min(pipes, key=lambda x: x["wall_s"])
    cores = os.cpu_count() or 1
    steady = best_pipe["steady_records_per_s"]
    return {
        "records": best_loop["records"],
        "loop": best_loop,
        "medray": best_pipe,
        "medray_vs_loop_wall": best_loop["wall_s"] / best_pipe["wall_s"],
        "steady_vs_cores_x_loop_rate": (steady / (cores * best_loop["rate"])) if steady else None,
        "parity_max_abs_diff": parity,
        "rounds": {"loop": loops, "medray": pipes},
    }


def _subset(src: Path, dst: Path, n: int, skip: int = 0) -> Path:
    """``dst`` holding hard links to ``n`` files of ``src`` after the first ``skip`` (same bytes, no copies)."""
    files = sorted(src.iterdir())[skip : skip + n]
    if dst.is_dir() and len(list(dst.iterdir())) == n:
        return dst
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in files:
        os.link(f, dst / f.name)
    return dst


def marginal(half: dict, full: dict) -> dict:
    """Extra records ÷ extra seconds between a run on half the inputs and one on all (start-up cancels)."""
    extra = full["records"] - half["records"]
    loop = extra / (full["loop"]["wall_s"] - half["loop"]["wall_s"])
    mine = extra / (full["medray"]["wall_s"] - half["medray"]["wall_s"])
    return {
        "records": [half["records"], full["records"]],
        "loop_records_per_s": loop,
        "medray_records_per_s": mine,
        "medray_vs_loop": mine / loop,
    }


def ceiling(src: Path, work: Path, ckpt: str, batch: int, rounds: int) -> dict:
    """What two cores allow here for this work, measured with plain loops on half the inputs.

    * ``one_loop_default_threads_s``: one loop as written (torch uses every core inside the model);
    * ``one_loop_one_thread_s``: one loop with one torch/OpenMP thread;
    * ``two_loops_one_thread_each_s``: two such loops at once, one per half.

    ``parallel_speedup`` = 2 x one single-threaded loop / two at once (2.0 on two independent cores);
    ``default_threads_speedup`` = the single-threaded loop / the default one (what torch's own threads
    already take of the second core, which a plain loop gets for free).
    """
    n = len(list(src.iterdir()))
    halves = [_subset(src, work / f"in-ceiling-{k}", n // 2, skip=k * (n // 2)) for k in (0, 1)]
    env = dict(os.environ, MEDRAY_PROGRESS="0")
    one = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def cmd(d: Path, k: int) -> list[str]:
        out = work / f"ceiling-loop-{k}"
        out.mkdir(parents=True, exist_ok=True)
        return [sys.executable, str(Path(__file__)), "loop", str(d), ckpt, str(out), str(batch)]

    def timed(e: dict) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd(halves[0], 0), check=True, capture_output=True, env=e)
        return time.perf_counter() - t0

    default, single, pairs = [], [], []
    for _ in range(rounds):
        default.append(timed(env))
        single.append(timed(one))
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(cmd(d, k), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one)
            for k, d in enumerate(halves)
        ]
        for proc in procs:
            proc.wait()
        pairs.append(time.perf_counter() - t0)
        print(f"ceiling: loop {default[-1]:.1f}s, 1 thread {single[-1]:.1f}s, two at once {pairs[-1]:.1f}s", flush=True)
    return {
        "records_each": n // 2,
        "one_loop_default_threads_s": min(default),
        "one_loop_one_thread_s": min(single),
        "two_loops_one_thread_each_s": min(pairs),
        "parallel_speedup": 2 * min(single) / min(pairs),
        "default_threads_speedup": min(single) / min(default),
        "rounds": {"default": default, "one_thread": single, "two_at_once": pairs},
    }


def growth(src: Path, work: Path, ckpt: str, sizes: list[int], extra: list[str]) -> dict:
    """``medray embed`` on growing inputs: wall time, rate and the driver's peak memory per size."""
    import shutil

    env = dict(os.environ, MEDRAY_PROGRESS="0")
    points = []
    for n in sizes:
        d = src if n == max(sizes) else _subset(src, work / f"in-growth-{n}", n)
        out = work / f"growth-{n}"
        shutil.rmtree(out, ignore_errors=True)
        wall, _ = _run(_medray(d, out, ckpt, extra), env)
        summary = json.loads((out / "summary.json").read_text())
        points.append(
            {
                "records": n,
                "wall_s": wall,
                "records_per_s": n / wall,
                "driver_peak_rss_mb": summary.get("driver_peak_rss_mb"),
                "first_row_s": summary.get("first_row_s"),
            }
        )
        print(f"growth {n}: {wall:.1f}s, driver {summary.get('driver_peak_rss_mb')} MB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    # linear: the seconds per extra record of each step, against the first step's
    per = [
        (b["wall_s"] - a["wall_s"]) / (b["records"] - a["records"]) for a, b in zip(points, points[1:], strict=False)
    ]
    rss = [p["driver_peak_rss_mb"] for p in points if p["driver_peak_rss_mb"] is not None]
    return {
        "points": points,
        "seconds_per_extra_record": per,
        "marginal_cost_ratio_last_vs_first": per[-1] / per[0] if len(per) > 1 and per[0] > 0 else None,
        "driver_peak_rss_growth_mb": (max(rss) - min(rss)) if rss else None,
    }


def resume(input_dir: Path, work: Path, ckpt: str, rounds: int, extra: list[str]) -> dict:
    """``medray embed`` again on a finished output: nothing to do."""
    env = dict(os.environ, MEDRAY_PROGRESS="0")
    out = work / "overhead-medray-0"
    if not (out / "summary.json").is_file():
        _run(_medray(input_dir, out, ckpt, extra), env)
    walls = []
    for _ in range(rounds):
        wall, _ = _run(_medray(input_dir, out, ckpt, extra), env)
        walls.append(wall)
    summary = json.loads((out / "summary.json").read_text())
    return {"records_in_output": summary.get("records_total_in_output"), "rerun_wall_s": walls, "best_s": min(walls)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loop":
        loop(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regimes", default="decode,overhead,resume,growth")
    ap.add_argument("--n-decode", type=int, default=1200)
    ap.add_argument("--n-overhead", type=int, default=20000)
    ap.add_argument("--n-growth", default="2000,20000,200000", help="input sizes of the growth regime")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--work", default=os.path.join(os.environ.get("MEDRAY_HOME", ".medray"), "bench-throughput"))
    ap.add_argument("--extra", default="", help="more medray overrides, space separated")
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = _make_checkpoint(work)
    extra = [e for e in args.extra.split() if e]
    regimes = [r for r in args.regimes.split(",") if r]
    result: dict = {
        "benchmark": "throughput",
        "hardware": {"cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "model": "ViT hidden=192 layers=2 image=64 (random)",
        "extra_overrides": extra,
        "load_avg_before": os.getloadavg(),
    }
    if "decode" in regimes:
        d = work / "in-decode"
        _make_dicoms(d, args.n_decode)
        result["decode"] = regime("decode", d, work, ckpt, args.rounds, args.batch, extra)
    if "overhead" in regimes or "resume" in regimes:
        o = work / "in-overhead"
        _make_pngs(o, args.n_overhead)
        if "overhead" in regimes:
            half = _subset(o, work / "in-overhead-half", args.n_overhead // 2)
            result["overhead_half"] = regime("overhead-half", half, work, ckpt, args.rounds, args.batch, extra)
            result["overhead"] = regime("overhead", o, work, ckpt, args.rounds, args.batch, extra)
            result["overhead_marginal"] = marginal(result["overhead_half"], result["overhead"])
        if "resume" in regimes:
            result["resume"] = resume(o, work, ckpt, args.rounds, extra)
    if "ceiling" in regimes:
        o = work / "in-overhead"
        _make_pngs(o, args.n_overhead)
        result["ceiling"] = ceiling(o, work, ckpt, args.batch, args.rounds)
    if "growth" in regimes:
        sizes = sorted(int(n) for n in args.n_growth.split(","))
        g = work / "in-growth"
        _make_pngs(g, max(sizes))
        result["growth"] = growth(g, work, ckpt, sizes, extra)
    result["load_avg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("decode", "overhead", "overhead_half")}, indent=2))
    for k in ("decode", "overhead"):
        if k in result:
            r = result[k]
            print(
                k, f"wall ratio {r['medray_vs_loop_wall']:.2f}", f"steady/cores*loop {r['steady_vs_cores_x_loop_rate']}"
            )


if __name__ == "__main__":
    main()

"""``rellax-fast bench data``: the data pipeline at ML-25M scale, per stage (wall time, peak RSS, bytes written).

It owns the generator of an ML-25M-shaped ``ratings.csv`` / ``movies.csv`` (seeded; never shipped: written
under ``--out``), the stage runner and the report. Stages, each in its own child process so that its peak RSS
(``os.wait4``'s ``ru_maxrss`` of that child alone) and wall time are its own:

- ``prepare``: ``rellax-fast prepare --dataset ml-25m --no-download`` on the generated files (the real loader,
  the real CTR rules, the real atomic writer);
- ``embed``: a seeded random item table (``--dim``, L2-normalised float32) written as ``.npy``. This is a
  stand-in for a text encoder, enough to measure the data path at scale; a real encoder's cost is per item
  (62k titles), not per rating, and is measured by ``bench e2e``;
- ``retrieve``: SUBR top-K (K=10, cosine, ``--topk-backend``, default cpp) through ``subr.retrieval.retrieve`` for
  a seeded sample of ``--targets`` samples spread evenly over history-length bands (5-49, 50-499, 500-4999,
  5000+ earlier ratings; the rest uniform), from the prepared folder;
- ``train-ctr``: DIN (``ctr.store.fit_din``) on the prepared folder for one epoch, evaluation passes included;
  the training rate is the epoch's samples over the epoch's time (the evaluation passes are timed apart).

Against the limit (#28): before the sizes, a child process measures the machine's GEMM rate (``torch.mm`` at
``--gemm-size`` cubed, fp32 and bf16, the best of a few repeats: the rate the cores reach in this run), and every
throughput row states its useful GFLOP/s and that as a share of the rate of its precision. Useful FLOPs:
retrieval 2 d per (target, earlier behaviour); DIN training 3x the forward's matmul FLOPs per sample
(``ctr.din.matmul_flops_per_sample`` at the padded history width), in the precision it trains in.

Bytes written: the growth of the stage's output folder. Reports: ``data.json`` and ``data.md`` under
``--out``, written atomically. Generated lengths: 20 + lognormal (mean about 154 ratings per user, as in
ML-25M), one user at ``--tail-length`` (30,000 by default: ML-25M's longest has 32,202), item popularity
Zipf-like over ``--items`` movies, per-user timestamps increasing from a uniform start in 1995-2019.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ML25M_USERS = 162_541
ML25M_ITEMS = 62_423
STAGES = ("prepare", "embed", "retrieve", "train-ctr")
GEMM_SIZE = (
    2048  # 17 GFLOP per fp32 product: ~0.1 s on 2 idle cores, large enough for the blocked kernel's peak
)
PREFILTER_BACKEND = "prefilter-bf16"  # --topk-backend value: semantic_topk(prefilter="bf16")
BANDS = ((5, 50), (50, 500), (500, 5000), (5000, None))  # history-length bands of the retrieval sample
_RATING_VALUES = np.arange(1, 11) / 2.0
_RATING_P = np.array([1.6, 3.4, 1.6, 6.8, 4.9, 19.6, 13.1, 26.6, 8.8, 13.6])  # ML-25M's histogram, roughly


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._argtypes import number

    g = parser.add_argument_group("bench data (`rellax-fast bench data`)")
    g.add_argument(
        "--users",
        default=str(ML25M_USERS),
        help=f"generated users, or comma-separated sizes run in turn (ML-25M: {ML25M_USERS})",
    )
    g.add_argument(
        "--items", type=int, default=ML25M_ITEMS, help=f"generated movies (ML-25M: {ML25M_ITEMS:,})"
    )
    g.add_argument(
        "--tail-length", type=int, default=30_000, help="one user gets this many ratings (the tail)"
    )
    g.add_argument(
        "--length-scale",
        type=number(0, low_open=True),
        default=1.0,
        help="multiplies every generated history length",
    )
    g.add_argument("--gen-seed", type=int, default=0, help="seed of the generated files and of the samples")
    g.add_argument(
        "--targets", type=int, default=100_000, help="retrieval sample size (capped at the samples)"
    )
    g.add_argument("--dim", type=int, default=384, help="item embedding size of the stand-in encoder")
    g.add_argument(
        "--topk-backend",
        default="cpp",
        help=f"semantic_topk backend for the retrieve stage (default cpp), or {PREFILTER_BACKEND!r}: the "
        "op's exact bf16 prefilter",
    )
    g.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    g.add_argument(
        "--gemm-size",
        type=int,
        default=GEMM_SIZE,
        help="n of the n x n x n torch.mm that measures the machine's GEMM rate (fp32 and bf16); 0: skip it",
    )


# --------------------------------------------------------------------------------------------- generator


def generate_movielens(
    folder,
    users: int,
    items: int = ML25M_ITEMS,
    seed: int = 0,
    max_length: int = 30_000,
    length_scale: float = 1.0,
) -> Dict[str, int]:
    """Write an ML-25M-shaped ``ratings.csv`` and ``movies.csv`` into ``folder`` (atomically); return counts.

    Rows are grouped by user, then by movie id (as in the real file); every user rates at least 20 movies
    (times ``length_scale``); the longest user is set to ``max_length``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from .._io import atomic_path

    if users < 1 or items < 1 or max_length < 1 or not length_scale > 0:
        raise ValueError(
            f"users, items, max_length and length_scale must be positive; got {users}, {items}, "
            f"{max_length}, {length_scale}"
        )
    rng = np.random.default_rng(seed)
    floor = max(1, int(round(20 * length_scale)))
    lengths = floor + np.floor(rng.lognormal(4.1 + np.log(length_scale), 1.25, users)).astype(np.int64)
    lengths = np.minimum(lengths, max_length)
    lengths[int(np.argmax(lengths))] = max(max_length, floor)
    total = int(lengths.sum())
    popularity = 1.0 / np.arange(10, items + 10) ** 0.9
    movie = rng.choice(items, size=total, p=popularity / popularity.sum()).astype(np.int64) + 1
    rating = rng.choice(_RATING_VALUES, size=total, p=_RATING_P / _RATING_P.sum()).astype(np.float32)
    user = np.repeat(np.arange(1, users + 1, dtype=np.int64), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps = rng.exponential(86_400.0, total).astype(np.int64) + 1
    clock = np.cumsum(gaps)
    first = rng.integers(789_652_004, 1_574_327_703 - 5 * 10**7, users)
    stamp = np.repeat(first - (clock[starts] - gaps[starts]), lengths) + clock
    order = np.lexsort((movie, user))  # the real file: by user, then movie
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {"userId": user[order], "movieId": movie[order], "rating": rating[order], "timestamp": stamp[order]}
    )
    with atomic_path(folder / "ratings.csv") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"userId,movieId,rating,timestamp\n")
            pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False))
    genres = np.array(
        ["Action", "Comedy", "Drama", "Romance", "Thriller", "Sci-Fi", "Animation", "Documentary"]
    )
    ids = np.arange(1, items + 1)
    g1, g2 = genres[rng.integers(0, len(genres), items)], genres[rng.integers(0, len(genres), items)]
    titles = [f"Generated Movie {i} ({1920 + i % 100})" for i in ids]
    movies = pa.table(
        {"movieId": ids, "title": titles, "genres": [f"{a}|{b}" if a != b else a for a, b in zip(g1, g2)]}
    )
    with atomic_path(folder / "movies.csv") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"movieId,title,genres\n")
            pacsv.write_csv(movies, fh, pacsv.WriteOptions(include_header=False))
    return {
        "users": users,
        "items": items,
        "ratings": total,
        "max_length": int(lengths.max()),
        "median_length": int(np.median(lengths)),
    }


# ------------------------------------------------------------------------------------------ stage bodies


def gemm_rate(n: int = GEMM_SIZE, repeats: int = 5) -> dict:
    """The machine's GEMM rate in this process: GFLOP/s of ``torch.mm`` on n x n operands in fp32 and bf16,
    the best of ``repeats`` timed products after one warm-up (the best is the rate the cores reach; a shared
    machine only slows some repeats). 2 n^3 FLOPs per product."""
    import torch

    if n < 1:
        raise ValueError(f"gemm size must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(0)
    out = {"n": n, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = 2.0 * n**3 / best / 1e9
    return out


def against_limit(gflops: float, gemm: Optional[dict], precision: str = "fp32") -> str:
    """ "X useful GFLOP/s (P% of the fp32 GEMM rate)" for a report row; without a GEMM rate, just the figure."""
    text = f"{gflops:,.1f} useful GFLOP/s"
    rate = (gemm or {}).get(f"{precision}_gflops")
    return f"{text} ({100 * gflops / rate:.1f}% of {precision} GEMM)" if rate else text


def _stage_embed(prepared: Path, out: Path, dim: int, seed: int) -> dict:
    import pandas as pd

    from .._io import atomic_write_npy

    ids = pd.read_parquet(prepared / "items.parquet").index.to_numpy(np.int64)
    emb = np.random.default_rng(seed).standard_normal((len(ids), dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("item_ids.npy", ids), ("embeddings.npy", emb)):
        atomic_write_npy(out / name, arr)
    return {"items": int(len(ids)), "dim": dim}


def retrieval_sample(data, n: int, seed: int):
    """A seeded sample of (user_index, pos) over every split, spread evenly over :data:`BANDS` of history
    length (a band with fewer samples gives all it has); the remainder is drawn uniformly."""
    ui = np.concatenate([s.user_index for s in data.splits.values()])
    pos = np.concatenate([s.pos for s in data.splits.values()])
    rng = np.random.default_rng(seed)
    n = min(n, len(pos))
    per_band, chosen = n // len(BANDS), []
    for lo, hi in BANDS:
        band = np.flatnonzero((pos >= lo) & (pos < (hi if hi is not None else np.inf)))
        chosen.append(rng.choice(band, size=min(per_band, len(band)), replace=False))
    taken = np.concatenate(chosen)
    rest = np.setdiff1d(np.arange(len(pos)), taken, assume_unique=False)
    taken = np.concatenate([taken, rng.choice(rest, size=n - len(taken), replace=False)])
    return ui[taken], pos[taken]


def _stage_retrieve(prepared: Path, emb_dir: Path, out: Path, targets: int, backend: str, seed: int) -> dict:
    from types import SimpleNamespace

    import torch

    from .._io import atomic_path
    from ..data.prepared import load_prepared
    from ..subr.retrieval import retrieve

    topk = dict(prefilter="bf16") if backend == PREFILTER_BACKEND else dict(backend=backend)
    t0 = time.perf_counter()
    data = load_prepared(prepared)
    emb = torch.from_numpy(np.load(emb_dir / "embeddings.npy"))
    ids = np.load(emb_dir / "item_ids.npy")
    ui, pos = retrieval_sample(data, targets, seed)
    load_s = time.perf_counter() - t0
    sample = SimpleNamespace(user_index=ui, pos=pos)
    retrieve(
        emb,
        data.sequences,
        SimpleNamespace(user_index=ui[:64], pos=pos[:64]),
        10,
        metric="cosine",
        **topk,
        item_ids=ids,
        show_progress=False,
    )  # warm-up (first call builds the item-row map)
    t1 = time.perf_counter()
    rpos, rscore = retrieve(
        emb, data.sequences, sample, 10, metric="cosine", **topk, item_ids=ids, show_progress=False
    )
    seconds = time.perf_counter() - t1
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "retrieved.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, user_index=ui, pos=pos, retrieved_pos=rpos.numpy(), retrieved_score=rscore.numpy())
    flops_per_candidate = 2.0 * emb.shape[1]  # one d-long dot product per (target, earlier behaviour)
    bands = {}
    for lo, hi in BANDS:  # each band again on its own: the rate by history length
        keep = (pos >= lo) & (pos < (hi or np.inf))
        if keep.any():
            t = time.perf_counter()
            retrieve(
                emb,
                data.sequences,
                SimpleNamespace(user_index=ui[keep], pos=pos[keep]),
                10,
                metric="cosine",
                **topk,
                item_ids=ids,
                show_progress=False,
            )
            t = time.perf_counter() - t
            bands[f"{lo}-{hi - 1 if hi else ''}"] = {
                "targets": int(keep.sum()),
                "mean_history": float(pos[keep].mean()),
                "targets_per_s": float(keep.sum() / t),
                "useful_gflops": flops_per_candidate * float(pos[keep].sum()) / t / 1e9,
            }
    return {
        "targets": int(len(pos)),
        "k": 10,
        "backend": backend,
        "load_s": load_s,
        "retrieve_s": seconds,
        "targets_per_s": len(pos) / seconds,
        "max_history": int(pos.max()),
        "mean_history": float(pos.mean()),
        "useful_gflops": flops_per_candidate * float(pos.sum()) / seconds / 1e9,
        "bands": bands,
    }


def _stage_train_ctr(prepared: Path, out: Path, seed: int) -> dict:
    from ..ctr.din import DINTrainConfig, matmul_flops_per_sample, predict, training_precision
    from ..ctr.store import fit_din, save_ctr, split_arrays
    from ..data.prepared import load_prepared

    t0 = time.perf_counter()
    data = load_prepared(prepared)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    train_config = DINTrainConfig(epochs=1, seed=seed, progress=False)
    model, report, vocab = fit_din(data, None, train_config)
    fit_s = time.perf_counter() - t1
    # the evaluation passes inside fit_din (valid twice, test once), timed apart to isolate the epoch
    t2 = time.perf_counter()
    predict(model, split_arrays(data, "test", vocab, model.config.max_history))
    test_s = time.perf_counter() - t2
    n = {k: len(s) for k, s in data.splits.items()}
    eval_s = test_s * (2 * n["valid"] + n["test"]) / max(n["test"], 1)
    epoch_s = max(fit_s - eval_s, 1e-9)
    save_ctr(model, vocab, report, out)
    rate = n["train"] / epoch_s
    return {
        "train_samples": n["train"],
        "load_s": load_s,
        "fit_s": fit_s,
        "epoch_s": epoch_s,
        "train_samples_per_s": rate,
        "predict_samples_per_s": n["test"] / max(test_s, 1e-9),
        "precision": training_precision(train_config.mixed_precision),
        "useful_gflops": 3 * matmul_flops_per_sample(model.config) * rate / 1e9,
        "valid_auc": report.valid.get("auc"),
        "test_auc": report.test.get("auc"),
    }


def _stage_main(argv: List[str]) -> int:
    """Child-process entry: ``python -m rellax_fast.bench.data STAGE JSON``; prints one JSON line."""
    stage, opts = argv[0], json.loads(argv[1])
    if stage == "gemm":
        res = gemm_rate(opts["n"])
    elif stage == "embed":
        res = _stage_embed(Path(opts["prepared"]), Path(opts["out"]), opts["dim"], opts["seed"])
    elif stage == "retrieve":
        res = _stage_retrieve(
            Path(opts["prepared"]),
            Path(opts["emb"]),
            Path(opts["out"]),
            opts["targets"],
            opts["backend"],
            opts["seed"],
        )
    elif stage == "train-ctr":
        res = _stage_train_ctr(Path(opts["prepared"]), Path(opts["out"]), opts["seed"])
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    print("BENCH-RESULT " + json.dumps(res), flush=True)
    return 0


# -------------------------------------------------------------------------------------------- the runner


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def run_stage(cmd: List[str], folder: Path, env: Optional[dict] = None) -> dict:
    """Run ``cmd`` as one child; its wall and CPU time (user + system: steadier than wall on a shared machine),
    peak RSS (that child alone, via ``os.wait4``), the growth of
    ``folder`` in bytes and the JSON line it printed (``BENCH-RESULT``), if any. A failure raises with the
    child's output."""
    before = _folder_bytes(folder)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"stage {' '.join(cmd[:6])} ... failed (rc {proc.returncode}):\n{output[-4000:]}")
    result = {}
    for line in output.splitlines():
        if line.startswith("BENCH-RESULT "):
            result = json.loads(line[len("BENCH-RESULT ") :])
    # ru_maxrss: kilobytes on Linux
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
        "bytes_written": _folder_bytes(folder) - before,
        **result,
    }


def run_pipeline(
    out,
    users: int,
    *,
    items: int = ML25M_ITEMS,
    max_length: int = 30_000,
    length_scale: float = 1.0,
    seed: int = 0,
    targets: int = 100_000,
    dim: int = 384,
    backend: str = "cpp",
    stages=STAGES,
    prepare_args=(),
    log=print,
) -> dict:
    """Generate the files under ``out/raw`` and run ``stages`` in order (each in a child process);
    ``prepare_args`` are extra ``rellax-fast prepare`` flags (e.g. ``--history-column full``)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; expected a subset of {list(STAGES)}")
    out = Path(out)
    raw, prepared = out / "raw" / "ml-25m", out / "prepared"
    t0 = time.perf_counter()
    gen = generate_movielens(raw, users, items, seed, max_length, length_scale)
    gen["wall_s"] = time.perf_counter() - t0
    gen["bytes"] = _folder_bytes(raw)
    log(
        f"generated {gen['ratings']:,} ratings of {users:,} users ({gen['bytes'] / 1e6:.1f} MB, longest "
        f"{gen['max_length']:,}) in {gen['wall_s']:.1f} s"
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = sys.executable
    results = {}
    for stage in stages:
        if stage == "prepare":
            code = (
                "import sys; from rellax_fast.cli import main; sys.exit(main(['prepare', '--dataset', 'ml-25m', "
                f"'--data-dir', {str(raw)!r}, '--out', {str(prepared)!r}, '--no-download', *{list(prepare_args)!r}]))"
            )
            env_stage = dict(env, TQDM_DISABLE="1")
            results[stage] = run_stage([py, "-c", code], prepared, env_stage)
        else:
            opts = {
                "prepared": str(prepared),
                "seed": seed,
                "dim": dim,
                "targets": targets,
                "backend": backend,
                "emb": str(out / "embed"),
                "out": str(out / {"embed": "embed", "retrieve": "retrieve", "train-ctr": "ctr"}[stage]),
            }
            results[stage] = run_stage(
                [py, "-m", "rellax_fast.bench.data", stage, json.dumps(opts)], Path(opts["out"]), env
            )
        r = results[stage]
        rate = {
            "retrieve": f"  {r.get('targets_per_s', 0):,.0f} targets/s",
            "train-ctr": f"  {r.get('train_samples_per_s', 0):,.0f} train samples/s",
        }.get(stage, "")
        log(
            f"{stage:<9} {r['wall_s']:8.1f} s (cpu {r['cpu_s']:7.1f} s)  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB  "
            f"wrote {r['bytes_written'] / 1e6:9.1f} MB{rate}"
        )
    return {"generated": gen, "stages": results}


ML25M_RATINGS = 25_000_095
METRICS = ("wall_s", "cpu_s", "peak_rss_bytes", "bytes_written")


def extrapolate(results: List[dict], ratings: int = ML25M_RATINGS) -> Dict[str, dict]:
    """Each stage's wall/CPU time, peak RSS and bytes at ``ratings`` ratings (ML-25M's count by default): the
    least-squares line through the measured sizes (two or more; with one, proportional through 0, which
    overstates RSS by the interpreter's baseline). An estimate, not a measurement: it holds as far as every
    stage is linear in the ratings, which the CI test checks at small sizes."""
    x = np.array([r["generated"]["ratings"] for r in results], dtype=np.float64)
    out = {}
    for name in results[0]["stages"]:
        out[name] = {}
        for m in METRICS:
            y = np.array([r["stages"][name][m] for r in results], dtype=np.float64)
            if len(x) >= 2 and np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                # noisy small sizes can tilt the line down: never below the measured size's own figure
                fit = intercept + max(slope, 0.0) * ratings if slope > 0 else y[np.argmax(x)]
                out[name][m] = float(max(fit, y[np.argmax(x)]))
            else:
                out[name][m] = float(y[0] * ratings / x[0])
    return out


def markdown(report: dict) -> str:
    lines = [
        "# bench data",
        "",
        f"Machine: {report['machine']}. Stand-in encoder: seeded random {report['dim']}-d item "
        f"table. Seed {report['seed']}.",
        "",
    ]
    gemm = report.get("gemm")
    if gemm:
        lines += [
            f"GEMM rate in this run (torch.mm, {gemm['n']}^3, {gemm['threads']} threads, best of 5): fp32 "
            f"{gemm['fp32_gflops']:,.1f} GFLOP/s, bf16 {gemm['bf16_gflops']:,.1f} GFLOP/s. Useful GFLOP/s: "
            "retrieval 2 d per (target, earlier behaviour); DIN 3x the forward's matmul FLOPs per sample.",
            "",
        ]
    for result in report["sizes"]:
        gen = result["generated"]
        lines += [
            f"## {gen['users']:,} users, {gen['ratings']:,} ratings",
            "",
            f"{gen['items']:,} movies, median {gen['median_length']} ratings per user, longest {gen['max_length']:,}; "
            f"ratings.csv + movies.csv {gen['bytes'] / 1e6:.1f} MB.",
            "",
            "| stage | wall s | CPU s | peak RSS GiB | written MB | rate |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in result["stages"].items():
            rate = ""
            if name == "retrieve":
                rate = (
                    f"{r['targets_per_s']:,.0f} targets/s, {against_limit(r['useful_gflops'], gemm)} "
                    f"({r['targets']:,}, history up to {r['max_history']:,}); "
                    + ", ".join(
                        f"{b}: {v['targets_per_s']:,.0f}/s, {against_limit(v['useful_gflops'], gemm)}"
                        for b, v in r["bands"].items()
                    )
                )
            elif name == "train-ctr":
                rate = (
                    f"{r['train_samples_per_s']:,.0f} train samples/s, "
                    f"{against_limit(r['useful_gflops'], gemm, r['precision'])} ({r['train_samples']:,} samples, "
                    f"1 epoch, {r['precision']}; valid AUC {r['valid_auc']:.4f})"
                )
            lines.append(
                f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                f"{r['bytes_written'] / 1e6:.1f} | {rate} |"
            )
        lines.append("")
    n = len(report["sizes"])
    lines += [
        f"## Full ML-25M size ({ML25M_RATINGS:,} ratings): linear extrapolation, not a measurement",
        "",
        (
            "Least-squares line through the sizes above"
            if n >= 2
            else "Proportional to the one size above (peak RSS overstated by the interpreter's baseline)"
        )
        + ".",
        "",
        "| stage | wall s | CPU s | peak RSS GiB | written GB |",
        "|---|---|---|---|---|",
    ]
    lines.insert(
        len(lines) - 3,
        "embed (per item) and retrieve (a fixed number of targets) do not grow with the ratings "
        "except for loading the prepared folder; their lines say little. Wall time on a shared machine is noise: "
        "read the CPU time.",
    )
    for name, e in report["extrapolated_full_size"].items():
        lines.append(
            f"| {name} | ~{e['wall_s']:.0f} | ~{e['cpu_s']:.0f} | ~{e['peak_rss_bytes'] / 2**30:.1f} | "
            f"~{e['bytes_written'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import platform

    from .._io import atomic_write_text

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        sizes = [int(u) for u in str(args.users).split(",") if u.strip()]
    except ValueError:
        print(f"error: --users: expected comma-separated integers, got {args.users!r}", file=sys.stderr)
        return 2
    if args.gemm_size < 0:
        print(
            f"error: --gemm-size must be >= 0 (0: skip the GEMM rate); got {args.gemm_size}", file=sys.stderr
        )
        return 2
    if not sizes or min(sizes) < 1 or args.targets < 1 or args.dim < 1:
        print(
            f"error: --users, --targets and --dim must be >= 1; got {args.users}, {args.targets}, {args.dim}",
            file=sys.stderr,
        )
        return 2
    gemm = None
    if args.gemm_size > 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        gemm = {
            k: v
            for k, v in run_stage(
                [sys.executable, "-m", "rellax_fast.bench.data", "gemm", json.dumps({"n": args.gemm_size})],
                Path(args.out),
            ).items()
            if k in ("n", "threads", "fp32_gflops", "bf16_gflops")
        }
        print(
            f"GEMM rate: fp32 {gemm['fp32_gflops']:,.1f} GFLOP/s, bf16 {gemm['bf16_gflops']:,.1f} GFLOP/s "
            f"(torch.mm {args.gemm_size}^3)",
            flush=True,
        )
    results = []
    for users in sizes:
        print(f"== bench data: {users:,} users", flush=True)
        # a bad --stages or size is a ValueError that rellax_fast.cli prints as one line (exit 2)
        results.append(
            run_pipeline(
                Path(args.out) / "data" / f"users-{users}",
                users,
                items=args.items,
                max_length=args.tail_length,
                length_scale=args.length_scale,
                seed=args.gen_seed,
                targets=args.targets,
                dim=args.dim,
                backend=args.topk_backend,
                stages=stages,
            )
        )
        # the reports are rewritten after every size, so a long run that is stopped keeps what it measured
        report = {
            "seed": args.gen_seed,
            "dim": args.dim,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "gemm": gemm,
            "sizes": results,
            "extrapolated_full_size": extrapolate(results),
        }
        atomic_write_text(Path(args.out) / "data.json", json.dumps(report, indent=2) + "\n")
        text = markdown(report)
        atomic_write_text(Path(args.out) / "data.md", text)
    print(text)
    print(f"wrote {Path(args.out) / 'data.json'} and {Path(args.out) / 'data.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_stage_main(sys.argv[1:]))

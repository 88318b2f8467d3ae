"""``rellax-fast bench topk``: the semantic_topk backends against torch, faiss and global-ranking baselines.

Data: synthetic ML-1M-like histories. User lengths are a lognormal fitted to ML-1M (median 96, mean about
165), clipped to [20, 2314] like ML-1M's range; 3,706 items with random embeddings; every position of
every history is a sample (positions 0 have no candidates and come back fully padded). ``--size gpu``:
6,040 users (about 1M samples), d in {384, 512}, k in {10, 30}. ``--size cpu``: the same distribution
for 400 users (faiss rows are timed once: they take tens of seconds). ``--size tiny``: a few users, for the smoke test.

Rows per (d, k) configuration, all measured in the same run:
- each available ``semantic_topk`` backend for the device (reference excluded: it is the padded float64
  oracle and would need S x L memory at these sizes);
- ``prefilter-bf16``: ``semantic_topk(prefilter="bf16")``, bf16 scores by batched GEMM, then float64
  rescoring of the candidates a certified error bound keeps (exact: the float64 oracle's result);
- ``torch-padded``: users sorted by length and chunked (chunk x Lmax x Lmax scores bounded to ~4M
  elements), then padded ``bmm`` + causal mask + ``topk``: the plain-PyTorch way to do it;
- ``faiss-per-user`` (CPU): faiss cannot mask causally, so each user's targets are searched in blocks of
  64 positions [a, b) with ``faiss.knn`` (brute-force inner product, the flat index without building one)
  over the prefix [0, b), asking for k + (b - a) neighbours, then dropping positions >= the target's.
  That is exact: at most b - a - 1 dropped positions can outrank a target's true top-k.
- ``faiss-global``: :func:`rellax_fast.subr.retrieval.retrieve_global` (faiss IndexFlatIP over all items,
  ranking walked through each user's history), when that module is present.

``--lifelong`` (:func:`run_lifelong`): histories of L = 1k to 32k behaviours (ReLLaX's lifelong setting,
ML-25M's longest user has about 32k ratings): for each L, ``LIFELONG[size]["users"]`` users of exactly that
length and a seeded sample of targets, in two layouts: ``uniform`` over their positions, and ``recent``
(each user's latest positions, like a test split). Every position as a target would be quadratic in L. Rows: each available ``semantic_topk`` backend (not the reference), ``prefilter-bf16``,
``retrieve(max_history=W)`` windows on the fastest backend, and ``torch-gemm`` (per user, targets chunked
so that chunk x L scores stay ~4M elements: one GEMM, a causal mask, ``topk``; the padded all-positions
baseline above would need L x L scores per user, 4 GiB at 32k, so it is not run).

Columns: ms (median), samples/s, TFLOP/s counting the useful causal work (2·d flops per (target,
candidate) pair, the same count for every row), effective GB/s counting the minimal traffic (history
embeddings read once + indices + outputs), peak MiB (CUDA allocator peak, or the coarse CPU peak-RSS
growth), speedup vs torch-padded, and the largest gap of the k-th best score vs the first row (agreement).
"""

from __future__ import annotations

import math
import types
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

ML1M_USERS = 6040
ML1M_ITEMS = 3706
ML1M_MEDIAN, ML1M_MEAN, ML1M_MIN, ML1M_MAX = 96.0, 165.6, 20, 2314

SIZES = {
    "gpu": dict(users=ML1M_USERS, dims=(384, 512), ks=(10, 30)),
    "cpu": dict(users=400, dims=(384, 512), ks=(10, 30)),
    "tiny": dict(users=12, dims=(31,), ks=(5,)),
}


LIFELONG = {
    "gpu": dict(
        lengths=(1024, 4096, 16384, 32768), users=4, targets=20000, dims=(384,), ks=(10, 50), windows=(1024,)
    ),
    "cpu": dict(
        lengths=(1024, 4096, 16384, 32768), users=2, targets=1000, dims=(384,), ks=(10,), windows=(1024,)
    ),
    "tiny": dict(lengths=(40, 130), users=2, targets=30, dims=(16,), ks=(5,), windows=(17,)),
}


def synthetic_histories(n_users: int, n_items: int = ML1M_ITEMS, seed: int = 0, max_len: int = ML1M_MAX):
    """(seq_items, seq_offsets, sample_user, sample_pos) with ML-1M-like lengths; every position a sample."""
    rng = np.random.default_rng(seed)
    mu = math.log(ML1M_MEDIAN)
    sigma = math.sqrt(2.0 * math.log(ML1M_MEAN / ML1M_MEDIAN))
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, n_users)), ML1M_MIN, max_len).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(0, n_items, int(offsets[-1]), dtype=np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    pos = (
        np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]) if n_users else np.zeros(0, np.int64)
    )
    return (
        torch.from_numpy(items),
        torch.from_numpy(offsets),
        torch.from_numpy(users),
        torch.from_numpy(pos),
    )


def torch_padded_topk(item_emb, seq_items, seq_offsets, k: int, normalize: bool, budget: int = 1 << 22):
    """Baseline for "every position is a sample": per chunk of similar-length users, padded bmm + mask + topk.

    Returns (pos, score) in the order of users then positions (the order of :func:`synthetic_histories`).
    """
    emb = item_emb.float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).tolist()
    starts = seq_offsets[:-1].tolist()
    total = int(seq_offsets[-1])
    out_pos = torch.full((total, k), -1, dtype=torch.int64, device=emb.device)
    out_score = torch.full((total, k), float("-inf"), dtype=torch.float32, device=emb.device)
    order = sorted(range(len(lengths)), key=lambda u: lengths[u])
    i = 0
    while i < len(order):
        width = lengths[order[i]]
        j = i
        while j < len(order) and (j - i + 1) * lengths[order[j]] ** 2 <= budget:
            j += 1
        j = max(j, i + 1)
        chunk = order[i:j]
        width = max(lengths[u] for u in chunk)
        if width == 0:
            i = j
            continue
        idx = torch.zeros((len(chunk), width), dtype=torch.int64, device=emb.device)
        for r, u in enumerate(chunk):
            idx[r, : lengths[u]] = seq_items[starts[u] : starts[u] + lengths[u]]
        x = emb[idx]  # (B, W, d)
        scores = torch.bmm(x, x.transpose(1, 2))  # (B, W target, W candidate)
        causal = torch.ones(width, width, dtype=torch.bool, device=emb.device).tril(-1)
        scores.masked_fill_(~causal, float("-inf"))
        kk = min(k, width)
        top_s, top_p = scores.topk(kk, dim=2)
        top_p = top_p.masked_fill(torch.isinf(top_s), -1)
        for r, u in enumerate(chunk):
            n = lengths[u]
            out_pos[starts[u] : starts[u] + n, :kk] = top_p[r, :n]
            out_score[starts[u] : starts[u] + n, :kk] = top_s[r, :n]
        i = j
    return out_pos, out_score


def faiss_per_user_topk(item_emb, seq_items, seq_offsets, k: int, normalize: bool, block: int = 64):
    """Exact causal top-k with faiss brute-force inner-product search over each target block's prefix."""
    import faiss

    emb = item_emb.float().cpu()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    emb_np = emb.numpy()
    items = seq_items.cpu().numpy()
    offsets = seq_offsets.cpu().numpy()
    total = int(offsets[-1])
    out_pos = np.full((total, k), -1, dtype=np.int64)
    out_score = np.full((total, k), -np.inf, dtype=np.float32)
    for u in range(len(offsets) - 1):
        lo, n = int(offsets[u]), int(offsets[u + 1] - offsets[u])
        hist = np.ascontiguousarray(emb_np[items[lo : lo + n]])
        for a in range(1, n, block):  # position 0 has no candidates
            b = min(n, a + block)
            want = min(b, k + (b - a))
            dist, ids = faiss.knn(hist[a:b], hist[:b], want, metric=faiss.METRIC_INNER_PRODUCT)
            targets = np.arange(a, b)[:, None]
            keep = (ids >= 0) & (ids < targets)
            for r in range(b - a):
                sel = ids[r][keep[r]][:k]
                out_pos[lo + a + r, : len(sel)] = sel
                out_score[lo + a + r, : len(sel)] = dist[r][keep[r]][:k]
    return torch.from_numpy(out_pos), torch.from_numpy(out_score)


def _global_mode(item_emb, seq_items, seq_offsets, users, pos, k: int, metric: str):
    from rellax_fast.subr.retrieval import retrieve_global

    sequences = types.SimpleNamespace(items=seq_items.cpu().numpy(), offsets=seq_offsets.cpu().numpy())
    split = types.SimpleNamespace(user_index=users.cpu().numpy(), pos=pos.cpu().numpy())
    return retrieve_global(item_emb.float().cpu(), sequences, split, k, metric=metric, show_progress=False)


def _global_available() -> str:
    try:
        import rellax_fast.subr.retrieval as retrieval
    except Exception as exc:  # helper module absent or broken: report, don't fail the suite
        return f"faiss-global skipped: rellax_fast.subr.retrieval unavailable ({exc})"
    if not hasattr(retrieval, "retrieve_global"):
        return "faiss-global skipped: rellax_fast.subr.retrieval has no retrieve_global"
    return ""


def _kth_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |difference| of sorted scores between two results (padding compared as equal)."""
    a, b = a.float().cpu(), b.float().cpu()
    both_pad = torch.isinf(a) & torch.isinf(b)
    diff = (a - b).abs().masked_fill(both_pad, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


# semantic_topk(prefilter="bf16"): bf16 batched GEMM, certified bound, float64 rescoring (the oracle's result)
PREFILTER_ROW = "prefilter-bf16"


def _runs(backends, item_emb, dev_data, cpu_data, k: int, metric: str, device, with_global: bool):
    """{row name: (callable, device it runs on)} for one (d, k) configuration."""
    from rellax_fast.ops import semantic_topk

    normalize = metric == "cosine"
    cpu = torch.device("cpu")
    runs: Dict[str, Tuple[Callable[[], object], torch.device]] = {}
    for b in backends:
        runs[b] = (lambda b=b: semantic_topk(item_emb, *dev_data, k, metric=metric, backend=b), device)
    runs[PREFILTER_ROW] = (
        lambda: semantic_topk(item_emb, *dev_data, k, metric=metric, prefilter="bf16"),
        device,
    )
    runs["torch-padded"] = (
        lambda: torch_padded_topk(item_emb, dev_data[0], dev_data[1], k, normalize),
        device,
    )
    runs["faiss-per-user"] = (
        lambda: faiss_per_user_topk(item_emb, cpu_data[0], cpu_data[1], k, normalize),
        cpu,
    )
    if with_global:
        runs["faiss-global"] = (lambda: _global_mode(item_emb, *cpu_data, k, metric), cpu)
    return runs


def lifelong_histories(
    length: int,
    n_users: int,
    n_targets: int,
    n_items: int = ML1M_ITEMS,
    seed: int = 0,
    layout: str = "uniform",
):
    """``n_users`` histories of exactly ``length`` items and ``n_targets`` seeded targets (user, position),
    sorted by user then position. ``layout``: "uniform" (positions drawn uniformly from 1..length-1) or
    "recent" (each user's latest n_targets / n_users positions, like a time-ordered test split)."""
    rng = np.random.default_rng(seed + length)
    offsets = np.arange(n_users + 1, dtype=np.int64) * length
    items = rng.integers(0, n_items, int(offsets[-1]), dtype=np.int64)
    if layout == "uniform":
        users = rng.integers(0, n_users, n_targets, dtype=np.int64)
        pos = rng.integers(1, length, n_targets, dtype=np.int64)
    elif layout == "recent":
        per_user = min(length - 1, max(1, n_targets // n_users))
        users = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
        pos = np.tile(np.arange(length - per_user, length, dtype=np.int64), n_users)
    else:
        raise ValueError(f"layout must be 'uniform' or 'recent'; got {layout!r}")
    order = np.lexsort((pos, users))
    return tuple(torch.from_numpy(a) for a in (items, offsets, users[order], pos[order]))


def torch_gemm_topk(
    item_emb, seq_items, seq_offsets, users, pos, k: int, normalize: bool, budget: int = 1 << 22
):
    """Baseline for sampled targets: per user, chunks of its targets x its whole history in one GEMM, a causal
    mask (candidates < the target's position) and ``topk``; chunk x L scores bounded by ``budget``."""
    emb = item_emb.float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    out_pos = torch.full((len(users), k), -1, dtype=torch.int64, device=emb.device)
    out_score = torch.full((len(users), k), float("-inf"), dtype=torch.float32, device=emb.device)
    users_h, pos_h, off_h = users.cpu(), pos.cpu(), seq_offsets.cpu()
    bounds = torch.searchsorted(users_h, torch.arange(len(off_h), dtype=users_h.dtype))
    for u in range(len(off_h) - 1):
        lo_s, hi_s = int(bounds[u]), int(bounds[u + 1])
        if lo_s == hi_s:
            continue
        width = int(pos_h[lo_s:hi_s].max())
        hist = emb[
            seq_items[int(off_h[u]) : int(off_h[u]) + width]
        ]  # (width, d): every candidate any target needs
        step = max(1, budget // max(1, width))
        for a in range(lo_s, hi_s, step):
            b = min(hi_s, a + step)
            p = pos[a:b]
            query = emb[seq_items[int(off_h[u]) + p]]
            scores = query @ hist.T
            scores.masked_fill_(torch.arange(width, device=emb.device)[None, :] >= p[:, None], float("-inf"))
            kk = min(k, width)
            top_s, top_p = scores.topk(kk, dim=1)
            out_pos[a:b, :kk] = top_p.masked_fill(torch.isinf(top_s), -1)
            out_score[a:b, :kk] = top_s
    return out_pos, out_score


def _lifelong_runs(backends, item_emb, data, seqs, split, k: int, metric: str, device, windows, length: int):
    """{row name: (callable, window or 0, (target, candidate) pairs scored)} for one (L, d, k)."""
    from rellax_fast.ops import semantic_topk
    from rellax_fast.subr.retrieval import retrieve

    pos = np.asarray(split.pos)
    pairs = float(pos.sum())
    runs: Dict[str, Tuple[Callable[[], object], int, float]] = {}
    for b in backends:
        runs[b] = (lambda b=b: semantic_topk(item_emb, *data, k, metric=metric, backend=b), 0, pairs)
    runs[PREFILTER_ROW] = (
        lambda: semantic_topk(item_emb, *data, k, metric=metric, prefilter="bf16"),
        0,
        pairs,
    )
    runs["torch-gemm"] = (lambda: torch_gemm_topk(item_emb, *data, k, metric == "cosine"), 0, pairs)
    for w in windows:
        if backends and w < length:
            run = lambda w=w: retrieve(
                item_emb,
                seqs,
                split,
                k,
                metric=metric,
                backend=backends[0],
                device=device,
                max_history=w,
                show_progress=False,
            )
            runs[f"{backends[0]} W={w}"] = (run, w, float(np.minimum(pos, w).sum()))
    return runs


def _setup(args, sizes):
    """(device, size config, dtype, metric, repeat, warmup, backends) shared by both suites; CPU runs cap the
    repeats (the rows take seconds each) and the reference backend is left out (the padded float64 oracle)."""
    from rellax_fast.ops import availability

    device = torch.device(args.device)
    size = args.size if args.size in sizes else ("gpu" if device.type == "cuda" else "cpu")
    cpu = device.type == "cpu"
    repeat = max(1, min(args.repeat, 3)) if cpu else args.repeat
    warmup = max(0, min(args.warmup, 1)) if cpu else args.warmup
    backends = [
        b for b, why in availability("semantic_topk", device.type).items() if why is None and b != "reference"
    ]
    metric = getattr(args, "metric", "cosine")
    return device, sizes[size], getattr(torch, args.dtype), metric, repeat, warmup, backends


def _measure_lifelong(runs, device, warmup: int, repeat: int, key: dict, d: int, n: int):
    """One row per run of one (L, layout, d, k) group, with its speedup vs torch-gemm and its score gap."""
    from . import report

    rows, results = [], {}
    for name, (fn, window, work) in runs.items():
        out: list = []
        mem = report.peak_memory_mb(lambda fn=fn, out=out: out.append(fn()), device)
        results[name] = out[0][1]
        ms = report.time_ms(fn, device, warmup=max(0, warmup - 1), repeat=repeat)
        rows.append(
            dict(
                key,
                backend=name,
                window=window or None,
                device=device.type,
                targets=n,
                ms=ms,
                samples_per_s=n / (ms / 1e3),
                tflops=2.0 * d * work / (ms / 1e3) / 1e12,
                peak_mib=mem,
            )
        )
    base = next(r for r in rows if r["backend"] == "torch-gemm")
    full = [name for name, (_, window, _) in runs.items() if window == 0]
    first = results[full[0]]
    for r in rows:
        r["speedup_vs_torch"] = base["ms"] / r["ms"]
        # windowed rows answer another question: compared with nothing (NaN)
        r["max_score_gap"] = _kth_gap(results[r["backend"]], first) if r["backend"] in full else float("nan")
    return rows


def run_lifelong(args) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    """Rows per history length L (up to 32k): the op's backends, windowed retrieval, torch-gemm."""
    from . import report

    device, cfg, dtype, metric, repeat, warmup, backends = _setup(args, LIFELONG)
    rows: List[Dict[str, object]] = []
    for length, layout in ((length, layout) for length in cfg["lengths"] for layout in ("uniform", "recent")):
        items, offsets, users, pos = lifelong_histories(length, cfg["users"], cfg["targets"], layout=layout)
        data = tuple(t.to(device) for t in (items, offsets, users, pos))
        seqs = types.SimpleNamespace(items=items.numpy(), offsets=offsets.numpy())
        split = types.SimpleNamespace(user_index=users.numpy(), pos=pos.numpy())
        for d in cfg["dims"]:
            item_emb = torch.randn(ML1M_ITEMS, d, generator=torch.Generator().manual_seed(d)).to(
                device=device, dtype=dtype
            )
            for k in cfg["ks"]:
                runs = _lifelong_runs(
                    backends, item_emb, data, seqs, split, k, metric, device, cfg["windows"], length
                )
                key = {"L": length, "layout": layout, "d": d, "k": k}
                group = _measure_lifelong(runs, device, warmup, repeat, key, d, int(users.numel()))
                rows.extend(group)
                print(report.markdown_table(group), flush=True)

    def plot(rows_, path):
        return report.bar_chart(
            rows_,
            path,
            ["L", "layout", "k"],
            "samples_per_s",
            "backend",
            "semantic_topk on lifelong histories: samples/s (higher is better)",
        )

    note = (
        f"lifelong histories: per L, {cfg['users']} users of exactly L items and {cfg['targets']} targets, "
        "'uniform' over positions (mean L/2 candidates) or the users' 'recent' ones (about L candidates); "
        f"metric {metric}; dtype {args.dtype}; "
        "torch-gemm: per-user GEMM + causal mask + topk (the all-positions padded baseline needs L x L "
        "scores per user, 4 GiB at L=32k: not run); 'W=' rows: retrieve(max_history=W), tflops count the "
        "windowed work"
    )
    return rows, {"title": "semantic_topk at lifelong lengths. " + note, "plot": plot}


def _measure_config(runs, d: int, k: int, elem: int, total: int, n_samples: int, pairs: float, timing):
    """One row per run of one (d, k) configuration, with its speedup vs torch-padded and its score gap.
    ``timing`` is (warmup, repeat) for the fast rows; faiss rows are timed once (tens of seconds)."""
    from . import report

    warmup, repeat = timing
    rows, results = [], {}
    for name, (fn, dev) in runs.items():
        # the first call is the warm-up, the peak-memory probe and the result used for agreement
        out: list = []
        mem = report.peak_memory_mb(lambda fn=fn, out=out: out.append(fn()), dev)
        results[name] = out[0][1]
        slow = name.startswith("faiss")
        ms = report.time_ms(fn, dev, warmup=0 if slow else max(0, warmup - 1), repeat=1 if slow else repeat)
        row_elem = 4 if slow else elem
        bytes_moved = total * d * row_elem + total * 8 + n_samples * 16 + n_samples * k * 12
        rows.append(
            {
                "d": d,
                "k": k,
                "backend": name,
                "device": dev.type,
                "ms": ms,
                "samples_per_s": n_samples / (ms / 1e3),
                "tflops": 2.0 * d * pairs / (ms / 1e3) / 1e12,
                "gb_per_s": bytes_moved / (ms / 1e3) / 1e9,
                "peak_mib": mem,
            }
        )
    base = next(r for r in rows if r["backend"] == "torch-padded")
    first = next(iter(results.values()))
    for r in rows:
        r["speedup_vs_torch"] = base["ms"] / r["ms"]
        r["max_score_gap"] = _kth_gap(results[r["backend"]], first)
    return rows


def run_suite(args) -> Tuple[List[Dict[str, object]], Dict[str, object]]:
    from . import report

    if getattr(args, "lifelong", False):
        return run_lifelong(args)

    device, cfg, dtype, metric, repeat, warmup, backends = _setup(args, SIZES)
    seq_items, seq_offsets, users, pos = synthetic_histories(cfg["users"])
    total, n_samples = int(seq_offsets[-1]), int(users.numel())
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).double()
    pairs = float((pos.double()).sum())  # sum over samples of the number of candidates
    notes = [
        f"{cfg['users']} users, {total} samples (every position), lengths mean {lengths.mean():.1f}, "
        f"median {lengths.median():.0f}, max {lengths.max():.0f}; metric {metric}; dtype {args.dtype}; "
        f"{pairs / n_samples:.1f} candidates per sample on average"
    ]
    global_note = _global_available()
    if global_note:
        notes.append(global_note)
    cpu_data = (seq_items, seq_offsets, users, pos)
    dev_data = tuple(t.to(device) for t in cpu_data)
    rows: List[Dict[str, object]] = []
    for d in cfg["dims"]:
        gen = torch.Generator().manual_seed(d)
        item_emb = torch.randn(ML1M_ITEMS, d, generator=gen).to(device=device, dtype=dtype)
        for k in cfg["ks"]:
            runs = _runs(
                backends, item_emb, dev_data, cpu_data, k, metric, device, with_global=not global_note
            )
            group = _measure_config(
                runs, d, k, item_emb.element_size(), total, n_samples, pairs, (warmup, repeat)
            )
            rows.extend(group)
            print(report.markdown_table(group), flush=True)

    def plot(rows_, path):
        return report.bar_chart(
            rows_, path, ["d", "k"], "samples_per_s", "backend", "semantic_topk samples/s (higher is better)"
        )

    return rows, {"title": "semantic_topk vs baselines. " + " ".join(notes), "plot": plot}

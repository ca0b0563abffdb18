"""Load test of the app: N concurrent ``gradio_client`` searches against a running ``app.py``.

The app runs as a real server process (``python app.py --index ...``) on a free local port, with an
index of ``../shared/data/lc25000_lung/gallery`` built with ``index_build`` and the chosen model
(cached under ``--cache``, built on first use). N clients, one per query image taken round-robin
from the LC25000 query split, fire their search at the same moment; the script prints failures and
the latency distribution (queueing included), then stops the server.

    python benchmarks/bench_app_load.py [--requests 20] [--concurrency 2] [--model default]

With ``--clients C``, C clients instead search one after another until ``--requests`` searches are
done (at most C in flight), and the server's resident memory is sampled every ``--rss-every``
searches (issue 13's 1,000 searches at concurrency 10, RSS after 2,000):

    python benchmarks/bench_app_load.py --requests 2000 --clients 10 --rss-every 250
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

SHARED = Path(os.environ.get("LGFFEM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", default=str(SHARED / "lc25000_lung" / "gallery"))
    parser.add_argument("--queries", default=str(SHARED / "lc25000_lung" / "query"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--cache", default="/tmp/lgffem-bench", help="where the gallery index is built and kept")
    parser.add_argument("--requests", type=int, default=20, help="searches (all at once unless --clients)")
    parser.add_argument("--clients", type=int, default=None, help="client threads, each searching in a loop")
    parser.add_argument("--rss-every", type=int, default=250, help="sample the server's RSS every N searches")
    parser.add_argument("--concurrency", type=int, default=2, help="the app's queue workers (--concurrency)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=5, help="single searches timed one after another first")
    parser.add_argument(
        "--tiled-query",
        default=str(SHARED / "slides" / "target_image.png"),
        help="a large image timed once (tiled: 1000 x 1000 px -> 25 tiles of 224 px)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def ensure_index(args: argparse.Namespace) -> Path:
    """Build (once) the gallery index with the chosen model; returns its directory."""
    from index_build.data import load_image_dataset
    from index_build.index import IndexLoadError, PatchIndex, build_index
    from index_build.models import load_model

    embedder = load_model(args.model, device="cpu")
    out = Path(args.cache) / f"lc25000_gallery-{embedder.config_hash}-{embedder.fingerprint}"
    try:
        index = PatchIndex.load(out, embedder)
        print(f"index: {out} ({len(index)} patches, cached)")
        return out
    except IndexLoadError:
        pass
    started = time.perf_counter()
    dataset = load_image_dataset(args.gallery)
    index = build_index(dataset, out, embedder, progress=True)
    print(f"index: {out} ({len(index)} patches, built in {time.perf_counter() - started:.0f} s)")
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query_images(folder: Path, n: int) -> list[tuple[Path, str]]:
    """``n`` query images, classes interleaved (round-robin over the class folders)."""
    per_class = {d.name: sorted(d.glob("*.jpg")) for d in sorted(folder.iterdir()) if d.is_dir()}
    picks = []
    for i in range(n):
        label = sorted(per_class)[i % len(per_class)]
        files = per_class[label]
        picks.append((files[(i // len(per_class)) % len(files)], label))
    return picks


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, server: subprocess.Popen, timeout: float):
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with status {server.returncode} before it was ready")
        try:
            return Client(url, verbose=False, download_files=False)
        except Exception:  # noqa: BLE001 - not up yet (connection refused, 502, ...)
            time.sleep(1.0)
    raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not Path(args.gallery).is_dir():
        print(f"gallery not found: {args.gallery}", file=sys.stderr)
        return 2
    from gradio_client import Client, handle_file

    import app

    index_dir = ensure_index(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [
        sys.executable,
        str(ROOT / "app.py"),
        "--index",
        str(index_dir),
        "--model",
        args.model,
        "--port",
        str(port),
        "--data-dir",
        str(Path(args.cache) / "app-data"),
        "--concurrency",
        str(args.concurrency),
        "--device",
        "cpu",
    ]
    log_path = Path(args.cache) / "app.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    try:
        started = time.perf_counter()
        first = wait_ready(url, server, args.startup_timeout)
        print(f"app ready after {time.perf_counter() - started:.1f} s (log: {log_path})")
        queries = query_images(Path(args.queries), args.requests)
        first.predict(handle_file(str(queries[0][0])), args.k, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search")
        sequential = []
        for path, _ in queries[: args.sequential]:
            t0 = time.perf_counter()
            first.predict(handle_file(str(path)), args.k, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search")
            sequential.append(time.perf_counter() - t0)
        tiled = None
        if args.tiled_query and Path(args.tiled_query).is_file():
            t0 = time.perf_counter()
            out = first.predict(
                handle_file(args.tiled_query), args.k, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search"
            )
            tiled = (time.perf_counter() - t0, len(out[4]))
        n_clients = args.clients or args.requests
        clients = [Client(url, verbose=False, download_files=False) for _ in range(n_clients)]
        barrier = threading.Barrier(n_clients)
        lock = threading.Lock()
        counter = iter(range(args.requests))
        done = [0]
        rss = [(0, rss_mb(server.pid))]

        def one(client, i: int) -> tuple[float, str | None, str]:
            path, label = queries[i]
            t0 = time.perf_counter()
            try:
                out = client.predict(
                    handle_file(str(path)), args.k, app.ANY_LABEL, app.TILE_MODES[0], api_name="/search"
                )
            except Exception as err:  # noqa: BLE001 - a failed request is what we count
                return time.perf_counter() - t0, f"{type(err).__name__}: {err}", label
            elapsed = time.perf_counter() - t0
            gallery, _votes, summary = out[0], out[1], out[2]
            if summary.startswith("⚠️") or len(gallery) != args.k:
                return elapsed, f"bad answer: {summary[:120]!r}, {len(gallery)} results", label
            if summary.startswith("### No close match"):
                return elapsed, None, "no close match"
            suggestion = summary.split("**")[1]
            return elapsed, None, "ok" if suggestion == label else "wrong"

        def worker(c: int) -> list[tuple[float, str | None, str]]:
            barrier.wait()
            out = []
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return out
                out.append(one(clients[c], i))
                with lock:
                    done[0] += 1
                    if done[0] % args.rss_every == 0:
                        rss.append((done[0], rss_mb(server.pid)))

        wall0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n_clients) as pool:
            results = [r for chunk in pool.map(worker, range(n_clients)) for r in chunk]
        wall = time.perf_counter() - wall0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    latencies = np.array([r[0] for r in results])
    failures = [r[1] for r in results if r[1]]
    correct = sum(r[2] == "ok" for r in results)
    unmatched = sum(r[2] == "no close match" for r in results)
    print(
        f"\n{args.requests} searches from {n_clients} concurrent clients, k={args.k}, app "
        f"--concurrency {args.concurrency}, model {args.model}, CPU ({os.cpu_count()} cores); "
        f"{unmatched} answered 'no close match'"
    )
    print("| requests | failures | p50 (s) | p95 (s) | max (s) | wall (s) | searches/s | suggestion = query class |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.requests} | {len(failures)} | {np.percentile(latencies, 50):.2f} | "
        f"{np.percentile(latencies, 95):.2f} | {latencies.max():.2f} | {wall:.2f} | {args.requests / wall:.2f} | "
        f"{correct}/{args.requests - len(failures)} |"
    )
    if len(rss) > 1:
        print("\n| searches done | server RSS (MB) |")
        print("|---|---|")
        for n, mb in rss:
            print(f"| {n} | {mb:.0f} |")
    if sequential:
        print(
            f"\none search at a time (no load), {len(sequential)} queries of 224 px: p50 "
            f"{np.percentile(sequential, 50):.2f} s, max {max(sequential):.2f} s"
        )
    if tiled:
        print(f"one tiled search ({Path(args.tiled_query).name}, {tiled[1]} tiles): {tiled[0]:.2f} s")
    for failure in failures:
        print("failure:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""`ftlab serve` under load: 1, 8 and 32 concurrent clients posting real photos, for several batching settings.

Each setting is a fresh server (a child process on a free port); each client sends one photo at a time (multipart,
a new connection per request, as `curl` does) for a fixed time, after a warm-up. Prints a markdown table:
requests/s, p50 and p99 latency, and the throughput against one client (one request at a time).

    .venv/bin/python scripts/benchmark_serve.py runs/image_folder/version_0/checkpoints/best-...ckpt \\
        ../shared/data/cats_vs_dogs/PetImages
    .venv/bin/python scripts/benchmark.py --parts serve --serve_model <ckpt>      # the same, in the benchmark report
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from datamodules.images import list_images
from lightning_modules.serving.client import multipart, post, start_server

CLIENTS = (1, 8, 32)
# (name, ftlab serve options): the defaults (a worker per core, batches of what is waiting), a batch that waits 10 ms
# for more, larger batches, one worker, and one worker without batching
SETTINGS = (
    ("a worker per core, batch 8, 0 ms (default)", ()),
    ("a worker per core, batch 8, 10 ms", ("--batch_timeout=0.01",)),
    ("a worker per core, batch 32, 0 ms", ("--max_batch_size=32",)),
    ("1 worker, batch 8, 0 ms", ("--workers_per_device=1",)),
    ("1 worker, no batching", ("--workers_per_device=1", "--max_batch_size=1")),
)
PHOTOS = 200  # distinct photos sent round-robin
REPO = Path(__file__).resolve().parent.parent


def load(url: str, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> tuple[float, list[float], int]:
    """`clients` threads posting for `seconds`: requests/s, the latencies (s) and the count of failed requests."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            body, content_type = bodies[i % len(bodies)]
            start = time.perf_counter()
            status, _ = post(url, body, content_type)
            with lock:
                latencies.append(time.perf_counter() - start)
                failures[0] += status != 200
            i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - start), latencies, failures[0]


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0-1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def serve_rows(model: Path, photos: Path, seconds: float = 15.0, settings: Sequence[str] | None = None) -> list[str]:
    """The markdown table of every setting (or those named) against `model`, on the first `PHOTOS` of `photos`."""
    files = list_images(photos)[:PHOTOS]
    bodies = [multipart("image", path.name, path.read_bytes(), "image/jpeg") for path in files]
    rows = [
        f"`ftlab serve` of {model.name} on {len(files)} photos of {photos}, {seconds:.0f} s per row, clients on the "
        "same machine:",
        "",
        "| setting | clients | requests/s | p50 ms | p99 ms | vs 1 client | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in SETTINGS:
            if settings and name not in settings:
                continue
            server = start_server(model, Path(tmp) / "serve.log", *options).wait_ready()
            try:
                url = f"{server.url}/predict"
                load(url, bodies, 4, 3.0)  # warm-up
                sequential = 0.0
                for clients in CLIENTS:
                    rate, latencies, failed = load(url, bodies, clients, seconds)
                    sequential = sequential or rate
                    rows.append(
                        f"| {name} | {clients} | {rate:.1f} | {statistics.median(latencies) * 1e3:.0f} | "
                        f"{percentile(latencies, 0.99) * 1e3:.0f} | {rate / sequential:.2f}x | {failed} |"
                    )
            finally:
                server.stop()
    return rows


def fit_own_images(photos: Path, root: Path) -> Path:
    """The own-images recipe fitted on a copy of `photos` under `root` (`ftlab fit`, a few minutes): its best
    checkpoint."""
    shutil.copytree(photos, root / "photos")
    (root / "experiments").symlink_to(REPO / "experiments")
    recipe = ["--config", "experiments/data/image_folder.yaml", f"--data.init_args.root={root / 'photos'}"]
    subprocess.run([sys.executable, "-m", "lightning_modules.cli.main", "fit", *recipe], cwd=root, check=True)
    return next((root / "runs" / "image_folder" / "version_0" / "checkpoints").glob("best-*.ckpt"))


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a .ckpt file or a timm folder")
    parser.add_argument("photos", type=Path, help="a folder of photos (the dev cats vs dogs)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per row")
    parser.add_argument("--settings", nargs="*", help="only these settings (by name)")
    args = parser.parse_args(argv)
    print("\n".join(serve_rows(args.model, args.photos, args.seconds, args.settings)))


if __name__ == "__main__":
    main()

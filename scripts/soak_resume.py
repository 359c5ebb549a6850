"""Soak test of kill and resume: SIGKILL `ftlab fit` at random moments, resume it until it finishes, and compare
its final weights with a run of the same config that was never interrupted.

    python scripts/soak_resume.py --config experiments/quickstart.yaml --kills 8 -- --model.image_size 32

Arguments after `--` go to `ftlab fit`. Kills land wherever the clock says: during start-up, mid-epoch, during
validation or while a checkpoint is written. Each resume uses `--ckpt_path` on the run's `last.ckpt` (a fresh
start if none was written yet). On one process the final weights should be equal (difference 0).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import torch


def _fit(base: list[str], name: str, ckpt: Path | None, log: Path) -> subprocess.Popen[bytes]:
    cmd = [*base, f"--trainer.logger.init_args.name={name}", "--trainer.logger.init_args.version=0"]
    if ckpt is not None and ckpt.is_file():
        cmd += ["--ckpt_path", str(ckpt)]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=out)


def max_weight_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the floating-point weights of two checkpoints."""
    sa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    diffs = [float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point()]
    return max(diffs, default=0.0)


def main() -> None:
    """Run the uninterrupted fit, then the killed-and-resumed one, and print how far apart they end."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="ftlab --config files, in order")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="shortest life of a process before a kill")
    parser.add_argument("--max-seconds", type=float, help="longest; default: how long the uninterrupted run took")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--save-dir", default="runs/soak")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "lightning_modules.cli.main", "fit", *(f"--config={c}" for c in args.config), *extra]
    base.append(f"--trainer.logger.init_args.save_dir={save_dir}")
    log = save_dir / "soak.log"

    start = time.monotonic()
    if _fit(base, "uninterrupted", None, log).wait() != 0:
        raise SystemExit(f"the uninterrupted run failed; see {log}")
    longest = args.max_seconds or time.monotonic() - start
    ckpt = save_dir / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    rng = random.Random(args.seed)
    kills = 0
    while True:
        process = _fit(base, "killed", ckpt, log)
        if kills < args.kills:
            try:
                process.wait(timeout=rng.uniform(args.min_seconds, longest))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                kills += 1
                epoch = torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] if ckpt.is_file() else None
                print(f"kill {kills}: last.ckpt {'not written yet' if epoch is None else f'at epoch {epoch}'}")
                continue
        if process.wait() != 0:
            raise SystemExit(f"a resumed run failed (exit {process.returncode}); see {log}")
        break
    if kills == 0:
        raise SystemExit(
            "no kill landed: every timer outlived the resumed run, so nothing was tested; "
            "give --max-seconds below the run's length, or another --seed"
        )
    final = save_dir / "uninterrupted" / "version_0" / "checkpoints" / "last.ckpt"
    print(f"{kills} kills; max weight difference to the uninterrupted run: {max_weight_difference(final, ckpt):.3g}")


if __name__ == "__main__":
    main()

"""Run commands on a real full disk: each case gets its own small tmpfs, filled to a few bytes.

Run inside ``unshare --user --map-root-user --mount`` (see tests/test_hostile.py), which gives
this process a private mount namespace where it may mount. For each case: a 16 MiB tmpfs, a copy
of the trained run on it (plus an image and an earlier output pair), a file filling it up to the
case's free bytes, then ``main([...])``; one JSON line per case: exit status, stderr, the files
changed or removed, the files made, and whether the run's checkpoints still load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image


def _snapshot(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if path.name == "filler":
            continue
        out[str(path.relative_to(root)) + ("/" if path.is_dir() else "")] = None if path.is_dir() else path.read_bytes()
    return out


def main() -> None:
    from progvq.checkpoint import load_latest
    from run_stage import main as progvq

    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work"])
    for name, (free, argv, _, _) in spec["cases"].items():
        mount = work / name
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
        run = mount / "run"
        shutil.copytree(spec["run"], run)
        Image.fromarray(__import__("numpy").zeros((16, 16), "uint8")).save(mount / "digit.png")
        (mount / "old.png").write_bytes(b"an earlier grid")
        (mount / "old.npz").write_bytes(b"an earlier array")
        stats = os.statvfs(mount)
        fill = stats.f_bavail * stats.f_frsize - free
        with open(mount / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(fill, 1))
        before = _snapshot(mount)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = progvq([a.format(m=mount, run=run) for a in argv])
        after = _snapshot(mount)
        loadable = all(
            load_latest(p) is not None for p in run.glob("*/checkpoint.pt")
        )
        print(json.dumps({
            "name": name, "code": code, "err": err.getvalue(), "mount": str(mount), "run": str(run),
            "changed": sorted(k for k, v in before.items() if after.get(k, b"<gone>") != v),
            "new": sorted(set(after) - set(before)), "loadable": loadable,
        }), flush=True)


if __name__ == "__main__":
    main()

"""Kill training runs at random moments, resume them, and check they end bit-identical.

For each stage kind (stage 1, a code stage, the prior) the harness trains the
stage once without interruption (the reference), then again in a fresh copy of
the run where it repeatedly

- kills the training process with SIGKILL, either while a checkpoint is being
  written (a temporary file beside ``checkpoint.pt`` is open) or at a random
  moment between checkpoints,
- damages the newest checkpoint after every third kill (truncates it or flips
  a byte), which the next start must notice and step over to the previous one;
  such a kill waits for a moment when both the newest and the previous
  checkpoint are complete on disk, so every planned damage happens,
- sometimes stops it with SIGTERM or SIGINT instead, which must checkpoint the
  current step and exit with status 128 + signal number and a resume line,

and starts it again, until the stage is done. The final checkpoint must have
the same content digest as the reference: the same weights, optimizer state,
RNG states and metrics, bit for bit.

Every process runs with one intra-op thread, so the reference and the
interrupted runs reduce in the same order.

The default test suite runs a short version (tests/test_crash.py). The full
one, with ten kills per stage kind::

    python -m tests.crash_harness --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from progvq.checkpoint import PREVIOUS_NAME, checkpoint_path, load_checkpoint, load_latest, unfinished_writes
from progvq.errors import RunError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STAGES = ("1", "2", "prior")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def overrides(steps: int) -> list[str]:
    """--set flags: ``steps`` per stage, frequent checkpoints and evaluations at odd steps."""
    flags = []
    for stage in STAGES:
        for key, value in (("steps", steps), ("checkpoint_every", 3), ("eval_every", 5), ("log_every", 2)):
            flags += ["--set", f"stages.{stage}.{key}={value}"]
    return flags


def train_command(run_dir: Path, stage: str, steps: int) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run_stage.py"),
        "train",
        str(TINY),
        *("--stage", stage, "--run-dir", str(run_dir), "--no-progress"),
        *overrides(steps),
    ]


@dataclass
class Event:
    """One interruption and what it left."""

    action: str  # kill-write, kill-step, sigterm, sigint
    step: int  # step of the newest intact checkpoint afterwards (-1: none yet)
    mid_write: bool  # a checkpoint write was cut short (its temporary file was left)
    damaged: str = ""  # "truncate" or "flip" if the newest checkpoint was damaged afterwards
    returncode: int = 0


@dataclass
class Report:
    stage: str
    kills: int = 0  # SIGKILLs delivered
    kills_mid_write: int = 0  # of them, while a checkpoint was being written
    signals: int = 0  # SIGTERM/SIGINT stops
    damaged: int = 0  # checkpoints damaged on purpose
    damage_planned: int = 0  # kills planned to be followed by damage (every one of them must happen)
    fallbacks: int = 0  # starts that reported a damaged checkpoint and used the previous one
    restarts: int = 0  # processes started in all
    identical: bool = False  # final checkpoint digest equals the reference's
    events: list[Event] = field(default_factory=list)


def _newest_step(stage_dir: Path) -> int:
    """Step of the checkpoint a restart would resume from (-1: none)."""
    try:
        found = load_latest(stage_dir / "checkpoint.pt")
    except RunError:
        return -1
    return -1 if found is None else int(found.checkpoint["step"])


def _wait_for_write(proc: subprocess.Popen, stage_dir: Path, timeout: float) -> bool:
    """Poll until this process is writing a checkpoint; False if it ended first.

    Temporary files left by an earlier killed process do not count: the new
    process removes them at start, before its own first write.
    """
    old = set(unfinished_writes(stage_dir))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if set(unfinished_writes(stage_dir)) - old:
            return True
        time.sleep(0.0005)
    return False


def _kill_with_both_checkpoints(proc: subprocess.Popen, stage_dir: Path, rng: random.Random, timeout: float) -> bool:
    """SIGKILL ``proc`` at a moment when ``checkpoint.pt`` and its previous one are both complete;
    False if it ended first.

    The process is frozen with SIGSTOP before the files are looked at, so what is
    seen is what the kill leaves: no write in progress (a write renames the newest
    checkpoint to the previous name before the new one lands, leaving a moment with
    only the previous one) and both files in place.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGSTOP)
        both_there = (stage_dir / "checkpoint.pt").exists() and (stage_dir / PREVIOUS_NAME).exists()
        ready = not unfinished_writes(stage_dir) and both_there
        if ready:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"{stage_dir}: no moment with two complete checkpoints in {timeout} s")


def _damage(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(1, len(data))]))
    else:
        # Flip one byte. Some bytes of a torch zip file are never read (alignment padding),
        # so flipping one of them changes nothing; pick again until the damage is real.
        for _ in range(100):
            i = rng.randrange(len(data) // 4, 3 * len(data) // 4)
            data[i] ^= 0xFF
            path.write_bytes(bytes(data))
            try:
                load_checkpoint(path)
            except RunError:
                return
            data[i] ^= 0xFF
        raise AssertionError(f"{path}: no byte flip was noticed")


def reference(work: Path, steps: int) -> Path:
    """Train every stage once without interruption; returns the run directory."""
    run = work / "reference"
    for stage in STAGES:
        subprocess.run(train_command(run, stage, steps), env=ENV, check=True, capture_output=True, timeout=600)
    return run


def interrupt_stage(
    ref: Path,
    work: Path,
    stage: str,
    steps: int,
    *,
    kills: int,
    signals: int,
    seed: int,
    log: bool = False,
) -> Report:
    """Train ``stage`` in a copy of ``ref`` through ``kills`` SIGKILLs and ``signals`` SIGTERM/SIGINT stops."""
    rng = random.Random(f"{seed}-{stage}")
    run = work / f"interrupted-{stage}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ref, run)
    stage_dir = checkpoint_path(run, stage).parent
    shutil.rmtree(stage_dir)  # this stage starts from nothing; the lower ones are the reference's
    # Every third kill is followed by damage to the newest checkpoint: at least one whenever
    # there are three kills, so the fallback to the previous checkpoint is always exercised.
    damages = kills // 3
    report = Report(stage, damage_planned=damages)
    plan = ["kill-damage"] * damages + ["kill"] * (kills - damages) + ["signal"] * signals
    rng.shuffle(plan)
    logs = work / f"log-{stage}.txt"
    with open(logs, "w") as out:
        for what in plan:
            proc = subprocess.Popen(
                train_command(run, stage, steps), env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True
            )
            report.restarts += 1
            if not _wait_for_write(proc, stage_dir, timeout=300):
                break  # the stage finished before this interruption: the plan was too long for the steps
            if what == "kill-damage":
                # a random moment among the next steps at which there is a previous checkpoint to fall back on
                time.sleep(rng.uniform(0.0, 0.3))
                if not _kill_with_both_checkpoints(proc, stage_dir, rng, timeout=300):
                    break  # the stage finished first: the plan was too long for the steps
                report.kills += 1
                event = Event("kill-damage", -1, False, returncode=proc.returncode)
                event.damaged = rng.choice(["truncate", "flip"])
                _damage(stage_dir / "checkpoint.pt", event.damaged, rng)
                report.damaged += 1
                event.step = _newest_step(stage_dir)
            elif what == "kill":
                mode = rng.choice(["kill-write", "kill-step"])
                if mode == "kill-step":
                    # let the write finish, then kill at a random moment among the next steps
                    while unfinished_writes(stage_dir) and proc.poll() is None:
                        time.sleep(0.0005)
                    time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                left = bool(unfinished_writes(stage_dir))
                report.kills += 1
                report.kills_mid_write += left
                event = Event(mode, _newest_step(stage_dir), left, returncode=proc.returncode)
            else:
                sig = rng.choice([signal.SIGTERM, signal.SIGINT])
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(sig)
                proc.wait(timeout=120)
                report.signals += 1
                expected = 128 + int(sig)
                if proc.returncode != expected and proc.returncode != 0:
                    raise AssertionError(f"{sig.name}: exit status {proc.returncode}, expected {expected}")
                event = Event(
                    sig.name.lower(),
                    _newest_step(stage_dir),
                    bool(unfinished_writes(stage_dir)),
                    returncode=proc.returncode,
                )
            report.events.append(event)
            if log:
                print(f"  stage {stage}: {event}", flush=True)
        final = subprocess.run(
            train_command(run, stage, steps),
            check=False,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        report.restarts += 1
    if final.returncode != 0:
        raise AssertionError(f"final run of stage {stage} failed; see {logs}")
    text = logs.read_text()
    report.fallbacks = text.count("resuming from checkpoint.prev.pt instead")
    got = load_checkpoint(checkpoint_path(run, stage))
    want = load_checkpoint(checkpoint_path(ref, stage))
    report.identical = got["digest"] == want["digest"] and got["step"] == want["step"] == steps
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs per stage kind (default 10)")
    parser.add_argument("--signals", type=int, default=2, help="SIGTERM/SIGINT stops per stage kind (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    args = parser.parse_args(argv)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="progvq-crash-"))
    steps = 25 * (args.kills + args.signals) + 20  # enough steps that every interruption lands before the end
    started = time.perf_counter()
    ref = reference(work, steps)
    reports = []
    for stage in STAGES:
        report = interrupt_stage(
            ref, work, stage, steps, kills=args.kills, signals=args.signals, seed=args.seed, log=True
        )
        reports.append(report)
        print(f"stage {stage}: {report.kills} kills ({report.kills_mid_write} mid-write), {report.signals} signals, "
              f"{report.damaged} damaged, {report.fallbacks} fallbacks, identical: {report.identical}", flush=True)
    summary = {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "stages": [asdict(r) for r in reports],
    }
    print(json.dumps(summary, indent=1))
    ok = all(
        r.identical
        and r.kills >= args.kills
        and r.signals >= args.signals
        and r.damaged == r.damage_planned == r.fallbacks
        for r in reports
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Running stages through the command line, as the pipeline and the continual-learning round do.

    runner = Runner(Path("runs/demo"), force=False, run_command=main)   # chatforge.commands.main.main
    runner.stage("sft", ["sft", "--base", ..., *to_flags({"steps": 80})], Path("runs/demo/sft"))

A stage is a `chatforge` command line and the folder it writes. `Runner.stage` runs it unless its
stamp (`runs/NAME/.pipeline/STAGE.json`: the command line, extra input fingerprints and the
stamp of the stage before it) is unchanged and its output exists, so a changed setting or input
re-runs that stage and everything after it. Both `pipeline.py` and `continual.py` use it; it
lives apart so that neither imports the other for it. The command line itself is handed in
(`run_command`, the `main` of `chatforge.commands.main`): the pipeline layer sits below the
command line and does not import it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from chatforge import files
from chatforge.data.sources import file_stats
from chatforge.errors import ChatforgeError

# Runs one `chatforge` command line (argv without the program name); returns its exit code.
RunCommand = Callable[[list[str]], int]


def to_flags(options: dict) -> list[str]:
    """{'vocab_size': 8192, 'fast': True, 'paths': [a, b]} -> ['--vocab-size', '8192', '--fast', '--paths', a, b]."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def fingerprint(paths: list[Path]) -> str:
    """A cheap fingerprint of the input files: path, size and mtime of every file a build reads."""
    return hashlib.sha256(json.dumps(file_stats(paths)).encode()).hexdigest()


def model_stamp(path: Path) -> str:
    """Path, size and mtime of a model file (or of every file in a model folder)."""
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


class Runner:
    """Runs stages through the command line (`run_command`), skipping the up-to-date ones and timing each."""

    def __init__(self, run_dir: Path, force: bool, run_command: RunCommand):
        self.run_dir = run_dir
        self.run_command = run_command
        self.stamps = run_dir / ".pipeline"
        self.force = force
        self.times: list[tuple[str, float, str]] = []
        self.upstream = ""  # the previous stage's stamp: a change upstream re-runs everything after

    def _chain(self, stamp: str, finished: str) -> None:
        # The next stage's stamp holds this one's settings AND when it last produced its output:
        # a stage that re-ran (output deleted, stamp removed) re-runs everything after it too.
        self.upstream = hashlib.sha256(f"{stamp}:{finished}".encode()).hexdigest()

    def stage(self, name: str, argv: list[str], output: Path, extra: str = "", always: bool = False) -> None:
        """Run `chatforge ARGV` unless up to date. `always` stages (fetch, whose own cache makes a
        re-run cheap) run every time and do not enter the chain of stamps."""
        stamp = hashlib.sha256(json.dumps([name, argv, extra, self.upstream]).encode()).hexdigest()
        stamp_file = self.stamps / f"{name}.json"
        record = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
        done = record.get("stamp") == stamp
        if done and output.exists() and not self.force and not always:
            print(f"\n== {name}: up to date ({output}), skipped", flush=True)
            self.times.append((name, 0.0, "skipped"))
            self._chain(stamp, record.get("finished", ""))
            return
        print(f"\n== {name}: chatforge {' '.join(argv)}", flush=True)
        t0 = time.time()
        code = self.run_command(argv)
        seconds = time.time() - t0
        if code != 0:
            raise ChatforgeError(f"stage {name} failed (exit {code}); fix the error above and run the pipeline "
                                 "again: finished stages are skipped")
        finished = f"{time.time():.6f}"
        files.write_json(stamp_file, {"stamp": stamp, "argv": argv, "seconds": round(seconds, 1), "finished": finished})
        if not always:
            self._chain(stamp, finished)
        self.times.append((name, seconds, "ran"))
        print(f"== {name}: done in {seconds:.1f}s", flush=True)

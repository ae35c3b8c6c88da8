"""Top frames of a py-spy profile, as text.

py-spy attaches to a running process (no restart, no code change) and
`--format raw` writes collapsed stacks ("frame;frame;frame count"). This
module starts that recording for bench_peers.py --profile and turns the
file into three short tables: functions by own time (where the CPU is
spent), functions by cumulative time (which call paths cost it), and files
by own time. Line numbers are folded so one function is one row.

    python bench/profile_frames.py PROFILE.raw [--top 25]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

from harness import Child, table

TRUNK = 0.9


def attach(pid: int, out: Path, log: Path, rate: int = 200) -> Child:
    """Record `pid` with py-spy until it exits; the raw stacks go to `out`.
    --nonblocking keeps the pauses py-spy would add out of the timings."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return Child("py-spy", [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                            "--nonblocking", "--output", str(out)], log)


def _short(path: str) -> str:
    """A path short enough to read: the package-relative part for installed
    and standard-library modules, else the last two components."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    parts = Path(path).parts
    for i, p in enumerate(parts):
        if p.startswith("python3.") and i > 0 and parts[i - 1] == "lib":
            return "/".join(parts[i + 1:])
    return "/".join(parts[-2:])


def _label(frame: str) -> tuple[str, str]:
    """("func (file)", "file") of one py-spy frame "func (path:line)"."""
    func, _, loc = frame.rpartition(" (")
    if not func:
        return frame, frame
    path = _short(loc.rstrip(")").rsplit(":", 1)[0])
    return f"{func} ({path})", path


def summarize(raw: Path) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """(samples, own per function, cumulative per function, own per file)."""
    own: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        labels = [_label(f) for f in stack.split(";")]
        own[labels[-1][0]] += count
        files[labels[-1][1]] += count
        for name in {lab for lab, _ in labels}:
            cum[name] += count
    return total, own, cum, files


def report(raw: Path, top: int = 25) -> str:
    total, own, cum, files = summarize(raw)
    if not total:
        return f"no samples in {raw}"

    def rows(c: Counter[str], n: int) -> list[tuple[str, str, str]]:
        return [(f"{100 * v / total:5.1f} %", str(v), k) for k, v in c.most_common(n)]

    # The trunk (entry point, click, the event loop) is on nearly every stack
    # and says nothing; leave it out of the cumulative table.
    branches = Counter({k: v for k, v in cum.items() if v < TRUNK * total})

    return "\n\n".join([
        f"py-spy: {total} samples (threads busy; idle waits excluded), {raw}",
        "By own time (the frame on top of the stack):\n" + table(["own", "samples", "function (file)"],
                                                                  rows(own, top)),
        f"By cumulative time (the frame anywhere on the stack; frames on more than {TRUNK:.0%} of the stacks "
        "left out):\n" + table(["cum", "samples", "function (file)"], rows(branches, top)),
        "Files by own time:\n" + table(["own", "samples", "file"], rows(files, 12)),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(report(args.raw, args.top))


if __name__ == "__main__":
    main()

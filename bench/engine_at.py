"""Make an importable copy of the engine at a git revision; print its path.

The benchmarks measure whatever `oncely` Python imports, which for an
editable install is a working tree that may be mid-change. To measure a
commit instead, export it and put it first on PYTHONPATH (child processes
inherit it):

    PYTHONPATH=$(python bench/engine_at.py main) python bench/bench_peers.py

The repository maps subpackages to top-level directories
([tool.setuptools.package-dir] in pyproject.toml); the copy links them
under `oncely/` so a plain import finds them.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tarfile
import tempfile
import tomllib
from pathlib import Path


def export(rev: str, repo: Path) -> Path:
    """The directory to put on PYTHONPATH for `rev` (reused if it exists)."""
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    root = Path(tempfile.gettempdir()) / f"oncely-engine-{sha}"
    pkg = root / "pkg"
    if (pkg / "oncely" / "__init__.py").exists():
        return pkg
    tar = subprocess.run(["git", "-C", str(repo), "archive", sha], check=True, capture_output=True).stdout
    src = root / "src"
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(src, filter="data")
    dirs = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "oncely").symlink_to(src / dirs["oncely"])
    for name, d in dirs.items():  # oncely.processor -> processor/, ...
        if name != "oncely":
            pkg.joinpath(*name.split(".")).symlink_to(src / d)
    return pkg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="a commit, branch or tag")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    print(export(args.rev, args.repo))


if __name__ == "__main__":
    main()

"""The command line every peer process takes (stdlib only: the Quix
process runs in its own virtualenv without oncely)."""

from __future__ import annotations

import argparse


def peer_args(doc: str | None, state_dir: bool) -> argparse.Namespace:
    """--bootstrap, --source, --out, --group, --commit-interval (0.1 s), and
    --state-dir for systems that keep state."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--bootstrap", "--source", "--out", "--group") + (("--state-dir",) if state_dir else ()):
        ap.add_argument(name, required=True)
    ap.add_argument("--commit-interval", type=float, default=0.1)
    return ap.parse_args()

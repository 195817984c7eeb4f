"""python -m replaceme_core.bundle build|plan|check — see builder.py, slices.py, check.py."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .builder import DEFAULT_PLATFORMS, ROOT, BundleError, Target, build_bundle
from .slices import SLICES, SliceError, get_slice, plan_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replaceme_core.bundle", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the parts of one slice (make bundle PROFILE=gpu SLICE=gpu-01)")
    b.add_argument("--slice", default=None, help=f"one of {', '.join(SLICES)} (default: the profile's first)")
    b.add_argument("--profile", default=None, help="gpu | smoke (checks the slice's profile; picks its default slice)")
    b.add_argument("--out", default=None, help="folder of parts (default build/bundle/<slice>)")
    b.add_argument("--python-version", default="3.12", help="the node's Python (default 3.12)")
    b.add_argument("--platform", action="append", default=None, help=f"wheel platform tags (default {', '.join(DEFAULT_PLATFORMS)})")
    b.add_argument("--node", default=None, help="the node's packages: name==version per line (default node_h200.txt)")
    b.add_argument("--limit-mib", type=float, default=60.0, help="one transfer, the project included (default 60)")
    sub.add_parser("plan", help="every gpu slice with its estimated GPU minutes")
    c = sub.add_parser("check", help="make bundle-check: build a smoke bundle and run it on CPU with no index or network")
    c.add_argument("--slice", default="smoke-01")
    c.add_argument("--reuse-reference", action="store_true", help="keep an earlier ordinary smoke run as the reference")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "plan":
            print("\n".join(plan_table()))
            return 0
        if a.cmd == "check":
            from .check import bundle_check

            return bundle_check(slice_name=a.slice, reuse_reference=a.reuse_reference)
        s = get_slice(a.slice, a.profile)
        target = Target(python_version=a.python_version, platforms=tuple(a.platform or DEFAULT_PLATFORMS),
                        **({"node_file": a.node} if a.node else {}))
        res = build_bundle(s, Path(a.out) if a.out else ROOT / "build" / "bundle" / s.name, target=target, limit_mib=a.limit_mib)
        print(res.summary())
        return 0
    except (BundleError, SliceError) as e:
        print(f"bundle: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""On the node, after the install: is every version the bundle resolved the one Python will import?

    python -m replaceme_core.bundle.verify_env WORK/requirements.txt WORK/site

Carried packages must be imported from the private folder at exactly their version (they shadow the node's copies);
torch must be the node's own (never from the private folder); every requirement of a carried package must be met by
what is visible. One line per problem, exit 1; nothing is imported but importlib.metadata and packaging.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def problems(requirements: Path, site: Path) -> list[str]:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import Version

    visible: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and _norm(name) not in visible:  # sys.path order: the first one found is the one imported
            visible[_norm(name)] = dist
    out, carried = [], {}
    for line in requirements.read_text().splitlines():
        spec, _, note = line.partition("#")
        if not spec.strip():
            continue
        name, _, version = spec.strip().partition("==")
        if "carried" in note:
            carried[_norm(name)] = version
    site = site.resolve()
    for name, version in sorted(carried.items()):
        dist = visible.get(name)
        if dist is None:
            out.append(f"{name}=={version} was carried but is not importable")
            continue
        where = Path(str(dist.locate_file(""))).resolve()
        if Version(dist.version) != Version(version) or site not in (where, *where.parents):
            out.append(f"{name}: Python imports {dist.version} from {where}, not the carried {version} from {site}")
    torch = visible.get("torch")
    if torch is None:
        out.append("torch is not installed on this node (the bundle never carries it)")
    elif site in Path(str(torch.locate_file(""))).resolve().parents:
        out.append("torch would be imported from the private folder; the node's own torch must be used")
    env = default_environment()
    for name in sorted(carried):
        dist = visible.get(name)
        for r in (dist.requires or []) if dist else []:
            req = Requirement(r)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            have = visible.get(_norm(req.name))
            if have is None:
                out.append(f"{name} needs {req}, which is not installed")
            elif req.specifier and not req.specifier.contains(have.version, prereleases=True):
                out.append(f"{name} needs {req}; the node has {have.version}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = problems(Path(args[0]), Path(args[1]))
    for line in found:
        print(f"verify_env: {line}", file=sys.stderr)
    if not found:
        n = sum(1 for l in Path(args[0]).read_text().splitlines() if "carried" in l)
        print(f"verify_env: {n} carried packages shadow the node's; torch is the node's; requirements met")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

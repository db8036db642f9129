"""constraints.txt (the versions scripts/setup_env.sh installs) must stay inside pyproject.toml's ranges."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_constraints_pin_versions_the_project_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = {canonicalize_name(r.name): r.specifier for r in declared}
    pins = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins, "constraints.txt pins nothing"
    outside = [str(p) for p in pins
               if canonicalize_name(p.name) in ranges
               and not ranges[canonicalize_name(p.name)].contains(next(iter(p.specifier)).version)]
    assert outside == [], f"pinned outside pyproject.toml's ranges: {outside}"
    unpinned = sorted(set(ranges) - {"torch", "bitsandbytes"} - {canonicalize_name(p.name) for p in pins})
    assert unpinned == [], f"direct dependencies constraints.txt does not pin: {unpinned}"

"""The check of benchmarks/gpu_wheels.sh: will .whl/ install on the GPU machine beside its image's packages?

    python benchmarks/gpu_wheels_check.py [--limit-mib 64]

One version per package, none the image has already; every requirement of every wheel (markers evaluated for
CPython 3.12 on Linux x86_64) met by another wheel or by benchmarks/gpu_image_packages.txt (versions compared
where recorded); a pip dry run with --no-index --no-deps into an empty target for that interpreter and
platform; the wheels plus the repository's tracked files under what a device call carries. Exit 1 with one
``error:`` line per problem.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "extra": ""}  # fmt: skip


def image_packages() -> dict[str, Version | None]:
    have: dict[str, Version | None] = {}
    for line in (ROOT / "benchmarks" / "gpu_image_packages.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            have[canonicalize_name(name)] = Version(version) if version else None
    return have


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's requirements that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_ENV)]


def check_requirements(wheels: list[Path], have: dict[str, Version | None]) -> list[str]:
    problems, brought = [], {}
    for wheel in wheels:
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in brought:
            problems.append(f"{name}: two versions ({brought[name]}, {version})")
        if name in have:
            problems.append(f"{name}: the image has it already")
        brought[name] = version
    for wheel in wheels:
        for req in requirements(wheel):
            name = canonicalize_name(req.name)
            version = brought.get(name, have.get(name, False))
            if version is False:
                problems.append(f"{wheel.name}: needs {req}, neither a wheel here nor in the image")
            elif version is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel.name}: needs {req}, has {version}")
            elif version is None and req.specifier:
                print(f"note: {wheel.name} needs {req}; the image's version is not recorded")
    return problems


def dry_run(wheels: list[Path]) -> list[str]:
    """pip's own verdict for CPython 3.12 on manylinux x86_64 (the machine's glibc takes manylinux_2_28 and every
    older tag; pip matches each exactly)."""
    platforms = [a for n in (28, 27, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
           *platforms, "--platform", "manylinux2014_x86_64", "--target", "/tmp/gpu_wheels_dry_run",
           *map(str, wheels)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    return [f"pip dry run on CPython 3.12 manylinux x86_64: {result.stderr.strip()}"] if result.returncode else []


def check_size(wheels: list[Path], limit_mib: int) -> list[str]:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    repo = sum((ROOT / p.decode()).stat().st_size for p in tracked if p and (ROOT / p.decode()).is_file())
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; repository {repo / 2**20:.1f} MiB; together "
          f"{(size + repo) / 2**20:.1f} of {limit_mib} MiB")  # fmt: skip
    if size + repo >= limit_mib * 2**20:
        return [f"wheels and repository: {(size + repo) / 2**20:.1f} MiB, over the {limit_mib} MiB a call carries"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-mib", type=int, default=64)
    args = p.parse_args(argv)
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        print("error: .whl/: no wheels (run benchmarks/gpu_wheels.sh)", file=sys.stderr)
        return 1
    problems = check_requirements(wheels, image_packages()) + dry_run(wheels) + check_size(wheels, args.limit_mib)
    for wheel in wheels:
        print(f"  {wheel.name}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

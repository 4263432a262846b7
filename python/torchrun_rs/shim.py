"""``python -m torchrun_rs.shim [--force | --remove]``: makes ``torchrun`` in
the active environment run torchrun-rs.

Opt-in only: the torch wheel installs its own ``torchrun`` there, and pip
would silently overwrite one package's file with the other's. Without
``--force`` an existing ``torchrun`` that is not our shim is left alone.
``--remove`` takes our shim away (pip does not know of it).
"""

import os
import sys
import sysconfig

from torchrun_rs import find_bin

MARK = "# torchrun-rs shim"


def _ours(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARK in f.read(4096)
    except OSError:
        return False


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a not in ("--force", "--remove")]
    if unknown:
        print(f"usage: python -m torchrun_rs.shim [--force | --remove] (unknown: {' '.join(unknown)})", file=sys.stderr)
        return 2
    target = os.path.join(sysconfig.get_path("scripts"), "torchrun")
    if "--remove" in args:
        if os.path.lexists(target) and _ours(target):
            os.remove(target)
            print(f"removed the torchrun-rs shim {target}")
            return 0
        print(f"{target} is not a torchrun-rs shim; left alone", file=sys.stderr)
        return 1
    if os.path.lexists(target) and not _ours(target) and "--force" not in args:
        print(
            f"{target} exists and is not ours (torch installs its own torchrun there); "
            "leaving it alone. Use --force to replace it, or alias torchrun=torchrun-rs",
            file=sys.stderr,
        )
        return 1
    exe = find_bin()
    tmp = target + ".torchrun-rs.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f'#!/bin/sh\n{MARK}: python -m torchrun_rs.shim --remove takes it away\nexec "{exe}" "$@"\n')
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    print(f"{target} now runs {exe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

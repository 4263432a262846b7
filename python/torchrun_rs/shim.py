"""``python -m torchrun_rs.shim [--force | --in-process | --remove]``: makes
the active environment use torchrun-rs.

- without options: ``torchrun`` runs torchrun-rs (a small script in the
  environment's bin directory). Opt-in only: the torch wheel installs its
  own ``torchrun`` there, and pip would silently overwrite one package's
  file with the other's; without ``--force`` an existing ``torchrun`` that is
  not our shim is left alone.
- ``--in-process``: the tools that call torchrun's Python API inside their
  own process (accelerate, torchtune, Lightning Fabric, ``elastic_launch``)
  use torchrun-rs: a ``.pth`` file in site-packages imports a small hook at
  start-up (see ``torchrun_rs._hook``). ``TORCHRUN_RS_IN_PROCESS=0`` turns it
  off for one run.
- ``--remove``: takes away whatever this command installed (pip does not
  know of either: run it before ``pip uninstall torchrun-rs``). A ``.pth``
  line left behind does nothing once the package is gone; delete the file
  by hand then.
"""

import os
import sys

from torchrun_rs import find_bin

MARK = "# torchrun-rs shim"
PTH = "torchrun_rs_in_process.pth"
# One line that site runs at every start: a finder that does nothing until
# one of torch's two launcher modules is imported (then torchrun_rs._hook
# does the work). Defined inline: importing a package here would cost every
# Python start a few milliseconds. pip uninstall leaves this file behind, so
# the line must survive the package's absence: the hook is imported inside
# a try, and when it cannot be, torch loads its modules untouched.
PTH_LINE = (
    "import os, sys; os.environ.get('TORCHRUN_RS_IN_PROCESS', '1') == '0' or exec("
    "\"class _TorchrunRsFinder:\\n _torchrun_rs = True\\n"
    " def find_spec(self, name, path=None, target=None):\\n"
    "  if name not in ('torch.distributed.run', 'torch.distributed.launcher.api'): return None\\n"
    "  try:\\n"
    "   import torchrun_rs._hook as h\\n"
    "  except Exception:\\n"
    "   return None\\n"
    "  return h._Finder().find_spec(name, path, target)\\n"
    "sys.meta_path.insert(0, _TorchrunRsFinder())\")"
)
USAGE = "usage: python -m torchrun_rs.shim [--force | --in-process | --remove]"


def _ours(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARK in f.read(4096)
    except OSError:
        return False


def _paths():
    import sysconfig

    return (
        os.path.join(sysconfig.get_path("scripts"), "torchrun"),
        os.path.join(sysconfig.get_path("purelib"), PTH),
    )


def _write(path, text, mode=0o644):
    tmp = path + ".torchrun-rs.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        print(__doc__.split("\n", 2)[2].rstrip())
        return 0
    unknown = [a for a in args if a not in ("--force", "--remove", "--in-process")]
    if unknown or ("--remove" in args and len(args) > 1):
        print(f"{USAGE} (unexpected: {' '.join(unknown or args)})", file=sys.stderr)
        return 2
    target, pth = _paths()
    if "--remove" in args:
        removed = []
        if os.path.lexists(target) and _ours(target):
            os.remove(target)
            removed.append(target)
        if os.path.lexists(pth) and _ours(pth):
            os.remove(pth)
            removed.append(pth)
        if not removed:
            print(f"no torchrun-rs shim here ({target}, {pth}); nothing removed", file=sys.stderr)
            return 1
        for p in removed:
            print(f"removed the torchrun-rs shim {p}")
        return 0
    if "--in-process" in args:
        if os.path.lexists(pth) and not _ours(pth):
            print(f"{pth} exists and is not ours; leaving it alone", file=sys.stderr)
            return 1
        find_bin()  # the launcher must be there before anything uses it
        _write(pth, f"{MARK}: python -m torchrun_rs.shim --remove takes it away\n{PTH_LINE}\n")
        print(f"torchrun's Python API in this environment now runs torchrun-rs ({pth})")
        return 0
    if os.path.lexists(target) and not _ours(target) and "--force" not in args:
        print(
            f"{target} exists and is not ours (torch installs its own torchrun there); "
            "leaving it alone. Use --force to replace it, or alias torchrun=torchrun-rs",
            file=sys.stderr,
        )
        return 1
    exe = find_bin()
    _write(target, f'#!/bin/sh\n{MARK}: python -m torchrun_rs.shim --remove takes it away\nexec "{exe}" "$@"\n', 0o755)
    print(f"{target} now runs {exe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

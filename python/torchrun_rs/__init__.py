"""torchrun-rs: PyTorch's torchrun launcher rebuilt in Rust.

The wheel installs two programs into the environment's bin directory,
``torchrun-rs`` and ``torchrun-rs-store``. ``python -m torchrun_rs ARGS``
runs the launcher; ``python -m torchrun_rs.shim`` installs an opt-in
``torchrun`` shim into the active environment (``--in-process``: an import
hook for the tools that call torchrun's Python API). ``torchrun_rs.run`` and
``torchrun_rs.launcher.api`` offer torchrun's Python API.
"""

import os
import sys

__all__ = ["find_bin"]


def find_bin(name="torchrun-rs"):
    """The path of an installed torchrun-rs program (``TORCHRUN_RS_BIN``
    names the launcher explicitly, e.g. a build tree's)."""
    override = os.environ.get("TORCHRUN_RS_BIN")
    if override and name == "torchrun-rs":
        return override
    import sysconfig  # here, not at import: the in-process hook imports this package at every start

    exe = name + (".exe" if sys.platform == "win32" else "")
    candidates = [sysconfig.get_path("scripts")]
    user_scheme = sysconfig.get_preferred_scheme("user") if hasattr(sysconfig, "get_preferred_scheme") else None
    if user_scheme:
        candidates.append(sysconfig.get_path("scripts", scheme=user_scheme))
    candidates.append(os.path.dirname(sys.executable))
    for d in candidates:
        p = os.path.join(d, exe)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    raise FileNotFoundError(f"{exe} is not installed next to this Python ({', '.join(candidates)})")

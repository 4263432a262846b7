"""The in-process hook (``python -m torchrun_rs.shim --in-process``).

A ``.pth`` line adds a small meta-path finder at every interpreter start;
this module is imported only when torch's launcher is. When ``torch.distributed.run`` or
``torch.distributed.launcher.api`` is imported, the finder lets torch load
the module as usual and then points its entry points at torchrun-rs:
``run`` (so ``main`` too), ``get_args_parser`` and ``parse_args``, and
``launch_agent`` (so ``elastic_launch`` too). What torchrun-rs does not run
(a Python callable as entrypoint, ``--run-path``, a ``--logs-specs``
plugin) goes to torch's own code, with one notice.
``TORCHRUN_RS_IN_PROCESS=0`` turns the hook off for one run (the ``.pth``
line checks it). torch's installed files are never touched, and torch is
never worse off for the hook: with this package gone (``pip uninstall``
does not know the ``.pth`` file) the line does nothing, and when the
launcher cannot be run torch's own functions run, with one warning.
"""

import os
import sys

_TARGETS = ("torch.distributed.run", "torch.distributed.launcher.api")
_noticed = set()
_usable = None


def _launcher_usable(error=None):
    """Whether the launcher can be run (its flag table is read once per
    process). When it cannot (the binary removed, not executable, broken),
    torch's own functions run instead, with one warning: the hook never
    makes torch worse than without it. ``error``: a launch that could not
    start the binary."""
    global _usable
    if error is None and _usable is None:
        try:
            import torchrun_rs.run as ours

            ours._flag_table()
            _usable = True
        except Exception as e:  # whatever it is, torch's launcher still works
            error = e
    if error is not None and _usable is not False:
        _usable = False
        print(f"torchrun-rs: the launcher cannot be run ({error}); torch's own launcher is used", file=sys.stderr)
    return _usable


def _notice(what):
    if what not in _noticed:
        _noticed.add(what)
        print(f"torchrun-rs: {what} runs under torch's own launcher", file=sys.stderr)


def _patch_run(module):
    torch_run = module.run

    torch_get_args_parser = module.get_args_parser

    def run(args):
        if getattr(args, "run_path", False) or getattr(args, "logs_specs", None):
            _notice("--run-path" if getattr(args, "run_path", False) else "a --logs-specs plugin")
            return torch_run(args)
        if not _launcher_usable():
            return torch_run(args)
        import torchrun_rs.run as ours

        try:
            return ours.run(args)
        except OSError as e:  # the binary could not be started: nothing ran
            _launcher_usable(e)
            return torch_run(args)

    def get_args_parser():
        if not _launcher_usable():
            return torch_get_args_parser()
        import torchrun_rs.run as ours

        return ours.get_args_parser()

    run.__doc__ = torch_run.__doc__
    module.run = run
    module.get_args_parser = get_args_parser
    module._torchrun_rs = True


def _patch_launcher(module):
    torch_launch_agent = module.launch_agent

    def launch_agent(config, entrypoint, args, *rest, **kwargs):
        if not isinstance(entrypoint, str):
            _notice("a Python callable as entrypoint")
            return torch_launch_agent(config, entrypoint, args, *rest, **kwargs)
        if not _launcher_usable():
            return torch_launch_agent(config, entrypoint, args, *rest, **kwargs)
        from torchrun_rs.launcher.api import launch_agent as ours

        try:
            return ours(config, entrypoint, args)
        except OSError as e:  # the binary could not be started: nothing ran
            _launcher_usable(e)
            return torch_launch_agent(config, entrypoint, args, *rest, **kwargs)

    module.launch_agent = launch_agent
    module._torchrun_rs = True


class _Loader:
    """Delegates to torch's loader, then patches the module it ran."""

    def __init__(self, inner, patch):
        self._inner, self._patch = inner, patch

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder:
    _torchrun_rs = True

    def find_spec(self, name, path=None, target=None):
        if name not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_torchrun_rs", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        patch = _patch_run if name == _TARGETS[0] else _patch_launcher
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, patch)
        return spec

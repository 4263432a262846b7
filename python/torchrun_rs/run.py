"""torchrun's Python API (``torch.distributed.run``), backed by torchrun-rs.

``get_args_parser()`` returns a real ``argparse.ArgumentParser`` with torch
2.15's options, dest names, defaults and ``PET_*`` environment defaults. It
is built from the launcher's own flag table (``torchrun-rs
--torchrun-rs-flag-table``), so the two cannot drift apart. torchrun-rs's
own flags are not in it (their prefixes would change what torch's mean);
they are read from their ``PET_*`` variables by the launcher.

``config_from_args(args)`` returns ``(LaunchConfig, cmd, cmd_args)`` as torch
does; ``run(args)`` and ``main(args=None)`` launch the job with the
torchrun-rs binary, in a child process, and raise
``ChildFailedError`` when it fails. Importing this module does not import
torch.
"""

import argparse
import json
import os
import subprocess
import sys

from torchrun_rs import find_bin

__all__ = [
    "get_args_parser",
    "parse_args",
    "config_from_args",
    "determine_local_world_size",
    "parse_min_max_nnodes",
    "get_rdzv_endpoint",
    "run",
    "main",
]

_TABLE = None


def _flag_table():
    """The launcher's flag table (read once per process)."""
    global _TABLE
    if _TABLE is None:
        out = subprocess.run(
            [find_bin(), "--torchrun-rs-flag-table"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"torchrun-rs could not list its flags: {out.stderr.decode(errors='replace').strip()}"
            )
        _TABLE = json.loads(out.stdout)
    return _TABLE


def comma_separated_list(value):
    """torch's ``--duplicate-*-filters`` type: split on ``,``; ``,,`` is a
    literal comma."""
    if not value:
        return []
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


_TYPES = {"str": str, "int": int, "float": float, "comma_separated_list": comma_separated_list}


class env(argparse.Action):
    """torch's ``env`` action: the default is ``PET_<DEST>`` when set."""

    def __init__(self, dest, default=None, required=False, **kwargs):
        default = os.environ.get(f"PET_{dest.upper()}", default)
        if default:
            required = False
        super().__init__(dest=dest, default=default, required=required, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class check_env(argparse.Action):
    """torch's ``check_env`` action: a switch whose default is
    ``bool(int(PET_<DEST>))``."""

    def __init__(self, dest, default=False, **kwargs):
        default = bool(int(os.environ.get(f"PET_{dest.upper()}", "1" if default else "0")))
        super().__init__(dest=dest, const=True, default=default, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const)


def get_args_parser():
    """torchrun 2.15's argument parser."""
    parser = argparse.ArgumentParser(description="Torch Distributed Elastic Training Launcher")
    for f in _flag_table():
        torch = f["torch"]
        if torch is None or f["kind"] in ("help", "version"):
            continue
        names = f["names"]
        if f["dest"] == "print_completion":
            # Printed by the launcher itself (torch needs shtab for it).
            parser.add_argument(*names, dest="print_completion", default=None,
                                choices=torch["choices"], help=f["help"])
            continue
        if f["kind"] == "flag":
            parser.add_argument(*names, action=check_env, help=f["help"])
            continue
        kwargs = {"dest": f["dest"], "default": torch["default"], "help": f["help"]}
        if torch["type"]:
            kwargs["type"] = _TYPES[torch["type"]]
        if torch["choices"]:
            kwargs["choices"] = torch["choices"]
        if f["pet"]:
            kwargs["action"] = env
        parser.add_argument(*names, **kwargs)
    parser.add_argument(
        "training_script",
        type=str,
        help="Full path to the (single GPU) training program/script to be launched in parallel, "
        "followed by all the arguments for the training script.",
    )
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return parser


def parse_args(args):
    return get_args_parser().parse_args(args)


def parse_min_max_nnodes(nnodes):
    arr = nnodes.split(":")
    if len(arr) == 1:
        min_nodes = max_nodes = int(arr[0])
    elif len(arr) == 2:
        min_nodes, max_nodes = int(arr[0]), int(arr[1])
    else:
        raise RuntimeError(f'nnodes={nnodes} is not in "MIN:MAX" format')
    return min_nodes, max_nodes


def determine_local_world_size(nproc_per_node):
    """As torch: an integer, or ``cpu``/``gpu``/``xpu``/``auto`` resolved by
    the launcher (which counts devices without importing torch)."""
    try:
        return int(nproc_per_node)
    except ValueError:
        pass
    if nproc_per_node == "cpu":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count()
    out = subprocess.run(
        [find_bin(), "--dry-run", f"--nproc-per-node={nproc_per_node}", "--no-python", "true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PET_")},
    )
    for line in out.stdout.decode(errors="replace").splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "nproc_per_node":
            return int(value.split()[0])
    raise ValueError(out.stderr.decode(errors="replace").strip() or f"Unsupported nproc_per_node value: {nproc_per_node}")


def get_rdzv_endpoint(args):
    if args.rdzv_backend == "static" and not args.rdzv_endpoint:
        return f"{args.master_addr}:{args.master_port}"
    return args.rdzv_endpoint


def _rdzv_configs(text):
    """torch's ``_parse_rendezvous_config``."""
    out = {}
    text = text.strip()
    if not text:
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not key:
            raise ValueError(
                "The rendezvous configuration string must be in format <key1>=<value1>,...,<keyN>=<valueN>."
            )
        if not value:
            raise ValueError(f"The rendezvous configuration option '{key}' must have a value specified.")
        out[key] = value
    return out


def config_from_args(args):
    """``(LaunchConfig, cmd, cmd_args)`` for parsed ``args``, as torch
    builds them. The config also remembers ``args``, so that launching it
    passes every option on to torchrun-rs unchanged."""
    from torchrun_rs.launcher.api import DefaultLogsSpecs, LaunchConfig

    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    if not 0 < min_nodes <= max_nodes:
        raise AssertionError(f"min_nodes={min_nodes} and max_nodes={max_nodes} must satisfy 0 < min <= max")
    if args.max_restarts < 0:
        raise AssertionError("max_restarts must be >= 0")
    nproc_per_node = determine_local_world_size(args.nproc_per_node)
    rdzv_configs = _rdzv_configs(args.rdzv_conf)
    if args.rdzv_backend == "static":
        rdzv_configs["rank"] = args.node_rank
    ranks = None
    if args.local_ranks_filter:
        try:
            ranks = set(map(int, args.local_ranks_filter.split(",")))
        except ValueError as e:
            raise ValueError(
                "--local_ranks_filter must be a comma-separated list of integers e.g. --local_ranks_filter=0,1,2"
            ) from e
    config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc_per_node,
        run_id=args.rdzv_id,
        role=args.role,
        rdzv_endpoint=get_rdzv_endpoint(args),
        rdzv_backend=args.rdzv_backend,
        rdzv_configs=rdzv_configs,
        max_restarts=args.max_restarts,
        monitor_interval=args.monitor_interval,
        start_method=args.start_method,
        log_line_prefix_template=args.log_line_prefix_template
        or os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"),
        local_addr=args.local_addr,
        logs_specs=DefaultLogsSpecs(args.log_dir, args.redirects, args.tee, ranks),
        event_log_handler=args.event_log_handler,
        numa_options=args.numa_binding,
        signals_to_handle=args.signals_to_handle,
        duplicate_stdout_filters=args.duplicate_stdout_filters,
        duplicate_stderr_filters=args.duplicate_stderr_filters,
        virtual_local_rank=args.virtual_local_rank,
        shutdown_timeout=args.shutdown_timeout,
    )
    config._args = args
    cmd_args = []
    if args.run_path:
        raise ValueError(
            "--run-path runs the script as a function inside a Python worker: use torch's launcher for it"
        )
    if not args.no_python:
        cmd = os.getenv("PYTHON_EXEC", sys.executable)
        cmd_args.append("-u")
        if args.module:
            cmd_args.append("-m")
        cmd_args.append(args.training_script)
    else:
        if args.module:
            raise ValueError("Don't use both the '--no-python' flag and the '--module' flag at the same time.")
        cmd = args.training_script
    cmd_args.extend(args.training_script_args)
    return config, cmd, cmd_args


def argv_from_args(args):
    """The launcher's command line for a parsed (or hand-built) namespace:
    every torch option the namespace holds, then the script and its
    arguments."""
    argv = []
    for f in _flag_table():
        torch = f["torch"]
        if torch is None or f["kind"] in ("help", "version") or f["dest"] == "print_completion":
            continue
        if not hasattr(args, f["dest"]):
            continue
        value = getattr(args, f["dest"])
        name = next(n for n in f["names"] if n.startswith("--"))
        if f["kind"] == "flag":
            if value:
                argv.append(name)
            continue
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                continue
            value = ",".join(str(v).replace(",", ",,") for v in value)
        argv.append(f"{name}={value}")
    return argv


def run(args):
    """Launches the job ``args`` describes with torchrun-rs; raises
    ``ChildFailedError`` when it fails."""
    from torchrun_rs.launcher.api import _launch

    script = args.training_script
    tail = list(getattr(args, "training_script_args", []) or [])
    # Workers run under the caller's Python, as torch's (PYTHON_EXEC wins).
    python = None if getattr(args, "no_python", False) else os.getenv("PYTHON_EXEC", sys.executable)
    signals = getattr(args, "signals_to_handle", None) or "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    _launch(argv_from_args(args) + [script, *tail], name=script, python=python, signals_to_handle=signals)


def main(args=None):
    args = parse_args(args)
    run(args)


if __name__ == "__main__":
    main()

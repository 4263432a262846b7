"""The command line, argument for argument: thousands of generated argument
vectors, and every unique prefix of torch's long options, through torch
2.15's own parser (get_args_parser().parse_args + config_from_args) and
through torchrun-rs (--dry-run). Both must accept or both refuse; where both
accept, the script, its arguments, -m/--no-python, --nnodes and
--max-restarts must agree.
Usage: differential_cli.py TORCHRUN_RS [COUNT] [SEED]
Known, deliberate differences (README, Differences) are not generated:
Python's int() accepting 1_0 and non-ASCII digits, --node-rank outside
--nnodes, --master-port over 65535, --numa-binding without GPUs (checked up
front), a prefix of both spellings of one option (--nproc: ambiguous to
Python 3.11's argparse, taken as Python 3.12 takes it)."""
import contextlib
import io
import os
import random
import shlex
import subprocess
import sys

import torch.distributed.run as torch_run

BIN = sys.argv[1]
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
rng = random.Random(int(sys.argv[3]) if len(sys.argv) > 3 else 15)

for k in list(os.environ):
    if k.startswith("PET_"):
        del os.environ[k]
os.environ["OMP_NUM_THREADS"] = "1"

VALUES = {
    "--nnodes": ["1", "2", "1:2", "2:1", "0", "1:2:3", "x", " 1", "1:"],
    "--nproc-per-node": ["1", "2", "cpu", " cpu", " 2", "0", "-1", "x", "auto"],
    "--max-restarts": ["0", "3", "-1", "1.0", "99999999999", " 2", "x"],
    "--monitor-interval": ["0.1", "1", "x", "1e-3"],
    "--start-method": ["spawn", "fork", "SPAWN", "forkserver"],
    "--role": ["trainer", "-x", "-1.5", "a b"],
    "-r": ["0", "3", "0:1,1:2", "11", "0:1,", "-3", "1\n"],
    "-t": ["0", "3", "1:3", "4", "1\n"],
    "--local-ranks-filter": ["0", "0,1", "-1", "x", "1,x"],
    "--log-dir": ["/tmp/x", "-", "--tee"],
    "--rdzv-conf": ["join_timeout=5", "'join_timeout=5,timeout=5'", "a", "=v", "a=1,,b=2"],
    "--signals-to-handle": ["SIGTERM", "SIGTERM,SIGUSR1"],
    "--node-rank": ["0"],
}
# A value each option takes, for the prefix vectors.
PREFIX_VALUES = {
    "rdzv_backend": "static", "rdzv_endpoint": "127.0.0.1:29500", "rdzv_conf": "a=1",
    "start_method": "spawn", "numa_binding": "node", "event_log_handler": "null",
    "log_dir": "/tmp/x", "master_addr": "127.0.0.1", "local_addr": "127.0.0.1",
    "signals_to_handle": "SIGTERM", "logs_specs": "default", "log_line_prefix_template": "p",
}
SWITCHES = ["-m", "--no-python", "--standalone", "--virtual-local-rank"]
SCRIPTS = ["x.py", "pkg.mod", "-", "prog"]
SCRIPT_ARGS = ["--lr", "1", "--", "-m", "--nproc-per-node", "5", "a"]


def vector():
    v = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.2:
            v.append(rng.choice(SWITCHES))
        elif r < 0.25:
            v.append("-mr3" if rng.random() < 0.5 else "-mt3")
        elif r < 0.3:
            v.append("--")
        else:
            flag = rng.choice(list(VALUES))
            value = rng.choice(VALUES[flag])
            if rng.random() < 0.4 and flag.startswith("--"):
                v.append(f"{flag}={value}")
            else:
                v += [flag, value]
    if rng.random() < 0.95:
        v.append(rng.choice(SCRIPTS))
        v += [rng.choice(SCRIPT_ARGS) for _ in range(rng.randint(0, 3))]
    return v


def prefixes():
    parser = torch_run.get_args_parser()
    longs = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    out = []
    for name in longs:
        for n in range(3, len(name) + 1):
            p = name[:n]
            matching = [s for a in parser._actions for s in a.option_strings if s.startswith(p)]
            owners = {a.dest for a in parser._actions for s in a.option_strings if s.startswith(p)}
            # A prefix of both spellings of one option (--nproc) is
            # ambiguous to Python 3.11's argparse only; torchrun-rs takes it
            # as Python 3.12 does (a deliberate difference).
            if len(owners) == 1 and (len(matching) == 1 or p in longs):
                dest = owners.pop()
                action = next(a for a in parser._actions if a.dest == dest)
                # --numa-binding: torchrun-rs checks the GPUs up front
                # (README, Differences); torch only when workers start.
                if dest in ("help", "print_completion", "numa_binding"):
                    continue
                value = PREFIX_VALUES.get(dest, "1")
                out.append([p, "x.py"] if action.nargs == 0 else [f"{p}={value}", "x.py"])
    return out


def torch_side(v):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = torch_run.parse_args(v)
            # run()'s own steps before config_from_args (torch 2.15).
            if args.standalone or (
                args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None
                and torch_run.parse_min_max_nnodes(args.nnodes)[1] == 1
            ):
                args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
            if args.master_port is None:
                args.master_port = 29500
            config, cmd, cmd_args = torch_run.config_from_args(args)
            # What torch checks later, when the agent starts: a positive
            # worker count, a registered rendezvous backend.
            if config.nproc_per_node <= 0:
                raise AssertionError("local_world_size must be positive (WorkerSpec)")
            if config.rdzv_backend not in ("static", "c10d", "etcd", "etcd-v2"):
                raise ValueError(f"The rendezvous backend '{config.rdzv_backend}' is not registered")
            if config.rdzv_backend == "static":
                int(config.rdzv_configs["timeout"])  # the static handler reads it
    except SystemExit as e:
        return ("refused", err.getvalue().strip().splitlines()[-1:] if e.code else ["exit 0"])
    except Exception as e:  # torch's own checks (exit 1 with a traceback)
        return ("refused", [f"{type(e).__name__}: {e}"])
    script_args = list(args.training_script_args)
    return ("ok", {
        "script": args.training_script,
        "script_args": script_args,
        "module": bool(args.module),
        "no_python": bool(args.no_python),
        "run_path": bool(args.run_path),
        "nnodes": f"{config.min_nodes}" if config.min_nodes == config.max_nodes else f"{config.min_nodes}:{config.max_nodes}",
        "max_restarts": min(config.max_restarts, 2**32 - 1),
    })


def our_side(v):
    out = subprocess.run([BIN, "--dry-run", *v], capture_output=True, env={**os.environ, "PYTHON_EXEC": "python3"})
    if out.returncode != 0:
        return ("refused", out.stderr.decode(errors="replace").strip().splitlines()[:1])
    text = out.stdout.decode(errors="replace")
    facts = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("nnodes", "max_restarts") and key not in facts:
            facts[key] = value
        if key == "command" and "command" not in facts:
            facts["command"] = value
    return ("ok", facts)


def agree(t, o, v):
    if t[0] != o[0]:
        return False
    if t[0] == "refused":
        return True
    t, o = t[1], o[1]
    if t["run_path"]:
        return True  # runs through runpy in both; acceptance is what counts
    words = shlex.split(o["command"])
    if t["no_python"]:
        want = [t["script"], *t["script_args"]]
    else:
        want = ["python3", "-u", *(["-m"] if t["module"] else []), t["script"], *t["script_args"]]
    return (words == want and o["nnodes"] == t["nnodes"] and int(o["max_restarts"]) == t["max_restarts"])


def simple(v):
    # Words with spaces or line breaks do not survive the command line's
    # display; they are checked for acceptance only.
    return all(" " not in a and "\n" not in a for a in v)


vectors = [vector() for _ in range(COUNT)] + prefixes()
bad = []
for v in vectors:
    t, o = torch_side(v), our_side(v)
    if simple(v) or t[0] != o[0]:
        if not agree(t, o, v) if simple(v) else t[0] != o[0]:
            bad.append((v, t, o))
print(f"{len(vectors)} argument vectors: {len(vectors) - len(bad)} agree, {len(bad)} disagree", file=sys.stderr)
for v, t, o in bad[:25]:
    print(f"  {v!r}\n    torch: {t}\n    ours:  {o}", file=sys.stderr)
sys.exit(1 if bad else 0)

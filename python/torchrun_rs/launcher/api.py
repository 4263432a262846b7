"""``torch.distributed.launcher.api``, backed by torchrun-rs.

``LaunchConfig`` has torch's fields, defaults and checks;
``launch_agent(config, entrypoint, args)`` and
``elastic_launch(config, entrypoint)(*args)`` run a script or program
(a string entrypoint) under the torchrun-rs launcher, in a child process:
it sets ``TORCHELASTIC_SIGNALS_TO_HANDLE`` in the caller's environment as
torch does, returns ``{global rank: None}`` for this node's workers on
success, and raises ``ChildFailedError`` (torch's own class when torch is
installed, else one of the same shape) on failure. While the launcher
runs, the caller's ``signals_to_handle`` are forwarded to it (it stops the
workers with their grace period) and ``SignalException`` is raised once it
is gone, as torch's agent does; the launcher dies with the caller. A Python
callable as entrypoint needs torch's launcher: it is refused with one line.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from typing import Any, Dict, List, Optional

from torchrun_rs import find_bin

__all__ = ["LaunchConfig", "launch_agent", "elastic_launch", "ChildFailedError", "SignalException", "DefaultLogsSpecs"]

_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


class DefaultLogsSpecs:
    """Where workers' output goes: torch's ``DefaultLogsSpecs`` arguments,
    kept as given (``redirects``/``tee``: 0-3 or ``0:1,1:2``, or torch's
    ``Std`` values)."""

    def __init__(self, log_dir=None, redirects="0", tee="0", local_ranks_filter=None):
        self._root_log_dir = log_dir
        self._redirects = redirects
        self._tee = tee
        self._local_ranks_filter = local_ranks_filter

    @property
    def root_log_dir(self):
        return str(self._root_log_dir) if self._root_log_dir is not None else None


@dataclasses.dataclass
class LaunchConfig:
    """torch's ``LaunchConfig`` (2.15): the same fields and defaults."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    logs_specs: Any = None
    run_id: str = ""
    role: str = "default_role"
    rdzv_endpoint: str = ""
    rdzv_backend: str = "etcd"
    rdzv_configs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    rdzv_timeout: int = -1
    max_restarts: int = 3
    monitor_interval: float = 0.1
    start_method: str = "spawn"
    log_line_prefix_template: Optional[str] = None
    metrics_cfg: Dict[str, str] = dataclasses.field(default_factory=dict)
    local_addr: Optional[str] = None
    event_log_handler: str = "null"
    numa_options: Any = None
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    duplicate_stdout_filters: Optional[List[str]] = None
    duplicate_stderr_filters: Optional[List[str]] = None
    virtual_local_rank: bool = False
    shutdown_timeout: Optional[int] = None

    def __post_init__(self):
        if self.rdzv_timeout != -1:
            self.rdzv_configs["timeout"] = self.rdzv_timeout
        elif "timeout" not in self.rdzv_configs:
            self.rdzv_configs["timeout"] = 900
        if self.logs_specs is None:
            self.logs_specs = DefaultLogsSpecs()
        if self.shutdown_timeout is None:
            self.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        elif self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")


class _ProcessFailure:
    """The shape of torch's ``ProcessFailure``."""

    def __init__(self, local_rank, pid, exitcode, error_file=""):
        self.local_rank, self.pid, self.exitcode, self.error_file = local_rank, pid, exitcode, error_file
        self.error_file_data = {}
        self.message = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"
        self.timestamp = 0

    def signal_name(self):
        if self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return "<N/A>"
        return "<N/A>"


class _ChildFailedError(Exception):
    """The shape of torch's ``ChildFailedError``: ``name`` and ``failures``
    (global rank → a failure with ``local_rank``, ``pid``, ``exitcode``,
    ``error_file``, ``message``)."""

    def __init__(self, name, failures):
        self.name = name
        self.failures = failures
        super().__init__(f"{name} FAILED: {', '.join(f'rank {r} exitcode {f.exitcode}' for r, f in sorted(failures.items()))}")

    def get_first_failure(self):
        rank = min(self.failures.keys(), key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]


def _failure_classes():
    """torch's own error classes when torch is installed (callers catch
    those), else ours of the same shape."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

        return ChildFailedError, ProcessFailure
    except Exception:  # torch missing or broken: the shape is what counts
        return _ChildFailedError, _ProcessFailure


def __getattr__(name):
    """``ChildFailedError`` is the class a failed launch raises: torch's
    when torch is installed (so ``except`` on either name catches it), else
    ours. Resolved on use: importing this module never imports torch."""
    if name == "ChildFailedError":
        return _failure_classes()[0]
    if name == "SignalException":
        return _signal_exception()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _std(value):
    """A ``redirects``/``tee`` value as the command line writes it."""
    if value is None:
        return None
    if isinstance(value, dict):
        return ",".join(f"{k}:{_std(v)}" for k, v in sorted(value.items()))
    return str(getattr(value, "value", value))


def _config_argv(config):
    """The launcher's options for a ``LaunchConfig`` built by hand."""
    argv = [
        f"--nnodes={config.min_nodes}:{config.max_nodes}",
        f"--nproc-per-node={config.nproc_per_node}",
        f"--rdzv-backend={config.rdzv_backend}",
        f"--rdzv-id={config.run_id}",
        f"--role={config.role}",
        f"--max-restarts={config.max_restarts}",
        f"--monitor-interval={config.monitor_interval}",
        f"--start-method={config.start_method}",
        f"--event-log-handler={config.event_log_handler}",
        f"--signals-to-handle={config.signals_to_handle}",
        f"--shutdown-timeout={config.shutdown_timeout}",
    ]
    if config.rdzv_endpoint:
        argv.append(f"--rdzv-endpoint={config.rdzv_endpoint}")
    conf = dict(config.rdzv_configs)
    rank = conf.pop("rank", None)
    if rank is not None and config.rdzv_backend == "static":
        argv.append(f"--node-rank={rank}")
    if conf:
        argv.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items()))
    if config.log_line_prefix_template:
        argv.append(f"--log-line-prefix-template={config.log_line_prefix_template}")
    if config.local_addr:
        argv.append(f"--local-addr={config.local_addr}")
    if config.numa_options is not None:
        mode = getattr(config.numa_options, "affinity_mode", config.numa_options)
        argv.append(f"--numa-binding={getattr(mode, 'value', mode)}")
    for name, filters in (("stdout", config.duplicate_stdout_filters), ("stderr", config.duplicate_stderr_filters)):
        if filters:
            argv.append(f"--duplicate-{name}-filters=" + ",".join(f.replace(",", ",,") for f in filters))
    if config.virtual_local_rank:
        argv.append("--virtual-local-rank")
    specs = config.logs_specs
    log_dir = getattr(specs, "root_log_dir", None)
    if log_dir:
        argv.append(f"--log-dir={log_dir}")
    for flag, attr in (("--redirects", "_redirects"), ("--tee", "_tee")):
        value = _std(getattr(specs, attr, None))
        if value and value != "0":
            argv.append(f"{flag}={value}")
    ranks = getattr(specs, "_local_ranks_filter", None)
    if ranks:
        argv.append("--local-ranks-filter=" + ",".join(str(r) for r in sorted(ranks)))
    return argv


def _entrypoint_argv(entrypoint, args):
    """``(launcher options, script and its arguments, PYTHON_EXEC)`` for a
    string entrypoint: a Python (``sys.executable -u [-m] script ...``), or
    any other program (``--no-python``)."""
    args = [str(a) for a in args]
    python = os.getenv("PYTHON_EXEC", sys.executable)
    if entrypoint in (sys.executable, python) or os.path.basename(entrypoint).startswith("python"):
        flags, rest = [], list(args)
        while rest and rest[0].startswith("-") and rest[0] != "-":
            opt = rest.pop(0)
            if opt == "-m":
                flags.append("--module")
                break
            if opt != "-u":
                raise ValueError(f"torchrun-rs runs Python as 'python -u [-m] script': the option {opt} cannot be passed")
        if not rest:
            raise ValueError("no script to run after the Python entrypoint")
        return flags, rest, entrypoint
    return ["--no-python"], [entrypoint, *args], None


class _SignalException(Exception):
    """The shape of torch's ``SignalException``: the caller got one of
    ``signals_to_handle`` while a launch ran (``sigval``)."""

    def __init__(self, msg, sigval):
        super().__init__(msg)
        self.sigval = sigval


def _signal_exception():
    """torch's ``SignalException`` when torch is installed, else ours."""
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        return SignalException
    except Exception:  # torch missing or broken
        return _SignalException


def _signals(names):
    """The catchable signals of a ``signals_to_handle`` list (torch skips
    unknown names too; SIGKILL and SIGSTOP cannot be caught)."""
    out = []
    for name in (names or "").split(","):
        sig = getattr(signal, name.strip(), None)
        if isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP) and sig not in out:
            out.append(sig)
    return out


class _Forwarder:
    """While a launch runs, the caller's handled signals go to the launcher.

    torch's agent lives in the caller: its handlers for ``signals_to_handle``
    raise ``SignalException``, and the agent stops the workers with that
    signal and the grace period. Here the agent is the launcher process, so
    the caller's handlers forward the signal to it, keep waiting while it
    stops the workers, and ``SignalException`` is raised once it is gone.
    Handlers can only be set from the main thread: elsewhere the default
    dispositions stay (torch warns and goes on too), and the launcher still
    dies with its caller.
    """

    def __init__(self, names):
        self.received = None
        self._proc = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _signals(names):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError, RuntimeError):
                pass

    def _handle(self, signum, _frame):
        if self.received is None:
            self.received = signum
        if self._proc is not None:
            try:
                os.kill(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def started(self, proc):
        self._proc = proc
        if self.received is not None:
            # Arrived between the handlers and the launcher's start: the
            # launcher holds signals from its first instruction on.
            self._handle(self.received, None)

    def restore(self):
        for sig, old in self._old.items():
            if old is not None:  # None: set outside Python, cannot be put back
                signal.signal(sig, old)
        self._old = {}


def _wait(proc):
    """Waits for the launcher. Whatever interrupts the wait (a signal the
    caller does not forward, e.g. Ctrl-C with SIGINT left out of
    ``signals_to_handle``) stops it first, with the workers' grace, as
    torch's agent shuts its workers down when it unwinds: the caller never
    goes on while its launcher runs."""
    try:
        return proc.wait()
    except BaseException:
        while True:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                proc.wait()
                break
            except BaseException:  # a second interrupt: SIGTERM again (the launcher's "now")
                continue
        raise


def _launch(argv, name, python=None, signals_to_handle=_DEFAULT_SIGNALS):
    """Runs the launcher with ``argv``; on failure raises
    ``ChildFailedError`` built from its events file, on one of
    ``signals_to_handle`` (forwarded to the launcher) ``SignalException``.
    Returns ``{global rank: None}`` for this node's workers."""
    fd, events = tempfile.mkstemp(prefix="torchrun-rs-events-", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ)
    if python and not env.get("PYTHON_EXEC"):
        env["PYTHON_EXEC"] = python
    # The launcher ends (SIGTERM: it stops the workers) when this process
    # dies, SIGKILL included.
    env["TORCHRUN_RS_CALLER_PID"] = str(os.getpid())
    forwarder = _Forwarder(signals_to_handle)
    try:
        # A process group of its own: a terminal's Ctrl-C reaches the
        # caller only, which forwards it once (a second SIGINT at the
        # launcher would skip the workers' grace).
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        proc = subprocess.Popen([find_bin(), f"--events-file={events}", *argv], env=env, **group)
        forwarder.started(proc)
        code = _wait(proc)
        facts = []
        with open(events, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    facts.append(json.loads(line))
                except ValueError:
                    pass
    finally:
        forwarder.restore()
        os.unlink(events)
    if forwarder.received is not None:
        sigval = signal.Signals(forwarder.received)
        raise _signal_exception()(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
    last_attempt = max((e.get("attempt", 0) for e in facts if e.get("event") == "worker_started"), default=0)
    ranks = sorted({e["rank"] for e in facts if e.get("event") == "worker_started" and e.get("attempt", 0) == last_attempt})
    if code == 0:
        return {r: None for r in ranks}
    child_failed, process_failure = _failure_classes()
    # The last attempt's failures only, as torch reports the final
    # attempt's (earlier ones were restarted from).
    failed = [e for e in facts if e.get("event") == "worker_exited" and e.get("reason") == "failed"]
    final = max((e.get("attempt", 0) for e in failed), default=0)
    failures = {}
    for e in failed:
        if e.get("attempt", 0) != final:
            continue
        exitcode = e["exit_code"] if e.get("exit_code") is not None else -int(_signal_number(e.get("signal")))
        failures[e["rank"]] = process_failure(e["local_rank"], e["pid"], exitcode, "")
    # The job's root cause, the same on every node (multi-node c10d and
    # etcd-v3): named by the exception on each of them.
    job_root_cause = next(
        (e.get("job_root_cause") for e in facts if e.get("event") == "job_finished" and e.get("job_root_cause")),
        None,
    )
    if not failures:
        # The launcher itself failed (a usage error, the rendezvous, the
        # job failing on another node) or was killed: what it said is on
        # stderr; the rank is unknown.
        failures[-1] = process_failure(-1, proc.pid, code, "")
        if job_root_cause:
            name = f"{name} (the job's root cause: {job_root_cause})"
    err = child_failed(name, failures)
    err.job_root_cause = job_root_cause
    raise err


def _signal_number(name):
    """``SIGKILL`` (the events file's spelling) or a number → the number."""
    if isinstance(name, int):
        return name
    sig = getattr(signal, str(name or ""), None)
    return int(sig) if sig is not None else 0


def launch_agent(config, entrypoint, args):
    """Runs ``entrypoint`` (a script or program) on every worker of this
    node under torchrun-rs; see the module's documentation."""
    if callable(entrypoint):
        raise TypeError(
            "torchrun-rs launches programs and scripts; a Python callable as entrypoint needs torch's launcher "
            "(torch.distributed.launcher.api.launch_agent)"
        )
    if not isinstance(entrypoint, str):
        raise TypeError(f"entrypoint must be a string (a script or program), not {type(entrypoint).__name__}")
    if not config.run_id:
        config.run_id = str(uuid.uuid4().int)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    flags, script, python = _entrypoint_argv(entrypoint, args)
    args_ns = getattr(config, "_args", None)
    if args_ns is not None:
        # Built by config_from_args: every option as the user gave it.
        from torchrun_rs.run import argv_from_args

        options = argv_from_args(args_ns)
    else:
        options = _config_argv(config)
    name = script[0] if python else entrypoint
    return _launch(options + flags + script, name=name, python=python, signals_to_handle=config.signals_to_handle)


class elastic_launch:
    """``elastic_launch(config, entrypoint)(*args)``: ``launch_agent``."""

    def __init__(self, config, entrypoint, health_check_server=None):
        self._config = config
        self._entrypoint = entrypoint

    def __call__(self, *args):
        return launch_agent(self._config, self._entrypoint, list(args))

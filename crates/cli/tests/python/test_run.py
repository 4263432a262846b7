"""PyTorch's test/distributed/test_run.py against torchrun_rs's Python API
(only the imports changed; the last case runs launch_agent for real instead
of with torch's internals mocked), then what callers of the API rely on,
checked against torch 2.15's own modules in the same venv."""

import os
import subprocess
import sys
import tempfile
import time
import unittest

import torchrun_rs.run as run
from torchrun_rs.launcher.api import LaunchConfig, elastic_launch, launch_agent


def dummy_script(body="import sys; sys.exit(0)"):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "dummy_script.py")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n{body}\n")
    os.chmod(path, 0o755)
    return path


class RunTest(unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.original_signals_env = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", None)

    def tearDown(self):
        if self.original_signals_env is not None:
            os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = self.original_signals_env
        elif "TORCHELASTIC_SIGNALS_TO_HANDLE" in os.environ:
            del os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"]

    def test_signals_to_handle_default(self):
        parser = run.get_args_parser()
        args = parser.parse_args(["dummy_script.py"])
        self.assertEqual(args.signals_to_handle, "SIGTERM,SIGINT,SIGHUP,SIGQUIT")

    def test_signals_to_handle_custom(self):
        parser = run.get_args_parser()
        args = parser.parse_args(["--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2", "dummy_script.py"])
        self.assertEqual(args.signals_to_handle, "SIGTERM,SIGUSR1,SIGUSR2")

    def test_config_from_args_signals_to_handle(self):
        parser = run.get_args_parser()
        args = parser.parse_args(["--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2", "dummy_script.py"])
        config, _, _ = run.config_from_args(args)
        self.assertEqual(config.signals_to_handle, "SIGTERM,SIGUSR1,SIGUSR2")

    def test_launch_agent_sets_environment_variable(self):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=1,
            signals_to_handle="SIGTERM,SIGUSR1,SIGUSR2",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
        )
        entrypoint = dummy_script()
        args = []
        if "TORCHELASTIC_SIGNALS_TO_HANDLE" in os.environ:
            del os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"]
        launch_agent(config, entrypoint, args)
        self.assertEqual(os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"], "SIGTERM,SIGUSR1,SIGUSR2")


def describe(parser):
    """Each option of a parser as argparse sees it."""
    out = {}
    for a in parser._actions:
        t = getattr(a.type, "__name__", a.type)
        out[a.dest] = (tuple(a.option_strings), repr(a.default), t, tuple(a.choices or ()), a.nargs, a.const, a.required)
    return out


class AgainstTorch(unittest.TestCase):
    """torchrun_rs's API beside torch's, in one process."""

    def test_the_parser_has_torchs_options_dests_defaults_and_types(self):
        import torch.distributed.run as torch_run

        ours, theirs = describe(run.get_args_parser()), describe(torch_run.get_args_parser())
        self.assertEqual(sorted(ours), sorted(theirs))
        for dest in theirs:
            o, t = ours[dest], theirs[dest]
            if dest == "print_completion":
                o, t = o[:2], t[:2]  # torch's own action class prints via shtab
            self.assertEqual(o, t, dest)

    def test_pet_variables_are_defaults_as_in_torch(self):
        import torch.distributed.run as torch_run

        env = {"PET_NNODES": "2:4", "PET_MAX_RESTARTS": "3", "PET_STANDALONE": "1", "PET_MONITOR_INTERVAL": "2.5"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            a = vars(run.parse_args(["x.py", "--lr", "1"]))
            b = vars(torch_run.parse_args(["x.py", "--lr", "1"]))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.assertEqual(a, b)
        self.assertEqual(a["max_restarts"], 3)

    def test_config_from_args_agrees_with_torch(self):
        import torch.distributed.run as torch_run

        vectors = [
            ["x.py"],
            ["--nnodes=1:3", "--nproc-per-node=3", "--rdzv-backend=c10d", "--rdzv-endpoint=h:1", "x.py", "a"],
            ["--nproc-per-node=cpu", "--max-restarts=2", "--role=trainer", "-m", "pkg.mod"],
            ["--no-python", "--rdzv-conf=join_timeout=5,last_call_timeout=1", "--node-rank=0", "prog", "--x"],
            ["--duplicate-stdout-filters=a,,b,c", "--shutdown-timeout=7", "--local-ranks-filter=0,1", "x.py"],
        ]
        fields = ["min_nodes", "max_nodes", "nproc_per_node", "run_id", "role", "rdzv_endpoint", "rdzv_backend",
                  "rdzv_configs", "max_restarts", "monitor_interval", "start_method", "local_addr",
                  "event_log_handler", "signals_to_handle", "duplicate_stdout_filters",
                  "duplicate_stderr_filters", "virtual_local_rank", "shutdown_timeout"]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        for v in vectors:
            c1, cmd1, args1 = run.config_from_args(run.parse_args(v))
            c2, cmd2, args2 = torch_run.config_from_args(torch_run.parse_args(v))
            for f in fields:
                self.assertEqual(getattr(c1, f), getattr(c2, f), f"{f} for {v}")
            self.assertEqual((cmd1, args1), (cmd2, args2), v)

    def test_launch_config_has_torchs_fields_and_defaults(self):
        import dataclasses

        from torch.distributed.launcher.api import LaunchConfig as TorchConfig

        ours = {f.name: f for f in dataclasses.fields(LaunchConfig)}
        theirs = {f.name: f for f in dataclasses.fields(TorchConfig)}
        self.assertEqual(list(ours), list(theirs))
        a = LaunchConfig(min_nodes=1, max_nodes=2, nproc_per_node=3)
        b = TorchConfig(min_nodes=1, max_nodes=2, nproc_per_node=3)
        for name in ours:
            if name not in ("logs_specs", "numa_options"):
                self.assertEqual(getattr(a, name), getattr(b, name), name)
        with self.assertRaises(ValueError):
            LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, shutdown_timeout=-1)

    def test_a_failed_launch_raises_torchs_child_failed_error(self):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        script = dummy_script("import os, sys; sys.exit(3 if os.environ['RANK'] == '1' else 0)")
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0)
        with self.assertRaises(ChildFailedError) as e:
            elastic_launch(config, sys.executable)("-u", script)
        self.assertEqual(list(e.exception.failures), [1])
        f = e.exception.failures[1]
        self.assertEqual((f.local_rank, f.exitcode), (1, 3))
        self.assertIn("dummy_script.py FAILED", e.exception.format_msg())
        # The name this module exports is the class it raises.
        from torchrun_rs.launcher import api

        self.assertIs(api.ChildFailedError, ChildFailedError)

    def test_after_a_restart_the_error_names_the_last_attempts_failure(self):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        # Attempt 0: rank 0 exits 3; attempt 1: rank 1 exits 5. torch reports
        # the final attempt's failures, as the launcher's summary does.
        script = dummy_script(
            "import os, sys, time\n"
            "attempt, rank = int(os.environ['TORCHELASTIC_RESTART_COUNT']), int(os.environ['RANK'])\n"
            "if (attempt, rank) == (0, 0): sys.exit(3)\n"
            "if (attempt, rank) == (1, 1): sys.exit(5)\n"
            "time.sleep(60)"
        )
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=1)
        with self.assertRaises(ChildFailedError) as e:
            elastic_launch(config, script)()
        self.assertEqual({r: f.exitcode for r, f in e.exception.failures.items()}, {1: 5})
        self.assertEqual(e.exception.get_first_failure()[0], 1)

    def test_a_worker_killed_by_a_signal_fails_with_minus_the_signal(self):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        script = dummy_script("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0)
        with self.assertRaises(ChildFailedError) as e:
            elastic_launch(config, script)()
        f = e.exception.failures[0]
        self.assertEqual((f.exitcode, f.signal_name()), (-9, "SIGKILL"))

    def test_a_successful_launch_returns_this_nodes_ranks(self):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0")
        self.assertEqual(elastic_launch(config, dummy_script())(), {0: None, 1: None})

    def test_run_and_main_launch_and_raise_on_failure(self):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        out = tempfile.mkdtemp()
        ok = dummy_script(
            "import os, sys\n"
            f"open(os.path.join({out!r}, os.environ['RANK']), 'w').write(sys.executable + ' ' + os.environ['TORCHRUN_RS_JOB'])"
        )
        run.main(["--nproc-per-node=2", ok])
        for rank in ("0", "1"):
            python, marker = open(os.path.join(out, rank)).read().split()
            # Under torchrun-rs (its marker), with the caller's Python.
            self.assertTrue(marker)
            self.assertEqual(os.path.realpath(python), os.path.realpath(sys.executable))
        bad = dummy_script("import sys; sys.exit(5)")
        with self.assertRaises(ChildFailedError) as e:
            run.run(run.parse_args(["--nproc-per-node=1", bad]))
        self.assertEqual(e.exception.failures[0].exitcode, 5)

    def test_a_callable_entrypoint_is_refused_in_one_line(self):
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1)
        with self.assertRaises(TypeError) as e:
            launch_agent(config, print, [])
        self.assertIn("torch's launcher", str(e.exception))
        self.assertNotIn("\n", str(e.exception))


class Speed(unittest.TestCase):
    def test_import_and_parser_under_50_ms(self):
        # CPU time (the import's and the flag table's child's), not wall
        # time: what it costs, whatever else the machine is doing.
        code = (
            "import resource, time\n"
            "def cpu():\n"
            "    c = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "    return time.process_time() + c.ru_utime + c.ru_stime\n"
            "t = cpu()\n"
            "import torchrun_rs.run as r\n"
            "r.get_args_parser()\n"
            "print(cpu() - t)\n"
        )
        best = min(float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(5))
        print(f"import torchrun_rs.run + get_args_parser(): {best * 1000:.1f} ms of CPU", file=sys.stderr)
        self.assertLess(best, 0.050)


class RunOverhead(unittest.TestCase):
    def test_run_adds_under_20_ms_to_the_launchers_own_start(self):
        from torchrun_rs import find_bin

        argv = ["--nproc-per-node=1", "--no-python", "true"]
        run.get_args_parser()  # the flag table, once per process

        def best(f):
            times = []
            for _ in range(7):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        direct = best(lambda: subprocess.run([find_bin(), *argv], check=True))
        api = best(lambda: run.main(argv))
        print(f"a trivial job: launcher {direct * 1000:.1f} ms, run.main {api * 1000:.1f} ms", file=sys.stderr)
        self.assertLess(api - direct, 0.020)


if __name__ == "__main__":
    unittest.main()

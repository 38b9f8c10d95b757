r"""Runs one command as N cooperating JAX processes on this machine (multi-process without a cluster).

    python launch/local.py --num_processes=2 --cpu_devices_per_process=2 -- \
        python -m audiojepa.main --config=configs/m2d.py:runlocal --workdir=/tmp/m2d_2proc

Each process gets JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `audiojepa.runtime.distributed.maybe_initialize` hands to `jax.distributed.initialize`.
`--cpu_devices_per_process` simulates devices on the CPU (JAX_NUM_CPU_DEVICES, JAX_PLATFORMS=cpu;
collectives over gloo); `--gpus_per_process` gives process i its own GPUs (CUDA_VISIBLE_DEVICES), for
one process per GPU on a multi-GPU box. Output lines are prefixed with `[i]`. If one process fails,
the others are terminated (they would otherwise wait in a collective forever); SIGTERM/SIGINT to the
launcher is forwarded to every process, so a preemption checkpoint works as in a cluster job. The exit
status is the first non-zero one of the processes (0 if all succeed), as a shell reports it: 128 + N for a
process killed by signal N (137 for SIGKILL, e.g. the OOM killer), and stderr names the process that died.
`--dry_run` prints what would run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, *, cpu_devices_per_process: int = 0,
                gpus_per_process: int = 0) -> dict[str, str]:
    """The environment variables that make process `process_id` one of `num_processes`."""
    env = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(num_processes),
           "JAX_PROCESS_ID": str(process_id)}
    if cpu_devices_per_process:
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices_per_process))
    if gpus_per_process:
        first = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_process))
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix.encode() + line)
        sys.stdout.flush()


def shell_status(returncode: int) -> int:
    """A Popen return code as a shell reports it: 128 + N for a process killed by signal N (SIGKILL: 137), which
    `sys.exit` can pass on (sys.exit(-9) would exit 247)."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(process_id: int, returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"process {process_id} was killed by {name} (status {shell_status(returncode)})"
    return f"process {process_id} exited with status {returncode}"


def run(command: list[str], num_processes: int, *, port: int | None = None, cpu_devices_per_process: int = 0,
        gpus_per_process: int = 0, poll_s: float = 0.2, grace_s: float = 60.0) -> int:
    """Starts the processes, waits for all of them; returns the first non-zero exit status (or 0), as a shell
    reports it (`shell_status`: 137 for a process killed by SIGKILL, e.g. by the OOM killer).

    After a failure the others get SIGTERM, and SIGKILL if they are still running `grace_s` later. Each
    process that fails or is killed is named on stderr (`[launcher] process 1 was killed by SIGKILL ...`).
    """
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        env = {**os.environ, **process_env(i, num_processes, port, cpu_devices_per_process=cpu_devices_per_process,
                                           gpus_per_process=gpus_per_process)}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] "), daemon=True).start()
        procs.append(proc)

    def forward(signum, frame):
        del frame
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status, stopped_at, reported = 0, None, set()
        while True:
            codes = [p.poll() for p in procs]  # poll every process, so that each failure is seen
            for i, code in enumerate(codes):
                if code not in (None, 0) and i not in reported:
                    reported.add(i)
                    why = " after the launcher stopped it" if stopped_at is not None else ""
                    print(f"[launcher] {_describe(i, code)}{why}", file=sys.stderr, flush=True)
            failed = [shell_status(c) for c in codes if c not in (None, 0)]
            if failed and not status:
                status, stopped_at = failed[0], time.monotonic()
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            if stopped_at is not None and time.monotonic() - stopped_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            if all(c is not None for c in codes):
                return status or next((shell_status(c) for c in codes if c), 0)
            time.sleep(poll_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--cpu_devices_per_process", type=int, default=0,
                        help="simulate this many CPU devices per process (0: use the real accelerators)")
    parser.add_argument("--gpus_per_process", type=int, default=0, help="give each process its own N GPUs")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument("--dry_run", action="store_true", help="print each process's environment and command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m audiojepa.main --config=... --workdir=...")
    if args.num_processes < 1:
        parser.error(f"--num_processes={args.num_processes}; must be >= 1")
    port = args.port or free_port()
    if args.dry_run:
        for i in range(args.num_processes):
            env = process_env(i, args.num_processes, port, cpu_devices_per_process=args.cpu_devices_per_process,
                              gpus_per_process=args.gpus_per_process)
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        return
    sys.exit(run(command, args.num_processes, port=port, cpu_devices_per_process=args.cpu_devices_per_process,
                 gpus_per_process=args.gpus_per_process))


if __name__ == "__main__":
    main()

"""The launchers: the commands they generate (dry runs; nothing reaches a cluster or the internet),
the local multi-process launcher's failure handling, and the SLURM script under stub srun/scontrol."""

import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

from launch import local, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_ARGS = ["--config=configs/m2d.py", "--workdir=/shared/ckpt/m2d", "--config.batch_size=512"]


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, **kwargs)


def test_local_launcher_dry_run_gives_each_process_its_identity():
    out = _run(["launch/local.py", "--num_processes=2", "--cpu_devices_per_process=2", "--port=4321", "--dry_run",
                "--", "python", "-m", "audiojepa.main", *MAIN_ARGS])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert (f"JAX_COORDINATOR_ADDRESS=localhost:4321 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} JAX_PLATFORMS=cpu "
                "JAX_NUM_CPU_DEVICES=2 python -m audiojepa.main") in line
        assert line.endswith(shlex.join(MAIN_ARGS))
    assert local.process_env(1, 2, 1, gpus_per_process=4)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_local_launcher_stops_the_others_when_one_process_fails():
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(120)\n")
    start = time.monotonic()
    assert local.run([sys.executable, "-c", script], 2, poll_s=0.05) == 3
    assert time.monotonic() - start < 30  # process 0 was terminated, not waited for


def test_tpu_launcher_dry_run_creates_installs_and_runs_on_all_workers():
    out = _run(["launch/tpu_pod.py", "--tpu=ajepa-pod", "--zone=us-central2-b", "--accelerator_type=v4-32", "--spot",
                "--dry_run", "--", *MAIN_ARGS])
    assert out.returncode == 0, out.stderr
    cmds = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert cmds[0][:6] == [*tpu_vm, "describe", "ajepa-pod"]
    create = next(c for c in cmds if c[:5] == [*tpu_vm, "create"])
    assert create[5] == "ajepa-pod" and {"--zone=us-central2-b", "--accelerator-type=v4-32", "--spot"} <= set(create)
    scp = next(c for c in cmds if c[:5] == [*tpu_vm, "scp"])
    assert scp[-1] == "--worker=all" and scp[6].startswith("ajepa-pod:")
    ssh = [c for c in cmds if c[:5] == [*tpu_vm, "ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    install, run = (next(a for a in c if a.startswith("--command=")) for c in ssh)
    assert "jax[tpu]" in install and "-e \"$HOME/audiojepa[gcs]\"" in install
    assert "AUDIOJEPA_DISTRIBUTED=1" in run and "-m audiojepa.main " + shlex.join(MAIN_ARGS) in run
    # The checkout is packed from git (tracked + untracked, not ignored files) and copied to every worker.
    assert any(c[:2] == ["bash", "-c"] and "git ls-files" in c[2] for c in cmds)


def test_tpu_launcher_takes_gs_workdirs_rejects_other_urls_and_missing_arguments():
    out = _run(["launch/tpu_pod.py", "--tpu=t", "--zone=z", "--dry_run", "--", "--config=configs/m2d.py",
                "--workdir=s3://bucket/run"])
    assert out.returncode != 0 and "--workdir" in out.stderr
    out = _run(["launch/tpu_pod.py", "--tpu=t", "--zone=z", "--dry_run", "--", "--config=configs/m2d.py",
                "--workdir=gs://bucket/run"])
    assert out.returncode == 0, out.stderr
    assert "--workdir=gs://bucket/run" in out.stdout and "audiojepa[gcs]" in out.stdout
    out = _run(["launch/tpu_pod.py", "--tpu=t", "--zone=z", "--dry_run"])
    assert out.returncode != 0 and "--config" in out.stderr


def _stub(folder, name, body):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("status, requeued", [(0, False), (143, True)])
def test_slurm_script_sets_up_each_process_and_requeues_on_preemption(tmp_path, status, requeued):
    assert subprocess.run(["bash", "-n", "launch/slurm_gpu.sbatch"], cwd=REPO).returncode == 0
    bin_dir, log = str(tmp_path), str(tmp_path / "calls.log")
    _stub(bin_dir, "scontrol", f'if [ "$1" = show ]; then echo gpu-node-7; echo gpu-node-8; '
                               f'else echo "scontrol $*" >> {log}; fi\n')
    # srun: run the task once per process (2 nodes x 2 GPUs), as SLURM would, with its ids.
    _stub(bin_dir, "srun", 'shift; s=0; for p in 0 1 2 3; do SLURM_PROCID=$p SLURM_LOCALID=$((p % 2)) "$@" || s=$?; '
                           'done; exit $s\n')
    python = _stub(bin_dir, "fake_python", f'echo "proc=$JAX_PROCESS_ID of $JAX_NUM_PROCESSES at '
                                           f'$JAX_COORDINATOR_ADDRESS gpu=$CUDA_VISIBLE_DEVICES args=$*" >> {log}\n'
                                           f'exit {status}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": python, "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2"}
    result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", *MAIN_ARGS], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == status, result.stderr
    calls = open(log).read().splitlines()
    procs = [c for c in calls if c.startswith("proc=")]
    assert procs == [f"proc={p} of 4 at gpu-node-7:{12000 + 4242} gpu={p % 2} args=-m audiojepa.main "
                     + " ".join(MAIN_ARGS) for p in range(4)]
    assert ("scontrol requeue 4242" in calls) == requeued


def test_sweep_emits_cluster_jobs(capsys, monkeypatch):
    cmds = sweep.commands("configs/m2d.py", "/shared/sweep", ["--config.data.shards=/shared/shards"])
    slurm = sweep.cluster_command(cmds[0], "slurm", ["--nodes=2"])
    assert slurm[:3] == ["sbatch", "--job-name=aj-model.mask_ratio=0.5", "--nodes=2"]
    assert slurm[3].endswith("launch/slurm_gpu.sbatch") and slurm[4:] == cmds[0][3:]
    tpu = sweep.cluster_command(cmds[0], "tpu", ["--tpu=pod", "--zone=z"])
    assert tpu[1].endswith("launch/tpu_pod.py") and tpu[2:5] == ["--tpu=pod", "--zone=z", "--"] and \
        tpu[5:] == cmds[0][3:]
    multi = sweep.cluster_command(cmds[0], "local", ["--num_processes=2"])
    assert multi[1].endswith("launch/local.py") and multi[4:] == cmds[0]
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--config=configs/m2d.py", "--workdir_root=/shared/sweep",
                                      "--launcher=slurm", "--dry_run"])
    sweep.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("sbatch --job-name=aj-model.mask_ratio=") for line in lines)


def test_multi_process_detection_and_explicit_cluster_args():
    from audiojepa.runtime import distributed

    detect = distributed.is_multi_process_environment
    assert not detect({})
    assert detect({"SLURM_NTASKS": "4"})  # older SLURM without step variables: the allocation's count
    assert detect({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"})  # under srun
    assert not detect({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"})  # python run once in a batch script
    assert detect({"OMPI_COMM_WORLD_SIZE": "2"}) and detect({"TPU_WORKER_HOSTNAMES": "a,b"})

    assert distributed.explicit_cluster_args({}) == {}
    env = {"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.explicit_cluster_args(env) == dict(coordinator_address="host:1234", num_processes=2,
                                                          process_id=1)
    with pytest.raises(ValueError, match="JAX_PROCESS_ID must be too .*got None"):
        distributed.explicit_cluster_args({k: v for k, v in env.items() if k != "JAX_PROCESS_ID"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be too .*got 'two'"):
        distributed.explicit_cluster_args({**env, "JAX_NUM_PROCESSES": "two"})

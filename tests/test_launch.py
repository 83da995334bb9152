"""launch/: the exact sbatch scripts (dry runs), a local sweep with its summary, and a real SLURM
cluster on this machine running a 2-task job that is signalled, checkpoints, is requeued and
finishes from its checkpoint (marked `slurm`: `make test-slurm`)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from launch import runs as runs_lib, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(module, *args) -> str:
    """Run `python -m module ARGS --dry_run` (the flag goes before a `--`, after which come overrides)."""
    args = list(args)
    at = args.index("--") if "--" in args else len(args)
    args.insert(at, "--dry_run")
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, check=True)
    return result.stdout


def test_submit_dry_run_shows_the_script(tmp_path):
    out = _dry_run(
        "launch.slurm", "--config", "configs/vit_b.py", "--workdir", str(tmp_path / "vit"), "--nodes", "2",
        "--gpus_per_node", "8", "--time", "12:00:00", "--signal_seconds", "600", "--partition", "gpu",
        "--", "--config.data.root=/data/pets", "--config.optim.lr=3e-4",
    )
    for line in [
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --time=12:00:00",
        "#SBATCH --requeue", "#SBATCH --signal=USR1@600", "#SBATCH --partition=gpu",
        f"#SBATCH --output={tmp_path}/vit/slurm-%j.out", "if [ $status -eq 75 ]; then",
        "  scontrol requeue $SLURM_JOB_ID",
    ]:
        assert line in out.splitlines(), line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"-m jaxclf.train --config configs/vit_b.py --workdir {tmp_path}/vit" in srun
    assert srun.endswith("--config.data.root=/data/pets --config.optim.lr=3e-4")
    assert f"# would run: sbatch --parsable {tmp_path}/vit/submit.sbatch" in out
    assert not (tmp_path / "vit").exists()  # a dry run writes nothing


def test_sweep_expands_a_grid_into_a_job_array(tmp_path):
    out = _dry_run(
        "launch.sweep", "submit", "--base", str(tmp_path / "sw"), "--config", "configs/quickstart.py",
        "--grid", "optim.lr=0.1,0.05", "--grid", "batch_size=32,64", "--parallel", "2", "--gpus_per_node", "0",
    )
    assert "#SBATCH --array=0-3%2" in out
    assert f"WORKDIRS=({tmp_path}/sw/lr=0.1,batch_size=32 {tmp_path}/sw/lr=0.1,batch_size=64" in out
    assert "'--config.optim.lr=0.05 --config.batch_size=64')" in out
    assert '--workdir "${WORKDIRS[$SLURM_ARRAY_TASK_ID]}" ${OVERRIDES[$SLURM_ARRAY_TASK_ID]}' in out


def test_sweep_list_file_and_names(tmp_path):
    runs = tmp_path / "runs.txt"
    runs.write_text("# comment\noptim.lr=0.1 optim.name=adamw\n\nlabel_smoothing=0.1\n")
    assert sweep.expand([], str(runs)) == [["optim.lr=0.1", "optim.name=adamw"], ["label_smoothing=0.1"]]
    assert runs_lib.run_name(["optim.lr=0.1", "data.root=/a b"]) == "lr=0.1,root=_a_b"
    with pytest.raises(SystemExit, match="share a workdir"):
        sweep.plan(str(tmp_path), [["optim.lr=0.1"], ["other.lr=0.1"]])


def test_local_sweep_runs_and_summarizes(digits_root, tmp_path):
    base = tmp_path / "sw"
    result = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "local", "--base", str(base), "--config",
         f"tests/tiny_config.py:{digits_root}", "--grid", "optim.lr=0.1,0.0", "--parallel", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "summary", str(base)], capture_output=True, text=True, cwd=REPO
    )
    lines = summary.stdout.splitlines()
    assert lines[0].split() == ["run", "overrides", "best", "val/accuracy", "best", "step", "last", "step", "status"]
    rows = json.loads((base / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["lr=0.1", "lr=0.0"]
    assert all(r["status"] == "done" and r["last step"] == 12 for r in rows)
    for row in rows:  # the table reports each run's own best evaluation
        logged = [json.loads(line) for line in (base / row["run"] / "metrics.jsonl").read_text().splitlines()]
        assert row["best val/accuracy"] == max(m["val/accuracy"] for m in logged if "val/accuracy" in m)


# --- a real one-node SLURM cluster -----------------------------------------------------------------

SLURM_CONF = """ClusterName=jaxclftest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
KillWait=5
MinJobAge=300
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def slurm_cluster(tmp_path):
    """slurmctld + slurmd from a private slurm.conf, started and stopped by the test."""
    if not shutil.which("slurmctld"):
        pytest.skip("slurmctld is not installed: `make test-slurm` installs Debian's slurm-wlm")
    directory = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (directory / sub).mkdir(parents=True)
    host = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=directory, ctld_port=_free_port(), d_port=_free_port()))
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = [subprocess.Popen([daemon, "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for daemon in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd")]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"SLURM did not come up: {(directory / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(timeout=30)


def _job_state(env, job_id) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")


def _logged_step(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return max((json.loads(line)["step"] for line in f if line.strip()), default=0)
    except FileNotFoundError:
        return 0


@pytest.mark.slurm
def test_slurm_job_is_signalled_checkpoints_requeues_and_finishes(slurm_cluster, digits_root, tmp_path):
    env = dict(slurm_cluster, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    submit = subprocess.run(
        [sys.executable, "-m", "launch.slurm", "--config", f"tests/tiny_config.py:{digits_root}",
         "--workdir", str(workdir), "--gpus_per_node", "0", "--tasks_per_node", "2", "--cpus_per_task", "1",
         "--time", "00:10:00", "--", "--config.total_steps=400", "--config.log_every_steps=1"],
        env=env, capture_output=True, text=True, cwd=REPO, check=True,
    )
    job_id = submit.stdout.split("submitted job ")[1].split(":")[0]

    deadline = time.time() + 120
    while _logged_step(workdir) < 5 and time.time() < deadline:
        time.sleep(0.5)
    assert _logged_step(workdir) >= 5, _slurm_output(workdir)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)

    # The job checkpoints, exits 75 and requeues itself; skip SLURM's requeue delay once pending.
    deadline = time.time() + 120
    while _job_state(env, job_id) not in ("PENDING", "REQUEUED") and time.time() < deadline:
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=env)
    deadline = time.time() + 180
    while not (workdir / "result.json").exists() and time.time() < deadline:
        time.sleep(1)
    output = _slurm_output(workdir)
    assert (workdir / "result.json").exists(), output
    result = json.loads((workdir / "result.json").read_text())
    assert result["status"] == "done" and result["step"] == 400
    assert "restart 0" in output and "restart 1" in output
    assert "requeueing job" in output
    assert "stopped by SIGUSR1" in output
    stopped = int(output.split("stopped by SIGUSR1 at step ")[1].split()[0])
    assert f"Resumed from {workdir}/checkpoints at step {stopped}" in output
    assert sorted(f for f in os.listdir(workdir / "checkpoints" / "400" / "data") if f.startswith("process")) == [
        "process_0-of-2.json", "process_1-of-2.json"]


def _slurm_output(workdir) -> str:
    logs = [f for f in os.listdir(workdir) if f.startswith("slurm-")] if os.path.isdir(workdir) else []
    return "".join(open(os.path.join(workdir, f)).read() for f in logs)

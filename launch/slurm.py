"""Submit a jaxclf training run to SLURM: N nodes x G GPUs, requeued on preemption or time limit.

    python -m launch.slurm --config configs/vit_b.py --workdir /scratch/runs/vit_b \\
        --nodes 2 --gpus_per_node 8 --time 24:00:00 [--dry_run] -- --config.data.root=/data/pets

How a run survives its time limit: `--signal=USR1@SECONDS` (without `B:`) makes SLURM send SIGUSR1
to every task some minutes before the limit; each `python -m jaxclf.train` task checkpoints at a
step all processes agree on and exits with status 75; the batch script sees 75 and requeues the
job (`scontrol requeue`), which starts again from that checkpoint. Only 75 requeues: status 0
ends the job; 2 (a config or data mistake), 3 (NaN loss) and 4 (a search trial its pruner
stopped, which must free the GPU rather than run again) end it without requeueing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

# jaxclf.training.preemption.EXIT_PREEMPTED and jaxclf.train.EXIT_PRUNED, repeated so this module imports without JAX.
EXIT_PREEMPTED = 75
EXIT_PRUNED = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(config: str, workdir: str, overrides: list[str], python: str = sys.executable) -> str:
    """The command every task runs."""
    return shlex.join([python, "-m", "jaxclf.train", "--config", config, "--workdir", workdir, *overrides])


def sbatch_header(args: argparse.Namespace, job_name: str, output: str, array: str | None = None) -> list[str]:
    """The #SBATCH lines: one task per GPU (one per node on CPU), requeue, the stop signal, logs."""
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={args.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=USR1@{args.signal_seconds}",
        f"#SBATCH --output={output}",
        "#SBATCH --open-mode=append",
    ]
    if args.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    return lines


def sbatch_body(command: str) -> list[str]:
    """Environment, the srun line, and requeue on exit status 75."""
    return [
        "set -u",
        f"cd {shlex.quote(REPO)}",
        "export PYTHONUNBUFFERED=1",
        # Leave GPU memory for the NCCL buffers and the input pipeline's pinned memory.
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}",
        'echo "jaxclf: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"',
        f"srun --cpu-bind=none {command}",
        "status=$?",
        f"if [ $status -eq {EXIT_PREEMPTED} ]; then",
        '  echo "jaxclf: checkpointed on a stop signal; requeueing job $SLURM_JOB_ID"',
        "  scontrol requeue $SLURM_JOB_ID",
        "  exit 0",
        "fi",
        "exit $status",
    ]


def render_script(args: argparse.Namespace) -> str:
    """The whole sbatch script for one run."""
    command = train_command(args.config, os.path.abspath(args.workdir), args.overrides, args.python)
    output = os.path.join(os.path.abspath(args.workdir), "slurm-%j.out")
    job_name = args.job_name or os.path.basename(os.path.normpath(args.workdir))
    return "\n".join(sbatch_header(args, job_name, output) + sbatch_body(command)) + "\n"


def submit(script: str, script_path: str, dry_run: bool) -> str | None:
    """Write `script` to `script_path` and `sbatch` it; with `dry_run` only print both. Returns the job id."""
    command = ["sbatch", "--parsable", script_path]
    if dry_run:
        print(script)
        print("# would run:", shlex.join(command))
        return None
    os.makedirs(os.path.dirname(script_path), exist_ok=True)
    with open(script_path, "w") as f:
        f.write(script)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {script_path}")
    return job_id


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by a single run and a sweep."""
    parser.add_argument("--config", required=True, help="config file (FILE or FILE:ARG)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=1, help="tasks per node = GPUs (0: one CPU task)")
    parser.add_argument("--tasks_per_node", type=int, default=0, help="JAX processes per node (0: one per GPU)")
    parser.add_argument("--cpus_per_task", type=int, default=8, help="cores per task, for grain's data workers")
    parser.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS")
    parser.add_argument("--signal_seconds", type=int, default=300, help="SIGUSR1 this long before the limit")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--job_name", default="")
    parser.add_argument("--python", default=sys.executable, help="the interpreter on the compute nodes")
    parser.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command only")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.splitlines()[0])
    add_cluster_arguments(parser)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("overrides", nargs="*", help="after --: --config.a.b=VALUE overrides")
    args = parser.parse_args(argv)
    script_path = os.path.join(os.path.abspath(args.workdir), "submit.sbatch")
    submit(render_script(args), script_path, args.dry_run)


if __name__ == "__main__":
    main()

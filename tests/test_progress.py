"""What a person sees: the documented command without --workdir, compact progress lines, a bar only on a terminal."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from limits import SUBPROCESS_S  # tests/ is on sys.path
from jaxclf import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_workdir_is_named_after_the_config():
    assert config_lib.default_workdir("configs/vit_b.py") == os.path.join("runs", "vit_b")
    assert config_lib.default_workdir("configs/sweep.py:lr=0.1") == os.path.join("runs", "sweep_lr_0.1")
    assert config_lib.default_workdir("tests/tiny_config.py:/tmp/x/digits") == os.path.join("runs", "tiny_config_tmp_x_digits")


def _train_command(digits_root: str) -> list[str]:
    return [sys.executable, "-m", "jaxclf.train", "--config", f"{REPO}/tests/tiny_config.py:{digits_root}",
            "--config.total_steps=8", "--config.log_every_steps=4"]


def _environment() -> dict:
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def test_train_without_workdir_shows_progress_and_resumes(digits_root, tmp_path):
    # A pseudo-terminal, as a person at a shell: the bar is drawn between the log lines.
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns, as a terminal has
    process = subprocess.Popen(_train_command(digits_root), cwd=tmp_path, env=_environment(), stdout=follower,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=SUBPROCESS_S) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    workdir = os.path.join("runs", "tiny_config_" + digits_root.strip("/").replace("/", "_"))
    assert f"workdir: {workdir}" in text and os.path.isfile(tmp_path / workdir / "result.json")
    for expected in ("reading the data", "compiling the train step", "step 4/8  50%", "step 8/8 100%", "ETA",
                     "img/s", "loss", "eval @ step 8: val/accuracy"):
        assert expected in text, expected
    assert "training:" in text and "\r" in text  # tqdm's bar of steps, redrawn in place

    # The same command again: the run is found, resumed at its end, and nothing is drawn through a pipe.
    again = subprocess.run(_train_command(digits_root), cwd=tmp_path, env=_environment(), capture_output=True,
                           text=True, timeout=SUBPROCESS_S)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"workdir: {workdir} (resuming)" in again.stderr and "Resumed from" in again.stderr
    assert "\r" not in again.stderr and "step 4/8" not in again.stderr

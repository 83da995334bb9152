"""The allocator setting the command-line tools make: XLA:CPU's per-call buffers stop page-faulting."""

import subprocess
import sys

import pytest

# Convolutions whose Eigen packing buffers are allocated (and freed) on every call, after the
# imports the command-line tools make; prints the minor page faults of five calls after five.
PROBE = """
import resource, sys
import jaxclf.evaluate, jaxclf.predict, jaxclf.train
from jaxclf import host_memory
if sys.argv[1] == "reuse" and not host_memory.reuse_freed_memory():
    print("unsupported"); sys.exit()
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
x, w = jnp.ones((16, 112, 112, 64)), jnp.ones((3, 3, 64, 64))  # packing buffers over glibc's 32 MB mmap limit
for _ in range(5):
    jax.block_until_ready(conv(x, w))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(conv(x, w))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_reused_memory_stops_page_faults_of_xla_cpu_kernels():
    reused = _faults("reuse")
    if reused == "unsupported":
        pytest.skip("the C library is not glibc")
    default = int(_faults("default"))
    assert default > 10_000  # glibc maps and unmaps the packing buffers on every call
    assert int(reused) < default / 20

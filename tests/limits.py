"""Time limits for tests that wait on other processes: bounds that catch a hang, never a slow machine.

A training, serving or evaluation subprocess on a 2-core machine beside another xdist worker (load 2-4)
spends 20-90 s importing and compiling and seconds running; one of two processes that meet at a
collective waits for the slower. 900 s is a hang by any of those measures, and the limit is the same for
every such test so that no test's outcome follows the machine's speed.
"""

SUBPROCESS_S = 900

"""Launchers: `python -m launch.slurm` (one run) and `python -m launch.sweep` (grids of runs, on SLURM or locally)."""

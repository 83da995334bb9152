"""A run's workdir read back: its checkpoints, and the finished model with its preprocessing (or an exported artefact).

Below weights/ (a finished run is one of the weights sources `config.model_init` names) and above
data/, models/, kernels/.
"""

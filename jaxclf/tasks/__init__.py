"""Training tasks: what a run learns besides plain classification (distillation, continual learning), as composable objects."""

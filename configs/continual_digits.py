"""Continual learning on the digits: ResNet-18 learns 0-4, then 5-9 are added without forgetting 0-4.

    python -m jaxclf.train --config configs/continual_digits.py:old     # digits 0-4 -> runs/continual_digits_old
    python -m jaxclf.train --config configs/continual_digits.py:add     # + 5-9, replay and LwF -> runs/continual_digits_add
    python -m jaxclf.train --config configs/continual_digits.py:naive   # + 5-9, plain fine-tuning (the baseline)
    python -m jaxclf.evaluate --workdir runs/continual_digits_add       # old/new top-1 and forgetting in the report

The quickstart's recipe and data (configs/quickstart.py). `add` and `naive` start from
runs/continual_digits_old (its best checkpoint) and see only the images of 5-9, 15 passes over them;
`add` also draws half of every batch from 50 exemplars per old digit (written, with 50 of each new
digit, to runs/continual_digits_add/exemplars/ for the next update) and keeps the old model's
answers on 0-4 as soft targets (LwF, weight 1).
Expected on a 2-core CPU (measured, val top-1; a few minutes per phase):
  old:   0-4 0.997
  naive: 0-4 0.000 (forgetting 0.997), 5-9 0.989
  add:   0-4 0.981 (forgetting 0.017), 5-9 0.975, mean 0.978
"""

import os

from jaxclf import config as config_lib

PHASES = ("old", "add", "naive")


def get_config(phase: str = "old"):
    if phase not in PHASES:
        raise config_lib.ConfigError(f"configs/continual_digits.py:{phase}: use one of {', '.join(PHASES)}")
    config = config_lib.import_file(os.path.join(os.path.dirname(__file__), "quickstart.py")).get_config()
    if phase == "old":
        config.data.classes = tuple("01234")
        return config
    config.data.classes = tuple("56789")
    config.model_init = "runs/continual_digits_old"
    config.optim.lr = 0.03
    if phase == "add":
        config.continual.replay_fraction = 0.5
        config.continual.replay_per_class = 50
        config.continual.distill_old = 1.0
    return config

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
Measured on a 2-core CPU shared with other jobs (val top-1; 3-8 minutes per phase there):
  old:   0-4 0.972 at the end, 0.983 at its best checkpoint (step 132, the one `add` starts from)
  naive: 0-4 0.000 (forgetting 0.983), 5-9 0.944, mean 0.472
  add:   0-4 0.978 (forgetting 0.006), 5-9 0.889, mean 0.933
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

"""Hyper-parameter search for the tutorial recipe (configs/small_folder.py: ResNet-18 fine-tuned on a folder).

    python -m launch.search run --config configs/small_folder.py --space configs/search_small_folder.py \\
        --base runs/search_mine --parallel 1 -- --config.data.root=/path/to/images
    python -m launch.search submit ... --parallel 8 --gpus_per_node 1 --time 04:00:00   # SLURM: 8 GPUs at once
    python -m launch.search summary runs/search_mine

24 trials of TPE (its first 8 random) over the four settings that matter most when fine-tuning a
pretrained ResNet on a few hundred images per class: the learning rate, weight decay, label
smoothing and the batch size. Each trial is the recipe's run (early stopping, an evaluation per
epoch) shortened to 15 epochs. ASHA compares the trials at rungs of r, 3r, 9r, ... steps (r:
Optuna's "auto", a hundredth of the first finished trial's steps) and stops those outside the best
third at a rung, so most of the budget goes to the promising ones. `summary` prints the table and
writes the plots (param_importances.png: which setting mattered). No measured result goes with this
search yet: it needs a GPU and your data; the mechanics are tested on the digits (tests/test_search.py).
"""


def get_search():
    return {
        "space": {
            "optim.lr": "loguniform(1e-4,1e-1)",
            "optim.weight_decay": "loguniform(1e-6,1e-2)",
            "label_smoothing": "uniform(0,0.2)",
            "batch_size": "choice(16,32,64)",
        },
        "trials": 24,
        "sampler": "tpe",
        "startup_trials": 8,
        "pruner": "asha",
        "reduction_factor": 3,
        # Fixed for every trial (flags after -- are added after these and win).
        "overrides": ["num_epochs=15", "eval_every_epochs=1"],
    }

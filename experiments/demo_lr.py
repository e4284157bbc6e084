"""Learning-rate x batch-size sweep of the demo recipe (see experiments/sweep.py)."""
BASE = "configs/demo.py"
SWEEP = [
    {"optim.lr": lr, "batch_size": bs}
    for lr in (5e-4, 1e-3, 2e-3)
    for bs in (64, 128)
]

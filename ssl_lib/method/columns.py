"""What a training step returns, one row per step: its columns' names (kept apart from
:mod:`.step` so that what reads a run's step log, a report page among them, does not import torch)."""

ITER_COLUMNS = ("loss_sup", "loss_aug", "loss_kmeans", "loss_total", "mask_rate", "pseudo_acc",
                "pseudo_acc_masked")
LOSS_COLUMNS = ITER_COLUMNS[:4]

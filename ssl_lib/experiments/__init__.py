"""The writeup's experiments: the grid and its profiles (:mod:`.grid`), their runs (:mod:`.runs`), and
the numbers the report shows (:mod:`.analysis`).

The names of the grid and its runs are importable from here (``from ssl_lib import experiments as ex``),
without importing torch, so that Make's checks of cached runs stay cheap.
"""

from .grid import (ALL_EXPERIMENTS, CONFIGS_ENV, DATA_ENV, EXPERIMENT_1, EXPERIMENT_2, EXPERIMENT_3, EXPERIMENTS,
                   LABEL_NOISE, REFERENCE_TRAIN_SIZE, RUNS_ENV,
                   WRITEUP, Profile, WriteupFigures, configs_dir, data_source, experiment_values, grid,
                   load_profile, profile_names, project_root, resolve, scale_unlabeled, seeded, train_size,
                   writeup_m)
from .runs import Run, ensure_grid, ensure_run, ensure_seeded, is_finished, load_run, main, run_dir_for, runs_root

__all__ = ["ALL_EXPERIMENTS", "EXPERIMENT_3", "LABEL_NOISE", "CONFIGS_ENV", "DATA_ENV", "EXPERIMENT_1", "EXPERIMENT_2", "EXPERIMENTS", "REFERENCE_TRAIN_SIZE",
           "RUNS_ENV", "WRITEUP", "Profile", "Run", "WriteupFigures", "configs_dir", "data_source",
           "ensure_grid", "ensure_run", "ensure_seeded", "experiment_values", "grid", "is_finished", "load_profile",
           "load_run", "main", "profile_names", "project_root", "resolve", "run_dir_for", "runs_root",
           "scale_unlabeled", "seeded", "train_size", "writeup_m"]

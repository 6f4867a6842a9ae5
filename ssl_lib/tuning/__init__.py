"""Hyperparameter tuning on Optuna: ``python -m ssl_lib tune`` (:mod:`.command`).

:mod:`.space` reads and checks the search space, :mod:`.storage` opens the study (an embedded
journal file, or a database shared by many machines) and notices dead workers, :mod:`.study` runs
the workers, the objective and the final training of ``best.yaml``.
"""

"""The engine around the method: the loop with its callbacks (:mod:`.loop`), optimizers and
schedules (:mod:`.optim`), run directories and checkpoints (:mod:`.rundir`), the machine
(:mod:`.env`), and :func:`.train.train`, which puts them together for one config."""

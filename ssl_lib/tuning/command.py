"""``python -m ssl_lib tune``: the base config (optionally scaled by a profile) and the space file
turned into a :class:`~.study.TuneSpec`, everything checked before any trial starts."""

from __future__ import annotations

import re
from pathlib import Path

from ..config import Config, ConfigError, load_config, make_config
from .space import load_space
from .study import TuneSpec

#: Where studies go by default (relative to the current directory, like train's runs/).
STUDIES_ROOT = Path("runs") / "tuning"


def resolve_base(config: Path | None, overrides: list[str], profile: str | None, source: dict | None = None,
                 protocol_profile: str | None = None, check: bool = True) -> Config:
    """The base config; with ``profile``, scaled like the report's experiments: the data source
    (``source``, else the SSL_LIB_* environment), the profile's data and epochs (its ``tune_epochs``
    when it sets them), and M and val_size
    kept at the same fraction of the training images; with ``protocol_profile``, under a FixMatch
    protocol profile as the protocol's runs are (the data source, then the profile's ``set``).
    ``--set`` values are applied last and not scaled. ``check``: its choice fields (model, optimizer,
    ...) name entries of their tables (which import torch; a caller that only reads finished runs
    may leave it to the training)."""
    if profile is not None and protocol_profile is not None:
        raise ConfigError("give --profile (the report's experiments) or --protocol-profile (the FixMatch protocol), not both")
    if protocol_profile is not None:
        from ..experiments.protocol import resolve_file

        if config is None:
            raise ConfigError("--protocol-profile needs --config (a config of configs/protocol/)")
        if not Path(config).is_file():
            raise ConfigError(f"config file {config} does not exist")
        cfg = make_config(resolve_file(config, protocol_profile, source=source).to_dict(), overrides)
    elif profile is None:
        cfg = load_config(config, overrides)
    else:
        from ..experiments.grid import _absolute, data_source, load_profile, scale_unlabeled, train_size

        prof = load_profile(profile)
        values = load_config(config).to_dict() if config else {}
        given = set(_yaml_keys(config))
        merged = {**values, **(data_source() if source is None else source), **prof.settings}
        for key in ("data_root", "cache_dir"):
            if merged.get(key):
                merged[key] = _absolute(str(merged[key]))
        cfg = make_config(merged)
        # a profile may train its tuning runs for fewer epochs than its grid (quick: the pools' 40 runs
        # must fit the report's time budget beside the grid)
        changes: dict = {"epochs": prof.tune_epochs or prof.scale_epochs(cfg.epochs)}
        n = train_size(cfg)
        if "num_unlabeled" in given and cfg.num_labeled is None:
            changes["num_unlabeled"] = scale_unlabeled(cfg.num_unlabeled, n)
        if cfg.val_size:
            changes["val_size"] = scale_unlabeled(cfg.val_size, n)
        cfg = make_config(make_config(cfg.to_dict(), changes).to_dict(), overrides)
    if not check:
        return cfg
    from ..engine.train import check_choices

    return check_choices(cfg)


def trials_wanted(trials: int | None, profile: str | None, protocol_profile: str | None = None) -> int:
    """``--trials``, else the profile's (or the protocol profile's) ``tune_trials``."""
    if trials is not None:
        return trials
    if protocol_profile is not None:
        from ..experiments.protocol import load_protocol_profile

        trials, profile = load_protocol_profile(protocol_profile).tune_trials, protocol_profile
    elif profile is not None:
        from ..experiments.grid import load_profile

        trials = load_profile(profile).tune_trials
    if trials is None:
        raise ConfigError("--trials: give the number of finished trials wanted"
                          + (f" (profile {profile!r} sets no tune_trials)" if profile else " (or a --profile)"))
    return trials


def _yaml_keys(path: Path | None) -> list[str]:
    if path is None:
        return []
    import yaml

    return list((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).keys())


def spec_from_args(args) -> TuneSpec:
    protocol_profile = getattr(args, "protocol_profile", None)
    base = resolve_base(args.config, args.overrides, args.profile, protocol_profile=protocol_profile)
    space = load_space(args.space, base)
    scale = args.profile or protocol_profile
    name = args.study or f"{base.name}-{Path(args.space).stem}" + (f"-{scale}" if scale else "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    out = args.out or STUDIES_ROOT / name
    return TuneSpec(base=base, space=space, trials=trials_wanted(args.trials, args.profile, protocol_profile), study_name=name, study_dir=Path(out),
                    storage=args.storage, pruner=args.pruner, workers=args.workers, final=not args.no_final,
                    sampler=args.sampler, seed_per_trial=args.seed_per_trial,
                    quiet=args.quiet).check()

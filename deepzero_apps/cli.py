"""`deepzero-task APP [hydra overrides]`: one command, one sub-command per application.

Each application is a Hydra app (config groups, `--cfg job`, `--help`, `-m` multiruns). Before
Hydra runs, the overrides are composed and validated once, so a typo'd key, a wrong type or an
impossible value is a one-line error with exit code 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import hydra
import torch.distributed as dist
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import validate
from .engine.distributed import init_distributed, is_main, launched_by_torchrun
from .errors import ConfigError, RunError, one_line

CONFIG_MODULE = "deepzero_apps.configs"
USAGE_ERROR = 2


@dataclass(frozen=True)
class App:
    module: str  # exposes run(cfg) -> dict
    summary: str


APPS: dict[str, App] = {
    "classify": App("deepzero_apps.tasks.classify", "image classification trained with ZO (CGE/RGE, sparse) or FO"),
    "certify": App("deepzero_apps.tasks.certify", "certified defense of a black-box classifier: denoiser trained by DeepZero, ZO-AE-DS or FO"),
    "pde": App("deepzero_apps.tasks.pde", "PDE error correction (Solver-in-the-Loop) trained through a black-box solver"),
    "serve": App("deepzero_apps.tasks.serve", "serve a local classifier over HTTP as a black box (.npy in, .npy out)"),
}


class UsageError(Exception):
    """Bad command line or configuration: reported in one line, exit code 2."""


def main_help() -> str:
    width = max(map(len, APPS))
    apps = "\n".join(f"  {name:<{width}}  {app.summary}" for name, app in APPS.items())
    return (
        "usage: deepzero-task APP [OVERRIDES ...]\n\n"
        "Train deep models with zeroth-order optimization (DeepZero) through black boxes.\n\n"
        f"applications:\n{apps}\n\n"
        "Each application is a Hydra app: `deepzero-task APP --help` shows its config groups,\n"
        "`deepzero-task APP --cfg job` prints the composed config, `-m a=1,2` runs a sweep."
    )


def _first_of_sweeps(overrides: Sequence[str]) -> list[str]:
    """Replace every sweep `k=a,b` by its first value so one composition checks the whole sweep."""
    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is None:
                raise ConfigError(f"{o.input_line}: the sweep is empty")
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def check_overrides(app: str, overrides: Sequence[str], multirun: bool = False) -> DictConfig:
    """Compose and validate the config the way the run will; raise UsageError naming the problem.
    Returns the composed config."""
    try:
        with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra.compose(app, overrides=_first_of_sweeps(overrides) if multirun else list(overrides))
        validate(cfg, app)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # ValueError: ConfigError, and Hydra on e.g. `data=0`
        raise UsageError(one_line(exc)) from exc
    return cfg


def run_dir(app: str, overrides: Sequence[str]) -> str:
    """The run directory Hydra will create for these overrides, `${now:...}` resolved now."""
    with hydra.initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = hydra.compose(app, overrides=list(overrides), return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def join_ranks(app: str, cfg: DictConfig, overrides: Sequence[str], multirun: bool) -> list[str]:
    """Under torchrun: join the process group and return the extra overrides of this rank. All ranks
    write to rank 0's run directory (its `${now:...}` is broadcast, so ranks starting a second apart
    agree), and only rank 0 writes Hydra's files and logs there; the Trainer lets rank 0 alone log,
    evaluate and checkpoint."""
    if multirun:
        raise UsageError("-m/--multirun does not run under torchrun; launch one torchrun per run")
    init_distributed(cfg.device)
    shared = [run_dir(app, overrides) if is_main() else None]
    dist.broadcast_object_list(shared, src=0)
    extra = [f"hydra.run.dir={shared[0]}"]
    if not is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return extra


def guarded(app: str, run: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Turn configuration errors found while building a run into one-line exit-2 errors, and a
    run that fails while working (`RunError`: a non-finite step, a black box, a solver) into a
    one-line exit-1 error (the last good checkpoint stays)."""

    def job(cfg: DictConfig) -> dict:
        try:
            return run(cfg)
        except (ConfigError, FileExistsError) as exc:
            print(f"deepzero-task {app}: error: {one_line(exc)}", file=sys.stderr)
            sys.exit(USAGE_ERROR)
        except RunError as exc:
            print(f"deepzero-task {app}: error: {one_line(exc)}", file=sys.stderr)
            sys.exit(1)

    return job


def run_app(app: str, argv: Sequence[str]) -> int:
    args = get_args_parser().parse_args(list(argv))
    wants_run = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)
    argv = list(argv)
    if wants_run:
        cfg = check_overrides(app, args.overrides, multirun=args.multirun)
        if launched_by_torchrun():
            argv += join_ranks(app, cfg, args.overrides, args.multirun)
    task = importlib.import_module(APPS[app].module)
    hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=app)
    saved_argv = sys.argv
    sys.argv = [f"deepzero-task {app}", *argv]
    quiet = launched_by_torchrun() and not is_main()  # one rank reports; errors still reach stderr
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            hydra_main(guarded(app, task.run))()
    except SystemExit as exc:  # Hydra exits after --help/--cfg; guarded jobs exit 2 on config errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main_help())
        return 0 if argv else USAGE_ERROR
    app, rest = argv[0], argv[1:]
    if app not in APPS:
        print(f"deepzero-task: error: unknown application '{app}'; choose from: {', '.join(APPS)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return run_app(app, rest)
    except UsageError as exc:
        print(f"deepzero-task {app}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())

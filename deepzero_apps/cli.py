"""`deepzero-task APP [hydra overrides]`: one command, one sub-command per discovered application.

Apps register themselves (`deepzero_apps.apps`); each is a Hydra app with its own primary config
directory, so `--help` shows only its groups (config groups, `--cfg job`, `-m` multiruns). Before
Hydra runs, the overrides are composed and validated once, so a typo'd key, a wrong type or an
impossible value is a one-line error with exit code 2 instead of a traceback (`--debug` or
`HYDRA_FULL_ERROR=1` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
import torch.distributed as dist
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .adapter import INTERRUPTED, USAGE_ERROR, debug_requested, error_boundary
from .allocator import tune_malloc
from .apps import App, get_app, list_apps
from .config import describe_config_error, validate
from .engine.distributed import (
    init_distributed,
    is_main,
    job_get,
    job_set,
    launched_by_torchrun,
    on_rank0,
    restart_count,
)
from .errors import ConfigError, RunError, one_line
from .redact import redact_text
from .rundir import (
    CHECKPOINT,
    check_ranks_agree,
    check_shared_dir,
    hydra_overrides,
    lock_run_dir,
    release_run_dirs,
    save_hydra_files,
)


class UsageError(ConfigError):
    """Bad command line or configuration: reported in one line, exit code 2."""


def main_help() -> str:
    apps = list_apps()
    width = max(map(len, apps))
    lines = "\n".join(
        f"  {name:<{width}}  {app.summary if isinstance(app, App) else app}" for name, app in apps.items()
    )
    return (
        "usage: deepzero-task APP [--debug] [OVERRIDES ...]\n\n"
        "Train deep models with zeroth-order optimization (DeepZero) through black boxes.\n\n"
        f"applications:\n{lines}\n\n"
        "Each application is a Hydra app: `deepzero-task APP --help` shows its config groups,\n"
        "`deepzero-task APP --cfg job` prints the composed config, `-m a=1,2` runs a sweep;\n"
        "`--debug` (or HYDRA_FULL_ERROR=1) shows tracebacks instead of one-line errors."
    )


def hydra_args() -> argparse.ArgumentParser:
    """The flags of a Hydra app that decide whether it runs (Hydra itself parses them again)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flags in (("--help", "-h"), ("--hydra-help",), ("--info", "-i"), ("--multirun", "-m"), ("--resolve",),
                  ("--version",)):
        parser.add_argument(*flags, action="store_true")
    for flags in (("--cfg", "-c"), ("--package", "-p"), ("--shell-completion", "-sc"), ("--config-path", "-cp"),
                  ("--config-name", "-cn"), ("--config-dir", "-cd"), ("--experimental-rerun",)):
        parser.add_argument(*flags)
    parser.add_argument("overrides", nargs="*")
    return parser


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


def _app(app: App | str) -> App:
    return app if isinstance(app, App) else get_app(app)


def _config_root(path: str) -> Any:
    if path.startswith("pkg://"):
        return resources.files(path.removeprefix("pkg://").replace("/", "."))
    return Path(path.removeprefix("file://"))


def config_groups(app: App, searchpath: Sequence[str]) -> dict[str, list[str]]:
    """The groups this app composes from: its config dir, its `hydra.searchpath` and the ConfigStore
    groups registered for it (Hydra's own `$APP_CONFIG_GROUPS` ignores a primary config's search path)."""
    groups: dict[str, set[str]] = {}
    for root in [_config_root(app.config_dir), *map(_config_root, searchpath)]:
        for group in (d for d in root.iterdir() if d.is_dir() and d.name not in ("hydra", "__pycache__")):
            groups.setdefault(group.name, set()).update(
                f.name.removesuffix(".yaml") for f in group.iterdir() if f.name.endswith(".yaml")
            )
    store = ConfigStore.instance()
    for name in _STORED_GROUPS.get(app.name, ()):
        groups.setdefault(name, set()).update(o.removesuffix(".yaml") for o in store.list(name))
    return {g: sorted(options) for g, options in sorted(groups.items()) if options}


_STORED_GROUPS: dict[str, set[str]] = {}  # ConfigStore groups each app's `register_configs` added


def _store_groups() -> set[str]:
    store = ConfigStore.instance()
    return {n for n in store.list("") if n != "hydra" and store.get_type(n) == ObjectType.GROUP}


def prepare(app: App) -> None:
    """What composing this app needs first: its schema in the ConfigStore, its own config hook, and
    the resolvers its `--help` shows (a header naming the app, its groups)."""
    store = ConfigStore.instance()
    store.store(name=f"{app.name}_schema", node=app.schema)
    for group in ("help", "job_logging"):  # every app's (`override hydra/help: deepzero`), shared groups or not
        yaml = resources.files("deepzero_apps.configs").joinpath(f"hydra/{group}/deepzero.yaml")
        store.store(group=f"hydra/{group}", name="deepzero", node=OmegaConf.load(yaml.open()), provider="deepzero")
    OmegaConf.register_new_resolver("deepzero_app", lambda: f"deepzero-task {app.name}: {app.summary}", replace=True)
    OmegaConf.register_new_resolver(
        "deepzero_groups",
        lambda searchpath: "\n".join(f"{g}: {', '.join(o)}" for g, o in config_groups(app, searchpath).items()),
        replace=True,
    )
    if app.register_configs is not None:
        before = _store_groups()
        app.register_configs()
        _STORED_GROUPS.setdefault(app.name, set()).update(_store_groups() - before)


@contextlib.contextmanager
def initialized(app: App) -> Iterator[None]:
    """Hydra's compose API rooted at the app's primary config dir (a package or a directory)."""
    path = app.config_dir
    if path.startswith("pkg://"):
        with hydra.initialize_config_module(path.removeprefix("pkg://").replace("/", "."), version_base="1.3"):
            yield
    else:
        with hydra.initialize_config_dir(os.path.abspath(path.removeprefix("file://")), version_base="1.3"):
            yield


def app_searchpath(app: App) -> list[str]:
    """The `hydra.searchpath` of the app's primary config: where its shared groups come from."""
    primary = OmegaConf.load(_config_root(app.config_dir).joinpath(f"{app.name}.yaml").open())
    return list(OmegaConf.select(primary, "hydra.searchpath", default=[]))


def keep_app_searchpath(app: App, argv: Sequence[str]) -> list[str]:
    """A user's `hydra.searchpath=[...]` adds to the app's search path instead of replacing it (the
    app's shared groups live there)."""
    out = []
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            (override,) = OverridesParser.create().parse_overrides([arg])
            user = override.value()
            user = [str(p) for p in (user if isinstance(user, list) else [user])]
            paths = [*user, *(p for p in app_searchpath(app) if p not in user)]
            arg = f"hydra.searchpath=[{','.join(quoted(p) for p in paths)}]"
        out.append(arg)
    return out


def config_dir_overrides(app: App, config_dir: str | None) -> list[str]:
    """`--config-dir DIR` for the pre-validation's compose: DIR goes first on the app's search path,
    as `hydra.main` puts it for the run itself."""
    if config_dir is None:
        return []
    path = os.path.abspath(config_dir)
    if not os.path.isdir(path):
        raise UsageError(f"--config-dir '{config_dir}' is not a directory")
    searchpath = [f"file://{path}", *app_searchpath(app)]
    return [f"hydra.searchpath=[{','.join(quoted(p) for p in searchpath)}]"]


def check_overrides(app: App | str, overrides: Sequence[str], multirun: bool = False) -> DictConfig:
    """Compose and validate the config the way the run will; raise UsageError naming the problem.
    Returns the composed config."""
    return compose_checked(_app(app), overrides, multirun)[0]


def compose_checked(app: App, overrides: Sequence[str], multirun: bool = False) -> tuple[DictConfig, str, str | None]:
    """One composition before the run: the validated config, the run directory Hydra will create
    (`${now:...}` resolved now, so the directory locked is the one used) and `hydra.output_subdir`."""
    prepare(app)
    try:
        with initialized(app):
            full = hydra.compose(app.name, overrides=_first_of_sweeps(overrides) if multirun else list(overrides),
                                 return_hydra_config=True)
            directory = str(OmegaConf.select(full, "hydra.run.dir"))
            subdir = OmegaConf.select(full, "hydra.output_subdir")
        cfg = OmegaConf.masked_copy(full, [key for key in full if key != "hydra"])
        validate(cfg, app.schema)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, ValueError, OverflowError) as exc:
        if debug_requested():  # ValueError: ConfigError too; YAMLError: a config file that does not parse
            raise
        raise UsageError(describe_config_error(exc)) from exc
    return cfg, directory, subdir


def join_ranks(cfg: DictConfig, directory: str, multirun: bool) -> tuple[str, bool, list[str]]:
    """Under torchrun: join the process group (bounded by `dist_timeout`), refuse ranks whose configs
    differ, and return the run directory, whether to resume, and this rank's extra overrides. All
    ranks write to rank 0's run directory (its `${now:...}` is broadcast, so ranks starting a second
    apart agree), and only rank 0 writes Hydra's files and logs there; the Trainer lets rank 0 alone
    log, evaluate and checkpoint. After torchrun restarted the group (a lost worker), the directory
    is the one this job's first attempt claimed, resumed from its checkpoint if it has one."""
    if multirun:
        raise UsageError("-m/--multirun does not run under torchrun; launch one torchrun per run")
    init_distributed(cfg.device, timeout=cfg.get("dist_timeout"))
    check_ranks_agree(cfg)
    shared = [directory if is_main() else None]
    dist.broadcast_object_list(shared, src=0)
    directory, resume, extra = shared[0], bool(cfg.get("resume", False)), []
    claimed = job_get("run_dir")
    if claimed is not None:
        directory = claimed
        if not resume and on_rank0(lambda: (Path(claimed) / CHECKPOINT).exists()):
            resume, extra = True, ["resume=true"]
            if is_main():
                print(f"torchrun restart {restart_count()}: resuming {claimed}", flush=True)
    extra.append(f"hydra.run.dir={quoted(directory)}")
    if not is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return directory, resume, extra


def claim_run_dir(directory: str, resume: bool) -> list[str]:
    """Lock `directory` for this run before Hydra writes there (rank 0 under torchrun, its failure
    every rank's), and return rank 0's Hydra overrides for it; under torchrun then remember it for
    a restart and check that every rank sees it."""

    def claim() -> list[str]:
        lock_run_dir(directory)
        return hydra_overrides(directory, resume)

    overrides = on_rank0(claim)
    if launched_by_torchrun():
        job_set("run_dir", directory)
        check_shared_dir(directory)
    return overrides if is_main() else []


def quoted(value: str) -> str:
    """`value` as one Hydra override value, whatever it contains (commas, spaces, quotes)."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body) + "'"


def renamed(app: App, argv: Sequence[str]) -> list[str]:
    """`argv` with the app's deprecated override keys renamed, one line on stderr for each."""
    out = []
    for arg in argv:
        prefix = arg[: len(arg) - len(arg.lstrip("+~"))]
        key, sep, value = arg[len(prefix):].partition("=")
        if sep and key in app.aliases and not arg.startswith("-"):
            new = app.aliases[key]
            print(f"deepzero-task {app.name}: {key}= is deprecated, use {new}= ({key}={value} runs {new}={value})",
                  file=sys.stderr)
            arg = f"{prefix}{new}={value}"
        out.append(arg)
    return out


@contextlib.contextmanager
def without_alias_keys(app: App, active: bool) -> Iterator[None]:
    """`--help` without the app's deprecated alias keys (certify's `mode: null` beside `method`): they are
    renamed on the command line, so listing them only shows a second name for one setting."""
    if not (active and app.aliases):
        yield
        return
    hidden = {f"{key}: null" for key in app.aliases}
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        sys.stdout.write("".join(line for line in buffer.getvalue().splitlines(True) if line.rstrip() not in hidden))


def run_app(app: App, argv: Sequence[str]) -> int:
    argv = keep_app_searchpath(app, renamed(app, argv))
    args, _ = hydra_args().parse_known_args(list(argv))
    wants_run = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.version)
    argv = list(argv)
    task = error_boundary(app.name, app.run)
    if wants_run:
        overrides = [*config_dir_overrides(app, args.config_dir), *args.overrides]
        cfg, directory, subdir = compose_checked(app, overrides, multirun=args.multirun)
        if launched_by_torchrun():
            directory, resume, extra = join_ranks(cfg, directory, args.multirun)
            argv += extra
        elif not args.multirun:  # `${now:...}` resolved once: the directory locked is the one Hydra uses
            argv.append(f"hydra.run.dir={quoted(directory)}")
            resume = bool(cfg.get("resume", False))
        else:
            directory = None  # multirun jobs lock in start_run
        if directory is not None:  # lock before Hydra writes (multirun jobs lock in start_run)
            resumed = claim_run_dir(directory, resume)
            argv += resumed
            subdir = resumed[0].split("=", 1)[1] if resumed else subdir
        if subdir is not None and is_main():
            task = error_boundary(app.name, with_redacted_hydra_files(app.run, subdir))
        argv.append("hydra.output_subdir=null")  # Hydra would record secrets; the job writes redacted copies
    else:
        prepare(app)
    hydra_main = hydra.main(version_base="1.3", config_path=app.config_dir, config_name=app.name)
    saved_argv = sys.argv
    sys.argv = [f"deepzero-task {app.name}", *argv]
    quiet = launched_by_torchrun() and not is_main()  # one rank reports; errors still reach stderr
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else without_alias_keys(app, args.help):
            hydra_main(task)()
    except SystemExit as exc:  # Hydra exits after --help/--cfg; the boundary exits 2 or 1 on errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        release_run_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def with_redacted_hydra_files(run: Callable[[DictConfig], Any], subdir: str) -> Callable[[DictConfig], Any]:
    """`run`, after writing Hydra's record of the job, redacted (`rundir.save_hydra_files`), into `subdir`."""

    def job(cfg: DictConfig) -> Any:
        save_hydra_files(cfg, HydraConfig.instance().cfg, subdir)
        return run(cfg)

    return job


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        print(main_help())
        return 0 if argv else USAGE_ERROR
    name, rest = argv[0], argv[1:]
    tune_malloc()  # glibc mmap/trim thresholds (DEEPZERO_MALLOC_TUNING=0 opts out)
    try:
        app = get_app(name)
    except ConfigError as exc:
        print(f"deepzero-task: error: {one_line(exc)}", file=sys.stderr)
        return USAGE_ERROR
    try:
        return run_app(app, rest)
    except (UsageError, ConfigError) as exc:
        if debug_requested() and not isinstance(exc, UsageError):
            raise
        print(f"deepzero-task {name}: error: {redact_text(one_line(exc))}", file=sys.stderr)  # Hydra echoes overrides
        return USAGE_ERROR
    except RunError as exc:  # e.g. the run directory is locked by another process
        if debug_requested():
            raise
        print(f"deepzero-task {name}: error: {redact_text(one_line(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the run started: nothing written yet
        print(f"deepzero-task {name}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

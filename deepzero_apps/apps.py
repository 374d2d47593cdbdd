"""Apps register themselves: a module-level `APP = App(...)` in a `deepzero_apps.tasks` module or package, or an
entry point in the `deepzero_apps.apps` group (`name = "my_pkg.my_app:APP"`) for third-party apps.

The CLI discovers them here, so a new task is one module plus its Hydra configs; nothing lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from omegaconf import DictConfig

from .errors import ConfigError, one_line

ENTRY_POINT_GROUP = "deepzero_apps.apps"
TASKS = "deepzero_apps.tasks"


@dataclass(frozen=True)
class App:
    """One `deepzero-task NAME` command.

    `schema`: the typed config (a dataclass) stored as `<name>_schema` for the app's defaults list.
    `config_path`: the app's primary Hydra config dir (`pkg://...` or an absolute path) holding
    `<name>.yaml` and the app's own groups; shared groups come in through its `hydra.searchpath`.
    `register_configs`: called before composing, to store configs made at run time (ConfigStore,
    resolvers) only for this app. `aliases`: deprecated override keys and the keys they now are.
    """

    name: str
    summary: str
    schema: type
    run: Callable[[DictConfig], dict]
    config_path: str = ""
    register_configs: Callable[[], None] | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> str:
        return self.config_path or f"pkg://deepzero_apps.configs.{self.name}"


def _from_module(module: str) -> App | None:
    app = getattr(importlib.import_module(module), "APP", None)
    return app if isinstance(app, App) else None


def builtin_apps() -> dict[str, App]:
    """Every `APP` declared in a module of `deepzero_apps.tasks` (helper modules declare none)."""
    tasks = importlib.import_module(TASKS)
    found = (_from_module(f"{TASKS}.{m.name}") for m in pkgutil.iter_modules(tasks.__path__))
    return {app.name: app for app in found if app is not None}


def _entry_point_app(ep) -> App:
    try:
        app = ep.load()
    except Exception as exc:  # a broken plug-in is reported, never a traceback
        raise ConfigError(f"app '{ep.name}' ({ep.value}) cannot be loaded: {one_line(exc)}") from exc
    if not isinstance(app, App):
        raise ConfigError(f"app '{ep.name}' ({ep.value}) is not a deepzero_apps.apps.App")
    return app


def list_apps() -> dict[str, App | str]:
    """Built-in apps, then plug-ins; a plug-in that fails to load maps to its one-line error."""
    apps: dict[str, App | str] = dict(builtin_apps())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            apps.setdefault(ep.name, _entry_point_app(ep))
        except ConfigError as exc:
            apps.setdefault(ep.name, str(exc))
    return apps


def get_app(name: str) -> App:
    """The app called `name`: `deepzero_apps.tasks.<name>` first (no scan), then every app."""
    try:
        app = _from_module(f"{TASKS}.{name}") if name.isidentifier() else None
    except ModuleNotFoundError as exc:
        if exc.name != f"{TASKS}.{name}":
            raise
        app = None
    if app is not None and app.name == name:
        return app
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return _entry_point_app(ep)
    found = builtin_apps().get(name)
    if found is None:
        raise ConfigError(f"unknown application '{name}'; choose from: {', '.join(list_apps())}")
    return found

"""What a run may write about its config: URLs without credentials or query, secret keys without values.

A remote black box's API key can sit in a URL (``https://user:pw@host/p?api_key=...``), in
``classifier.headers`` or in serve's ``token``. Every file a run writes about its config
(`run_config.yaml`, Hydra's ``.hydra/*.yaml``) goes through `redact`, which replaces the userinfo and
query of every URL in every string by ``<redacted>`` and the values of `SECRET_KEYS` entirely. It is
idempotent, so a resume compares a redacted request with a redacted record.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

MARK = "<redacted>"
SECRET_KEYS = frozenset({"headers", "token"})  # config keys whose values are secrets, wherever they sit
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#\s'\"@]*@)?(?P<rest>[^?#\s'\"]*)"
                  r"(?P<query>\?(?:(?!,\s*[A-Za-z][A-Za-z0-9+.-]*://|\](?:$|[,}\s]))[^#\s'\"])*)?")
_OVERRIDE = re.compile(r"^(?P<key>[+~]{0,2}[\w.\[\]/-]+?)=")


def redact_text(text: str) -> str:
    """`text` with the credentials and query of every URL in it replaced by `MARK`."""
    def one(match: re.Match[str]) -> str:
        user = f"{MARK}@" if match.group("user") else ""
        query = f"?{MARK}" if match.group("query") else ""
        return f"{match.group('scheme')}{user}{match.group('rest')}{query}"

    return _URL.sub(one, text)


def redact_override(override: str) -> str:
    """A command-line override as it may be recorded: a secret key's value hidden, URLs redacted."""
    match = _OVERRIDE.match(override)
    if match and match.group("key").lstrip("+~").rsplit(".", 1)[-1] in SECRET_KEYS:
        return f"{match.group('key')}={MARK}"
    return redact_text(override)


def _walk(node: Any, key: str = "") -> Any:
    if key in SECRET_KEYS and node is not None:  # a dict of headers keeps its names
        return {k: MARK for k in node} if isinstance(node, dict) else MARK
    if isinstance(node, dict):
        return {k: _walk(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        if key == "task":  # hydra.overrides.task: the command line's overrides
            return [redact_override(v) if isinstance(v, str) else _walk(v) for v in node]
        return [_walk(v) for v in node]
    if key == "override_dirname" and isinstance(node, str):  # hydra.job's overrides joined by ',' (so are values)
        secret = re.search(rf"(?:^|,)[+~]*(?:[\w\[\]/-]+\.)*(?:{'|'.join(SECRET_KEYS)})=", node)
        return MARK if secret else redact_text(node)
    return redact_text(node) if isinstance(node, str) else node


def redact(cfg: DictConfig | ListConfig) -> DictConfig | ListConfig:
    """A copy of `cfg`, unresolved (interpolations stay as written), safe to write to a file."""
    plain = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if isinstance(cfg, ListConfig):  # Hydra's overrides.yaml
        return OmegaConf.create([redact_override(v) if isinstance(v, str) else _walk(v) for v in plain])
    return OmegaConf.create(_walk(plain))

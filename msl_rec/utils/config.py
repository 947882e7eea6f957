"""Where the configs live, and the OmegaConf resolvers the configs use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(os.environ.get("MSL_REC_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_DIR = str(PROJECT_ROOT / "configs")


def register_resolvers() -> None:
    """``${project_root:}`` -> the checkout (or ``$MSL_REC_ROOT``); safe to call twice."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


register_resolvers()

"""Build hook: the wheel maps the component folders (db/, models/, producer/, worker/) under
pixelmill/ (README, "Layout").

In a checkout they are linked into pixelmill/; the builds never walk those links (a walk that
follows them meets each folder twice, and hatchling keeps only the first it meets), so a
standard wheel copies each folder in by name, from the checkout and from the sdist alike. An
editable install maps only the name `pixelmill` to the checkout, where the links do the rest,
so nothing is copied for it.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

COMPONENTS = ("db", "models", "producer", "worker")


class ComponentsHook(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"].update({c: f"pixelmill/{c}" for c in COMPONENTS})

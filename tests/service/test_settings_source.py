"""Every service setting goes through :class:`service.settings.Settings` (the one reader of NANOMORPH_*)."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

SERVICE = Path(__file__).resolve().parents[2] / "service"


def test_index_folder_is_a_setting() -> None:
    assert Settings().index == "" and Settings.from_env({}).index == ""
    assert Settings.from_env({"NANOMORPH_INDEX": " /data/index "}).index == "/data/index"


def test_no_service_module_reads_the_environment_but_settings() -> None:
    readers = {
        path.name
        for path in SERVICE.glob("*.py")
        if re.search(r"os\.environ|os\.getenv|environ\.get", path.read_text(encoding="utf-8"))
    }
    # lifecycle.py asks whether BentoML runs inside its own container (BENTOML_CONTAINERIZED):
    # a fact of the deployment read when recycling is set up, not a setting of ours.
    assert readers <= {"settings.py", "lifecycle.py"}
    assert "NANOMORPH_" not in (SERVICE / "lifecycle.py").read_text(encoding="utf-8").split('"""', 2)[2]

"""Writes the bento's requirements (``bento-requirements.txt``) from pyproject.toml.

The bento's packages are typed once, in pyproject.toml: the extra named by
``[tool.nanomorph.bento] extra`` (``gpu``: the core dependencies, ``serving-base`` and
onnxruntime-gpu), its self-references (``nanomorph[serving-base]``) expanded the way pip does,
with the ``pins`` of that table in place of the extra's version ranges for the packages the bento's
CUDA image fixes (a pin outside pyproject's range is refused). ``bentofile.yaml`` reads the file
(``python.requirements_txt``); ``make bento`` writes it and runs ``bentoml build``;
tests/test_bentoml_build.py checks that the committed file is what this script writes.

    python scripts/bento_requirements.py           # (re)write bento-requirements.txt
    python scripts/bento_requirements.py --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
OUTPUT = REPO / "bento-requirements.txt"
HEADER = (
    "# Written by scripts/bento_requirements.py from pyproject.toml ([tool.nanomorph.bento]): do not edit;\n"
    "# edit pyproject.toml and run `make bento-requirements`.\n"
)
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def _split(requirement: str) -> tuple[str, str, str]:
    """``(normalised name, "[extras]" or "", version spec and markers)`` of one requirement."""
    m = _NAME.match(requirement)
    if not m:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    return m.group(1).lower().replace("_", "-"), m.group(2) or "", m.group(3).strip()


def _expand(project: dict[str, Any], extra: str) -> list[str]:
    """The requirements an install of ``<project>[extra]`` brings, in order, self-references
    (``<project>[other]``) expanded in place."""
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    seen: set[str] = set()

    def walk(name: str) -> list[str]:
        if name not in extras:
            raise ValueError(f"pyproject.toml has no extra {name!r}")
        if name in seen:
            return []
        seen.add(name)
        out: list[str] = []
        for req in extras[name]:
            own, own_extras, _ = _split(req)
            if own != project["name"].lower():
                out.append(req)
                continue
            for other in own_extras.strip("[]").split(","):
                out.extend(walk(other.strip()))
        return out

    return list(project.get("dependencies", [])) + walk(extra)


def _pinned(requirement: str, pin: str) -> str:
    """``requirement`` with its version range replaced by ``pin``, refused when the pin is outside it."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    version = pin.lstrip("=")
    if req.specifier and version not in req.specifier:
        raise ValueError(f"bento pin {req.name}{pin} is outside pyproject's range {requirement!r}")
    _, extras, _ = _split(requirement)
    return f"{req.name}{extras}{pin}"


def requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The bento's requirement lines, from ``pyproject``'s ``[tool.nanomorph.bento]``."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    bento = data["tool"]["nanomorph"]["bento"]
    pins = {_split(k)[0]: v for k, v in bento.get("pins", {}).items()}
    lines: list[str] = []
    names: set[str] = set()
    for req in _expand(data["project"], bento["extra"]):
        name = _split(req)[0]
        if name in names:
            continue
        names.add(name)
        lines.append(_pinned(req, pins[name]) if name in pins else req)
    unused = set(pins) - names
    if unused:
        raise ValueError(f"bento pins for packages the extra does not have: {', '.join(sorted(unused))}")
    return lines


def render(pyproject: Path = PYPROJECT) -> str:
    return HEADER + "".join(f"{line}\n" for line in requirements(pyproject))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default %(default)s")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date: run `make bento-requirements`", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({text.count(chr(10)) - HEADER.count(chr(10))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

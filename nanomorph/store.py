"""The versioned model store: exported ONNX models with their manifest and model card.

A stored model is a folder holding ``model.onnx`` (self-contained, its preprocessing contract and
class names inside its ``metadata_props``), optionally ``model.int8.onnx`` (its int8 quantisation,
stored only where export's accuracy check kept it; :func:`nanomorph.runtime.model_file` picks
which one a session loads), ``manifest.json`` (tag, task, sha256 of every file,
classes, metrics, contract) and ``README.md`` (the model card). Two stores hold such folders:

* the BentoML model store (``bentoml.models.create``; the folder is the BentoML model's path),
  selected by ``store="bentoml"`` or ``None``; its location follows ``BENTOML_HOME``;
* a plain folder ``STORE/<name>/<version>/`` with ``STORE/<name>/latest`` holding the newest
  version string, for users without BentoML.

Tags are ``<prefix>-<task>:<version>`` (prefix default ``nanomorph``). Loading verifies the sha256
of every file in the manifest and refuses a mismatch (:class:`IntegrityError`).

This module imports neither torch nor onnx; bentoml only inside the functions touching its store.
It also implements the ``nanomorph models list`` command. See docs/architecture.md, section 4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanomorph.atomic import atomic_write_text
from nanomorph.contract import Contract
from nanomorph.tasks import TASKS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CARD_FILE = "README.md"
LATEST_FILE = "latest"
DEFAULT_PREFIX = "nanomorph"
# BentoML's rule for names and versions; the folder store follows it so tags move between stores.
_TAG_PART = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
META_PREFIX = "nanomorph."
# metadata_props keys whose values are JSON (the others are plain strings).
JSON_KEYS = ("contract", "classes", "metrics", "ood", "encoder", "provenance", "instances")


class IntegrityError(ValueError):
    """A stored model's file is missing or its sha256 does not match the manifest."""


@dataclass
class StoredModel:
    """A model folder of the store, verified and parsed.

    Attributes:
        tag: ``<prefix>-<task>:<version>``.
        task: ``embed``, ``classify`` or ``segment``.
        path: the model folder.
        onnx_path: ``path / "model.onnx"``.
        manifest: the parsed ``manifest.json``.
        metadata: the ONNX ``metadata_props`` with the ``nanomorph.`` prefix dropped and JSON values
            parsed (``task``, ``contract``, ``classes``, ``metrics``, ``ood``, ``encoder``, ``provenance``).
        classes: class names in output order (empty for ``embed``).
        contract: the preprocessing contract the model was trained with.
    """

    tag: str
    task: str
    path: Path
    onnx_path: Path
    manifest: dict[str, Any]
    metadata: dict[str, Any]
    classes: list[str] = field(default_factory=list)
    contract: Contract = field(default_factory=Contract)

    @property
    def name(self) -> str:
        return split_tag(self.tag)[0]

    @property
    def version(self) -> str:
        return split_tag(self.tag)[1]

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.metadata.get("metrics") or self.manifest.get("metrics") or {})

    @property
    def ood(self) -> dict[str, Any] | None:
        """``{"centroids": [[...]], "threshold": float, "metric": "cosine"}`` for classifiers."""
        ood = self.metadata.get("ood")
        return dict(ood) if ood else None

    @property
    def int8_path(self) -> Path | None:
        """The int8 model beside ``model.onnx`` (``model.int8.onnx``, listed in the manifest), if
        export stored one: only when its accuracy check passed."""
        return self.path / INT8_FILE if INT8_FILE in (self.manifest.get("files") or {}) else None


# --------------------------------------------------------------------------------------------- tags


def split_tag(tag: str) -> tuple[str, str]:
    """``"nanomorph-classify:v1"`` -> ``("nanomorph-classify", "v1")``; no version means ``latest``."""
    name, _, version = str(tag).partition(":")
    return name.strip().lower(), (version.strip() or "latest")


def make_tag(prefix: str, task: str, version: str) -> str:
    """``<prefix>-<task>:<version>``, validated so the same tag works in both stores."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    name = f"{prefix}-{task}".lower()
    for part, what in ((name, "name"), (version, "version")):
        if not _TAG_PART.match(part):
            raise ValueError(
                f"invalid model {what} {part!r}: use lowercase letters, digits, '.', '_' and '-'"
            )
    return f"{name}:{version}"


def new_version() -> str:
    """A sortable version string: ``YYYYMMDD-HHMMSS-xxxx`` (UTC, 4 random hex digits)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.urandom(2).hex()}"


# ------------------------------------------------------------------------------------ metadata_props


def metadata_props(
    task: str,
    contract: Contract | Mapping[str, Any],
    classes: list[str] | tuple[str, ...] = (),
    metrics: Mapping[str, Any] | None = None,
    ood: Mapping[str, Any] | None = None,
    encoder: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    instances: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The ONNX ``metadata_props`` of an exported model (all strings; docs/architecture.md §4).

    Exporters (``training.export``, the test fixtures) build their metadata here, so the keys are
    spelled once.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
    contract_obj = contract if isinstance(contract, Contract) else Contract.from_dict(dict(contract))
    props = {
        "task": task,
        "contract": contract_obj.to_dict(),
        "classes": list(classes),
        "metrics": dict(metrics or {}),
        "encoder": dict(encoder or {}),
        "provenance": dict(provenance or {}),
    }
    if ood is not None:
        props["ood"] = dict(ood)
    if instances:  # segment post-processing (nanomorph.particles.InstanceParams)
        props["instances"] = dict(instances)
    return {
        META_PREFIX + k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
        for k, v in props.items()
    }


def parse_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """Drops the ``nanomorph.`` prefix and parses the JSON values of ``metadata_props``."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        short = key[len(META_PREFIX) :] if key.startswith(META_PREFIX) else key
        if short in JSON_KEYS:
            try:
                out[short] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"metadata {key!r} is not valid JSON ({exc})") from exc
        else:
            out[short] = value
    return out


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """Top-level fields of a protobuf message: ``(number, wire_type, value)``; bytes for wire type 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf")
        yield number, wire, value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without onnx or onnxruntime.

    Walks the top level of the ``ModelProto`` (field 14 = ``metadata_props``, entries with
    ``key`` = 1 and ``value`` = 2) and skips the graph, so it is cheap even for large models.
    """
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
        props: dict[str, str] = {}
        for number, wire, value in _fields(data):
            if number == 14 and wire == 2:
                entry = {n: bytes(v).decode("utf-8") for n, w, v in _fields(value) if w == 2}
                props[entry.get(1, "")] = entry.get(2, "")
        return props
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX file ({exc})") from exc


# ----------------------------------------------------------------------------------- model folders


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} does not exist: {path} is not a stored nanomorph model")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{manifest_path} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{manifest_path} has no 'files' table of sha256 digests")
    return manifest


def verify_model_dir(path: str | Path) -> None:
    """Checks the sha256 of every file listed in the manifest; raises :class:`IntegrityError`."""
    path = Path(path)
    manifest = _read_manifest(path)
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise IntegrityError(f"{file} is listed in {path / MANIFEST} but missing")
        actual = sha256_file(file)
        if actual != expected:
            raise IntegrityError(
                f"{file} does not match its manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                "the file was modified or corrupted; re-export the model"
            )


def load_model_dir(path: str | Path, *, verify: bool = True, tag: str | None = None) -> StoredModel:
    """Loads a stored model folder.

    Args:
        path: the folder holding ``model.onnx`` and ``manifest.json``.
        verify: check every file's sha256 against the manifest (default). Listing skips it.
        tag: overrides the manifest's tag (BentoML knows the authoritative one).

    Raises:
        FileNotFoundError: no such folder / no manifest.
        IntegrityError: a file is missing or modified.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    manifest = _read_manifest(path)
    if verify:
        verify_model_dir(path)
    onnx_path = path / MODEL_FILE
    if not onnx_path.is_file():
        raise IntegrityError(f"{onnx_path} is missing")
    metadata = parse_metadata(read_onnx_metadata(onnx_path))
    task = str(metadata.get("task") or manifest.get("task") or "")
    if task not in TASKS:
        raise ValueError(f"{onnx_path}: unknown task {task!r} in its metadata")
    contract_dict = metadata.get("contract") or manifest.get("contract") or {}
    try:
        contract = Contract.from_dict(dict(contract_dict))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{onnx_path}: bad preprocessing contract in its metadata ({exc})") from exc
    classes = [str(c) for c in (metadata.get("classes") or manifest.get("classes") or [])]
    return StoredModel(
        tag=tag or str(manifest.get("tag") or f"{path.parent.name}:{path.name}"),
        task=task,
        path=path,
        onnx_path=onnx_path,
        manifest=manifest,
        metadata=metadata,
        classes=classes,
        contract=contract,
    )


def write_model_dir(
    onnx_path: str | Path,
    dest_dir: str | Path,
    tag: str,
    task: str,
    extra: Mapping[str, Any] | None = None,
) -> StoredModel:
    """Writes a stored model folder: ``model.onnx``, ``manifest.json`` and ``README.md``.

    Classes, contract and metrics come from the ONNX file's metadata. ``extra`` may hold
    ``readme`` (model card text; a short default card otherwise), ``files`` (name -> source path
    of further files to store, e.g. a quantisation report) and any other JSON-able manifest
    entries. ``dest_dir`` is filled in place (it may exist, e.g. a BentoML model path, but must
    not already hold a manifest).
    """
    onnx_path = Path(onnx_path)
    dest = Path(dest_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist")
    if (dest / MANIFEST).exists():
        raise ValueError(f"{dest} already holds a stored model; choose another version")
    extra = dict(extra or {})
    readme = extra.pop("readme", None)
    more_files = dict(extra.pop("files", {}) or {})
    metadata = parse_metadata(read_onnx_metadata(onnx_path))
    if metadata.get("task", task) != task:
        raise ValueError(f"{onnx_path} is a {metadata.get('task')!r} model, not {task!r}")
    if "contract" not in metadata:
        raise ValueError(f"{onnx_path} has no nanomorph.contract metadata; export it with nanomorph export")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, dest / MODEL_FILE)
    for name, source in more_files.items():
        shutil.copyfile(source, dest / name)
    files = {name: sha256_file(dest / name) for name in [MODEL_FILE, *more_files]}
    manifest: dict[str, Any] = {
        "tag": tag,
        "task": task,
        "files": files,
        "classes": list(metadata.get("classes") or []),
        "metrics": dict(metadata.get("metrics") or {}),
        "contract": dict(metadata["contract"]),
        "created_at": (metadata.get("provenance") or {}).get("created_at")
        or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(extra)
    if readme is None:
        readme = default_card(tag, task, manifest)
    (dest / CARD_FILE).write_text(str(readme), encoding="utf-8")
    # The manifest goes last: a folder without one is an unfinished write, never a model.
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return load_model_dir(dest, tag=tag)


def default_card(tag: str, task: str, manifest: Mapping[str, Any]) -> str:
    """A minimal model card for models stored without one."""
    classes = ", ".join(manifest.get("classes") or []) or "-"
    return (
        f"# {tag}\n\nTask: {task}. Classes: {classes}.\n\n"
        f"Metrics: `{json.dumps(manifest.get('metrics') or {}, sort_keys=True)}`\n\n"
        f"Preprocessing contract: `{json.dumps(manifest.get('contract') or {}, sort_keys=True)}`\n"
    )


# ---------------------------------------------------------------------------------------- the stores


def _is_bentoml(store: str | Path | None) -> bool:
    return store is None or str(store) == "bentoml"


def default_store() -> str:
    """``NANOMORPH_STORE`` or ``bentoml``."""
    return os.environ.get("NANOMORPH_STORE") or "bentoml"


def _dir_version(store: Path, name: str, version: str) -> str:
    if version != "latest":
        return version
    latest = store / name / LATEST_FILE
    if latest.is_file():
        return latest.read_text(encoding="utf-8").strip()
    versions = sorted(p.name for p in (store / name).glob("*") if (p / MANIFEST).is_file())
    if not versions:
        raise FileNotFoundError(f"no versions of {name} in model store {store}")
    return versions[-1]


def resolve(tag: str, store: str | Path | None = None, *, verify: bool = True) -> StoredModel:
    """Finds and loads (verifying sha256) the model ``tag`` in ``store``.

    Args:
        tag: ``name:version``; ``name`` or ``name:latest`` means the newest version.
        store: ``None`` or ``"bentoml"`` for the BentoML model store, otherwise a folder.

    Raises:
        FileNotFoundError: no such model (the message names the store).
        IntegrityError: the model's files do not match its manifest.
    """
    name, version = split_tag(tag)
    if _is_bentoml(store):
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            model = bentoml.models.get(f"{name}:{version}")
        except NotFound as exc:
            raise FileNotFoundError(f"model {name}:{version} not found in the BentoML model store") from exc
        return load_model_dir(model.path, verify=verify, tag=str(model.tag))
    root = Path(store)  # type: ignore[arg-type]
    if not root.is_dir():
        raise FileNotFoundError(f"model store folder {root} does not exist")
    if not (root / name).is_dir():
        raise FileNotFoundError(f"model {name} not found in model store {root}")
    version = _dir_version(root, name, version)
    path = root / name / version
    if not path.is_dir():
        raise FileNotFoundError(f"model {name}:{version} not found in model store {root}")
    return load_model_dir(path, verify=verify, tag=f"{name}:{version}")


def list_models(store: str | Path | None = None, *, verify: bool = False) -> list[StoredModel]:
    """All models in ``store`` (newest version last within each name). Unreadable entries are logged
    and skipped. ``verify`` also checks every sha256 (slow for big stores)."""
    found: list[StoredModel] = []
    if _is_bentoml(store):
        import bentoml

        for model in bentoml.models.list():
            if not (Path(model.path) / MANIFEST).is_file():
                continue  # a BentoML model that nanomorph did not write
            try:
                found.append(load_model_dir(model.path, verify=verify, tag=str(model.tag)))
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", model.tag, exc)
        return sorted(found, key=lambda m: (m.name, m.version))
    root = Path(store)  # type: ignore[arg-type]
    if not root.is_dir():
        raise FileNotFoundError(f"model store folder {root} does not exist")
    for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
        folder = manifest.parent
        try:
            found.append(load_model_dir(folder, verify=verify, tag=f"{folder.parent.name}:{folder.name}"))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", folder, exc)
    return found


def save_model(
    onnx_path: str | Path,
    store: str | Path | None,
    tag: str,
    task: str,
    extra: Mapping[str, Any] | None = None,
) -> StoredModel:
    """Stores an exported ONNX file under ``tag`` in ``store`` (``"bentoml"``/None or a folder).

    Folder store: writes ``STORE/<name>/<version>/`` via a temporary folder renamed into place, then
    updates ``STORE/<name>/latest``. An existing version is never overwritten.
    """
    name, version = split_tag(tag)
    if version == "latest":
        raise ValueError("'latest' is not a version you can write; give a version or leave it empty")
    if _is_bentoml(store):
        import bentoml

        metadata = parse_metadata(read_onnx_metadata(onnx_path))
        labels = {"task": task, "framework": "onnx", "classes": ",".join(metadata.get("classes") or [])}
        bento_meta = {
            "task": task,
            "classes": list(metadata.get("classes") or []),
            "contract": metadata.get("contract") or {},
            "metrics": metadata.get("metrics") or {},
        }
        with bentoml.models.create(tag, labels=labels, metadata=bento_meta) as model:
            write_model_dir(onnx_path, model.path, tag, task, extra)
        return resolve(tag, "bentoml")
    root = Path(store)  # type: ignore[arg-type]
    final = root / name / version
    if final.exists():
        raise ValueError(f"{final} already exists; model versions are never overwritten")
    (root / name).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root / name, prefix=f".{version}."))
    try:
        write_model_dir(onnx_path, tmp, tag, task, extra)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / name / LATEST_FILE, version + "\n")
    return load_model_dir(final, tag=f"{name}:{version}")

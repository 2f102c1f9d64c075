"""training.artifacts: every encoder source form resolves, our safetensors formats round-trip with
their metadata and Contract, and a missing or damaged file is named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanomorph.contract import Contract
from tests.training.cls_helpers import ARCH, write_encoder
from training import artifacts as A
from training.backbones import create_backbone


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pre")
    write_encoder(run / A.BACKBONE_FILE, image_size=48)
    return run


def _facts(src: A.EncoderSource) -> tuple[object, ...]:
    return src.kind, src.architecture, src.init, src.method


def test_scratch_and_imagenet_forms() -> None:
    scratch = A.resolve_encoder_source("scratch")
    assert _facts(scratch) == ("scratch", "resnet18", None, "none")
    assert A.resolve_encoder_source("Scratch", ARCH).architecture == ARCH
    assert scratch.contract is None
    net = A.resolve_encoder_source("imagenet@resnet50")
    assert _facts(net) == ("imagenet", "resnet50", "imagenet", "imagenet")
    assert A.resolve_encoder_source("imagenet", ARCH).architecture == ARCH


def test_run_folder_and_its_backbone_file(encoder_run: Path) -> None:
    for given in (encoder_run, encoder_run / A.BACKBONE_FILE, str(encoder_run)):
        src = A.resolve_encoder_source(given, "resnet50")  # a run names its own architecture
        assert (src.kind, src.architecture, src.method) == ("run", ARCH, "simclr")
        assert src.path == encoder_run / A.BACKBONE_FILE and src.init is None
        assert src.contract == Contract(image_size=48)
    model = A.resolve_encoder_source(encoder_run).build()
    state, _ = A.read_weights(encoder_run / A.BACKBONE_FILE)
    torch.testing.assert_close(model.state_dict(), state)
    with pytest.raises(ValueError, match="@ARCH goes with imagenet or a checkpoint"):
        A.resolve_encoder_source(f"{encoder_run}@{ARCH}")


def test_foreign_checkpoint_forms(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    pth = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": create_backbone(ARCH).state_dict()}, pth)
    src = A.resolve_encoder_source(f"{pth}@{ARCH}")
    assert (src.kind, src.architecture, src.path, src.init, src.method) == (
        "checkpoint", ARCH, pth, str(pth), "checkpoint"
    )  # fmt: skip
    assert A.resolve_encoder_source(pth, ARCH).architecture == ARCH
    assert src.build().state_dict().keys() == create_backbone(ARCH).state_dict().keys()
    # A safetensors file without nanomorph metadata (timm hub) is a foreign checkpoint too.
    hub = tmp_path / "model.safetensors"
    save_file(create_backbone(ARCH).state_dict(), str(hub))
    assert A.resolve_encoder_source(f"{hub}@{ARCH}").kind == "checkpoint"
    # A path holding an @ is a path, not SOURCE@ARCH.
    odd = tmp_path / "x@y"
    write_encoder(odd / A.BACKBONE_FILE)
    assert A.resolve_encoder_source(odd).kind == "run"


def test_missing_and_bad_sources_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        A.resolve_encoder_source(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"empty.*backbone\.safetensors does not exist"):
        (tmp_path / "empty").mkdir()
        A.resolve_encoder_source(tmp_path / "empty", flag="--encoder")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=f"{bad}: not a readable safetensors file"):
        A.resolve_encoder_source(bad)
    with pytest.raises(FileNotFoundError, match="gone.safetensors does not exist"):
        A.read_metadata(tmp_path / "gone.safetensors")
    unfinished = r"--classifier .*classifier\.safetensors does not exist \(is the run unfinished"
    with pytest.raises(FileNotFoundError, match=unfinished):
        A.run_weights(tmp_path / "empty", A.CLASSIFIER_FILE, "--classifier")


def test_formats_round_trip_with_metadata_and_contract(tmp_path: Path) -> None:
    model = create_backbone(ARCH)
    contract = Contract(image_size=40, p_low=2.0, tile_size=64, tile_overlap=16)
    meta = {"architecture": ARCH, "contract": contract.to_json(), "classes": ["a", "b"], "epochs": 3}
    for fmt in (A.BACKBONE_FORMAT, A.CLASSIFIER_FORMAT, A.SEGMENTER_FORMAT):
        path = A.write_weights(model, tmp_path / f"{fmt.split('/')[0]}.safetensors", meta, fmt)
        state, read = A.read_weights(path, fmt, required=("architecture", "contract"))
        torch.testing.assert_close(state, model.state_dict())
        assert read["format"] == fmt and read["architecture"] == ARCH and read["git_commit"]
        assert json.loads(read["classes"]) == ["a", "b"] and read["epochs"] == "3"  # non-strings as JSON
        assert A.contract_of(read, path) == contract
        assert A.read_metadata(path) == read
    assert A.run_weights(tmp_path, "nanomorph-segmenter.safetensors", "--segmenter") == (
        tmp_path, tmp_path / "nanomorph-segmenter.safetensors"
    )  # fmt: skip
    # Files from before the contract recorded only their input side.
    assert A.contract_of({"image_size": "96"}, "old") == Contract(image_size=96)


def test_writer_and_reader_refuse_what_is_not_theirs(tmp_path: Path) -> None:
    model = create_backbone(ARCH)
    with pytest.raises(ValueError, match="metadata needs 'architecture'"):
        A.write_weights(model, tmp_path / "x.safetensors", {}, A.BACKBONE_FORMAT)
    assert not (tmp_path / "x.safetensors").exists()
    path = A.write_weights(model, tmp_path / "b.safetensors", {"architecture": ARCH}, A.BACKBONE_FORMAT)
    with pytest.raises(ValueError, match=f"{path}: not a nanomorph segmenter"):
        A.read_weights(path, A.SEGMENTER_FORMAT)
    with pytest.raises(ValueError, match=f"{path}: not a nanomorph backbone .*'classes'"):
        A.read_weights(path, A.BACKBONE_FORMAT, required=("classes",))
    with pytest.raises(ValueError, match="old: bad contract"):
        A.contract_of({"contract": "{not json"}, "old")


def test_sha256_is_the_stores(tmp_path: Path) -> None:
    import hashlib

    from nanomorph.store import sha256_file

    path = tmp_path / "f.bin"
    path.write_bytes(b"nanomorph" * 1000)
    assert A.sha256_file is sha256_file
    assert A.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()

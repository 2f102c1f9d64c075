"""The synthetic TEM generator: images and masks in memory, the folder layout on disk, determinism,
resuming, 16-bit TIFF with pixel size, and the ``nanomorph synth`` command as users run it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from nanomorph import synth
from nanomorph.contract import read_image
from tests.fixtures.cli import nanomorph

SIZE = 64


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every data file (not the run summary / config, which hold timings)."""
    skip = {"synth.json", "config.yaml"}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="module")
def particles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("particles")
    synth.generate("particles", n_per_class=3, size=SIZE, seed=7, out_dir=out)
    return out


@pytest.mark.parametrize(("kind", "cls"), [(k, c) for k, cs in synth.CLASSES.items() for c in cs])
def test_render_sample_gives_dark_objects_and_exact_masks(kind: str, cls: str) -> None:
    image, semantic, inst = synth.render_sample(kind, cls, SIZE, np.random.default_rng(3))
    assert image.shape == semantic.shape == (SIZE, SIZE)
    assert image.dtype == np.float32 and np.isfinite(image).all() and image.min() >= 0
    assert semantic.dtype == np.uint8 and set(np.unique(semantic)) <= {0, 1}
    assert 0.0 < semantic.mean() < 0.8
    # Bright field: objects absorb, so they are darker than the film around them.
    assert image[semantic == 1].mean() < image[semantic == 0].mean()
    if kind == "particles":
        assert inst is not None and inst.dtype == np.uint16
        ids = np.unique(inst[inst > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive ids
        np.testing.assert_array_equal(inst > 0, semantic == 1)
    else:
        assert inst is None


def test_render_sample_rejects_unknown_kind_class_and_tiny_size() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        synth.render_sample("cells", "x", SIZE, rng)
    with pytest.raises(ValueError, match="bundle"):
        synth.render_sample("nanowires", "blobs", SIZE, rng)
    with pytest.raises(ValueError, match="size"):
        synth.render_sample("particles", "spheres", 16, rng)


def _spans(mask: np.ndarray) -> bool:
    """Whether one 8-connected component touches two opposite edges of the frame."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    for i in range(1, n + 1):
        comp = labels == i
        if (comp[:, 0].any() and comp[:, -1].any()) or (comp[0].any() and comp[-1].any()):
            return True
    return False


def test_network_forms_a_spanning_mesh_and_singular_does_not() -> None:
    def rate(cls: str) -> float:
        return float(
            np.mean(
                [
                    _spans(synth.render_sample("nanowires", cls, SIZE, np.random.default_rng(s))[1])
                    for s in range(8)
                ]
            )
        )

    network, singular = rate("network"), rate("singular")
    assert network >= 0.5 and network > singular


def test_classes_differ_in_morphology() -> None:
    """Counts of separate objects order the wire classes as their names say (singular < dispersed),
    and rods are elongated where spheres are round."""

    def n_objects(cls: str) -> float:
        counts = []
        for s in range(6):
            mask = synth.render_sample("nanowires", cls, 128, np.random.default_rng(s))[1]
            counts.append(ndimage.label(mask, structure=np.ones((3, 3)))[1])
        return float(np.mean(counts))

    assert n_objects("singular") < 5 < n_objects("dispersed")

    def elongation(cls: str) -> float:
        inst = synth.render_sample("particles", cls, 128, np.random.default_rng(1))[2]
        assert inst is not None
        ratios = []
        for sl, i in zip(ndimage.find_objects(inst), range(1, int(inst.max()) + 1), strict=False):
            if sl is None:
                continue
            if min(sl[0].start, sl[1].start) == 0 or max(sl[0].stop, sl[1].stop) == inst.shape[0]:
                continue  # cut by the frame
            yy, xx = np.nonzero(inst[sl] == i)
            if len(yy) < 10:
                continue
            ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx])))
            ratios.append(np.sqrt(ev[1] / max(ev[0], 1e-6)))
        return float(np.median(ratios))

    assert elongation("spheres") < 1.5 < 2.0 < elongation("rods")


def test_generate_writes_the_documented_layout(particles_dir: Path) -> None:
    root = particles_dir
    summary = json.loads((root / "synth.json").read_text())
    assert summary["args"]["seed"] == 7 and summary["classes"] == ["spheres", "rods"]
    assert summary["counts"] == {
        "classification": {"spheres": 3, "rods": 3},
        "segmentation": 6,
        "unlabeled": 6,
    }
    cls_files = {c: sorted((root / "classification" / c).glob("*.png")) for c in synth.CLASSES["particles"]}
    assert all(len(v) == 3 for v in cls_files.values())
    images = sorted(p.stem for p in (root / "segmentation" / "images").glob("*.png"))
    masks = sorted(p.stem for p in (root / "segmentation" / "masks").glob("*.png"))
    instances = sorted(p.stem for p in (root / "segmentation" / "instances").glob("*.png"))
    assert images == masks == instances == sorted(p.stem for v in cls_files.values() for p in v)
    # Names carry no class hint.
    assert not any(c in p.name for v in cls_files.values() for p in v for c in ("sphere", "rod"))
    for stem in images:
        img = np.asarray(Image.open(root / "segmentation" / "images" / f"{stem}.png"))
        mask = np.asarray(Image.open(root / "segmentation" / "masks" / f"{stem}.png"))
        inst = np.asarray(Image.open(root / "segmentation" / "instances" / f"{stem}.png"))
        assert img.dtype == np.uint8 and img.shape == mask.shape == inst.shape == (SIZE, SIZE)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
        assert inst.dtype == np.uint16 and inst.max() >= 1
        np.testing.assert_array_equal(inst > 0, mask == 1)
        assert img[mask == 1].mean() < img[mask == 0].mean()
    # The segmentation images are the classification files (hard links or copies) ...
    for v in cls_files.values():
        for p in v:
            assert (root / "segmentation" / "images" / p.name).read_bytes() == p.read_bytes()
    # ... but the unlabeled pool is separate renders, so pretraining never sees a labeled image.
    unlabeled = sorted((root / "unlabeled").glob("*.png"))
    assert len(unlabeled) == 6
    labeled_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for v in cls_files.values() for p in v}
    assert labeled_hashes.isdisjoint(hashlib.sha256(p.read_bytes()).hexdigest() for p in unlabeled)
    sheet = Image.open(root / "contact_sheet.png")
    assert sheet.height >= 2 * 64  # one labelled row per class


def test_same_seed_same_bytes_other_seed_other_bytes(particles_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.generate("particles", n_per_class=3, size=SIZE, seed=7, out_dir=again)
    first, second = _tree(particles_dir), _tree(again)
    assert first.keys() == second.keys() and first == second
    other = tmp_path / "other"
    synth.generate("particles", n_per_class=3, size=SIZE, seed=8, out_dir=other)
    third = _tree(other)
    unl = [k for k in first if k.startswith("unlabeled/")]
    assert all(first[k] != third[k] for k in unl)
    assert set(first) != set(third)  # labeled stems depend on the seed too


def test_rerun_skips_work_and_resumes_after_a_lost_file(tmp_path: Path) -> None:
    out = tmp_path / "nw"
    first = synth.generate("nanowires", n_per_class=1, size=SIZE, seed=1, out_dir=out, contact_sheet=False)
    assert first["written"] == 10 and first["skipped"] == 0
    before = _tree(out)
    again = synth.generate("nanowires", n_per_class=1, size=SIZE, seed=1, out_dir=out, contact_sheet=False)
    assert again["written"] == 0 and again["skipped"] == 10
    # An interrupted run: one mask and one unlabeled image missing -> only those samples are redone.
    mask = next((out / "segmentation" / "masks").glob("*.png"))
    mask.unlink()
    (out / "unlabeled" / "u_000003.png").unlink()
    resumed = synth.generate("nanowires", n_per_class=1, size=SIZE, seed=1, out_dir=out, contact_sheet=False)
    assert resumed["written"] == 2 and resumed["skipped"] == 8
    assert _tree(out) == before
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob(".s_*"))


def test_other_settings_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    synth.generate("particles", n_per_class=1, size=SIZE, seed=1, out_dir=tmp_path, contact_sheet=False)
    with pytest.raises(ValueError, match=r"synth\.json.*seed 1 -> 2"):
        synth.generate("particles", n_per_class=1, size=SIZE, seed=2, out_dir=tmp_path)


def test_tiff16_keeps_raw_counts_and_pixel_size(tmp_path: Path) -> None:
    summary = synth.generate(
        "particles", n_per_class=1, size=SIZE, seed=2, out_dir=tmp_path, fmt="tiff16", pixel_size_nm=0.7
    )
    assert summary["args"]["format"] == "tiff16"
    tifs = sorted(tmp_path.rglob("*.tif"))
    assert len(tifs) == 2 + 2 + 2  # classification, its segmentation links, unlabeled
    assert sorted(p.suffix for p in (tmp_path / "segmentation" / "masks").iterdir()) == [".png", ".png"]
    path = tmp_path / "unlabeled" / "u_000000.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        assert page.dtype == np.uint16
        assert tif.imagej_metadata is not None and tif.imagej_metadata["unit"] == "nm"
        num, den = page.tags["XResolution"].value
        assert den / num == pytest.approx(0.7)
        raw = page.asarray()
    image, meta = read_image(path)
    assert image.dtype == np.float32 and image.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(image, raw.astype(np.float32))
    assert meta.dtype == "uint16" and raw.max() > 255  # real 16-bit counts, not 8-bit data
    # The contract reader recovers the pixel size from the ImageJ metadata.
    assert meta.pixel_size == pytest.approx(0.7) and meta.pixel_unit == "nm"


def test_cli_writes_data_set_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "data"
    cmd = ["synth", "--out", str(out), "--kind", "particles", "--n-per-class", "1"]
    cmd += ["--size", "48", "--seed", "3"]
    done = nanomorph(*cmd)
    assert done.returncode == 0, done.stderr
    assert "2 labeled" in done.stdout and "written 4" in done.stdout
    assert (out / "contact_sheet.png").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "synth.json").read_text())["args"]["size"] == 48
    assert len(list((out / "segmentation" / "instances").glob("*.png"))) == 2
    rerun = nanomorph(*cmd)
    assert rerun.returncode == 0 and "written 0, skipped 4" in rerun.stdout
    bad = nanomorph(*cmd[:-1], "4")
    assert bad.returncode == 2
    assert "synth.json" in bad.stderr and "Traceback" not in bad.stderr
    tiny = nanomorph("synth", "--out", tmp_path / "t", "--size", "8")
    assert tiny.returncode == 2 and "size" in tiny.stderr and "Traceback" not in tiny.stderr
    no_out = nanomorph("synth", "--kind", "particles")
    assert no_out.returncode == 2 and "--out is required" in no_out.stderr

"""training.runs: the one run-folder policy (skip finished, resume interrupted, refuse changed
settings with the diff, --force starts over), and the commands that follow it."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import runs
from training.runs import Action, RunState, SettingsChanged, decide

SETTINGS = {"seed": 3, "lr": 0.001, "mode": "linear"}


def test_empty_folder_starts(tmp_path: Path) -> None:
    assert decide(tmp_path, RunState(), SETTINGS) is Action.START
    assert decide(tmp_path, RunState(), SETTINGS, resume=False) is Action.START


def test_finished_run_with_the_same_settings_is_skipped(tmp_path: Path) -> None:
    state = RunState(finished=True, started=True, saved=dict(SETTINGS))
    assert decide(tmp_path, state, SETTINGS) is Action.SKIP
    # A YAML list read back equals the tuple it was written from; 1e-3 == 0.001.
    listed = RunState(finished=True, saved={"sizes": [1, 2], "lr": 1e-3})
    assert decide(tmp_path, listed, {"sizes": (1, 2), "lr": 0.001}) is Action.SKIP


def test_settings_older_runs_lack_compare_as_their_value_then(tmp_path: Path) -> None:
    old = RunState(finished=True, saved=dict(SETTINGS))  # saved before "ratio" existed
    then = {"ratio": 1.333, "unused": 7}  # a key this run does not have is not compared
    assert decide(tmp_path, old, {**SETTINGS, "ratio": 1.333}, before_they_existed=then) is Action.SKIP
    with pytest.raises(SettingsChanged, match=r"ratio: 1\.333 -> 1\.0"):
        decide(tmp_path, old, {**SETTINGS, "ratio": 1.0}, before_they_existed=then)
    with pytest.raises(SettingsChanged, match=r"ratio: None -> 1\.333"):  # without it: unknown then
        decide(tmp_path, old, {**SETTINGS, "ratio": 1.333})


def test_interrupted_run_is_resumed(tmp_path: Path) -> None:
    state = RunState(started=True, saved=dict(SETTINGS), progress="epoch 2/4")
    assert decide(tmp_path, state, SETTINGS) is Action.RESUME
    assert decide(tmp_path, state, SETTINGS, resume=True) is Action.RESUME
    # A command whose resume must be asked for refuses without --resume, and says how to go on.
    with pytest.raises(ValueError, match=r"unfinished run \(epoch 2/4\); pass --resume .* --force"):
        decide(tmp_path, state, SETTINGS, resume=False)


def test_changed_settings_are_refused_with_the_diff(tmp_path: Path) -> None:
    state = RunState(finished=True, saved=dict(SETTINGS))
    changed = {**SETTINGS, "seed": 4, "mode": "finetune"}
    with pytest.raises(SettingsChanged) as err:
        decide(tmp_path, state, changed)
    assert err.value.diff == {"mode": ("linear", "finetune"), "seed": (3, 4)}
    message = str(err.value)
    assert str(tmp_path) in message and "different finished run" in message
    assert "mode: 'linear' -> 'finetune'" in message and "seed: 3 -> 4" in message and "lr" not in message
    assert "--force" in message
    # Only the keys that change the result count; the flag is spelled as the command spells it.
    assert decide(tmp_path, state, {**SETTINGS, "device": "cpu"}, keys=SETTINGS) is Action.SKIP
    unfinished = RunState(started=True, saved=dict(SETTINGS))
    with pytest.raises(SettingsChanged, match=r"different unfinished run .*pass --force \(--overwrite\)"):
        decide(tmp_path, unfinished, changed, force_flag="--force (--overwrite)")


def test_force_starts_over_whatever_is_there(tmp_path: Path) -> None:
    for state in (
        RunState(finished=True, saved=dict(SETTINGS)),
        RunState(started=True, saved={"seed": 99}),
        RunState(started=True),
    ):
        assert decide(tmp_path, state, SETTINGS, force=True, resume=False) is Action.START


def test_settings_diff_and_its_description() -> None:
    diff = runs.settings_diff({"a": 1, "b": {"x": 1, "y": 2}}, {"b": {"y": 2, "x": 1}, "c": None, "a": 2})
    assert diff == {"a": (1, 2)}
    assert runs.describe_diff({"a": (1, 2), "s": ("x", None)}) == "a: 1 -> 2; s: 'x' -> None"


def test_finetune_cls_follows_the_policy(tmp_path: Path) -> None:
    """finetune-cls keeps its config.yaml first and metrics.json last: the policy reads both."""
    from nanomorph.config import save_resolved
    from training.finetune_cls import _run_action

    out = tmp_path / "cls"
    cfg = {"data": "d", "seed": 0, "mode": "linear", "out": str(out), "device": "cpu", "force": False}
    assert _run_action(out, cfg, force=False) is Action.START
    save_resolved(cfg, out)  # stopped before metrics.json: it starts afresh, whatever its settings were
    assert _run_action(out, {**cfg, "seed": 5}, force=False) is Action.START
    (out / "metrics.json").write_text("{}")
    assert _run_action(out, cfg, force=False) is Action.SKIP
    assert _run_action(out, {**cfg, "device": "cuda"}, force=False) is Action.SKIP  # not a result setting
    with pytest.raises(SettingsChanged, match="different finished run .*seed: 0 -> 1"):
        _run_action(out, {**cfg, "seed": 1}, force=False)
    assert _run_action(out, {**cfg, "seed": 1}, force=True) is Action.START


def test_pretrain_follows_the_policy(tmp_path: Path) -> None:
    """pretrain: checkpoint.pt holds the settings and the epoch; its resume is asked for (--resume)."""
    import argparse
    import json

    from training.pretrain import CHECKPOINT_FORMAT, _existing_run
    from training.runio import save_checkpoint

    out = tmp_path / "ssl"
    cfg = {"data": "d", "method": "simclr", "backbone": "resnet18", "epochs": 4, "seed": 0}

    def ask(resume: bool = False, force: bool = False, **changed: object) -> Action:
        args = argparse.Namespace(resume=resume, force=force)
        return _existing_run(out, {**cfg, **changed}, args)[0]

    assert ask() is Action.START
    save_checkpoint({"format": CHECKPOINT_FORMAT, "run": json.dumps(cfg), "epoch": 2}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"unfinished run \(epoch 2/4\); pass --resume"):
        ask()
    assert ask(resume=True) is Action.RESUME
    with pytest.raises(SettingsChanged, match="method: 'simclr' -> 'barlowtwins'"):
        ask(resume=True, method="barlowtwins")
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert ask(force=True, method="barlowtwins") is Action.START
    assert not (out / "metrics.jsonl").exists()  # a forced run starts a fresh log
    save_checkpoint({"format": CHECKPOINT_FORMAT, "run": json.dumps(cfg), "epoch": 4}, out / "checkpoint.pt")
    (out / "backbone.safetensors").write_bytes(b"")
    assert ask() is Action.SKIP


def test_finetune_seg_follows_the_policy(tmp_path: Path) -> None:
    """finetune-seg: metrics.json (and the model) mark a finished run, checkpoint.pt an interrupted
    one, which resumes by itself; --overwrite is the old spelling of --force."""
    import json

    from training.finetune_seg import _RESULT_KEYS, _config, _existing_run, _fingerprint
    from training.runio import save_checkpoint

    out = tmp_path / "seg"
    cfg = _config({"data": "d", "out": out, "classes": "background,wire", "instances": "off"})
    assert _existing_run(out, cfg).action is Action.START
    save_checkpoint({"fingerprint": _fingerprint(cfg), "step": 1}, out / "checkpoint.pt")
    existing = _existing_run(out, cfg)
    assert existing.action is Action.RESUME and existing.checkpoint is not None
    with pytest.raises(SettingsChanged, match=r"different unfinished run \(changed: seed: 0 -> 4\)"):
        _existing_run(out, {**cfg, "seed": 4})
    (out / "metrics.json").write_text(json.dumps({"config": {k: cfg.get(k) for k in _RESULT_KEYS}}))
    assert _existing_run(out, cfg).action is Action.RESUME  # finished training, but no model file yet
    (out / "segmenter.safetensors").write_bytes(b"")
    assert _existing_run(out, cfg).action is Action.SKIP
    with pytest.raises(SettingsChanged, match=r"different finished run .*--overwrite"):
        _existing_run(out, {**cfg, "seed": 4})
    forced = _config({"data": "d", "out": out, "overwrite": True, "seed": 4})
    assert forced["force"] and "overwrite" not in forced
    assert _existing_run(out, forced).action is Action.START

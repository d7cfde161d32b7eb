"""Checkpoint folders: manifest, damage found before resuming, `auto` falls back to the last good one,
a resumed run must be the same run, and a failed write keeps the previous checkpoint."""

import errno
import json

import pytest
import torch

from rlhf_system import checkpoint
from rlhf_system.config import RunConfig
from rlhf_system.errors import RunFailure


def _save(run_dir, step, cfg=None):
    with checkpoint.saving(run_dir, step) as tmp:
        (tmp / "engine").mkdir()
        torch.save({"w": torch.arange(1000.0) * step}, tmp / "engine" / "model_states.pt")
        torch.save({"rng": step}, tmp / "rng_rank0.pt")
        state = {"step": step, **(checkpoint.identity(cfg) if cfg else {})}
        return checkpoint.commit(tmp, state, keep_last=3)


def test_manifest_lists_every_file_and_a_good_checkpoint_has_no_damage(tmp_path):
    path = _save(tmp_path, 1)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert set(manifest) == {"engine/model_states.pt", "rng_rank0.pt"}
    assert manifest["rng_rank0.pt"] == (path / "rng_rank0.pt").stat().st_size
    assert checkpoint.damage(path) is None


@pytest.mark.parametrize("harm, needle", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "bytes, "),
    (lambda f: f.unlink(), "is missing"),
])
def test_auto_skips_a_damaged_latest_checkpoint(tmp_path, harm, needle):
    good, bad = _save(tmp_path, 1), _save(tmp_path, 2)
    harm(bad / "engine" / "model_states.pt")
    assert needle in checkpoint.damage(bad)
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.resolve_resume(str(bad), tmp_path)


def test_without_a_manifest_a_torch_file_must_still_be_a_zip_archive(tmp_path):
    path = _save(tmp_path, 1)
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.damage(path) is None
    (path / "rng_rank0.pt").write_bytes(b"\0" * 64)
    assert "not a torch checkpoint file" in checkpoint.damage(path)


def _cfg(tmp_path, model, **over) -> RunConfig:
    cfg = RunConfig(mode="sft", run_dir=str(tmp_path))
    cfg.model.path = str(model)
    for dotted, value in over.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def test_resume_must_be_the_same_run(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    path = _save(tmp_path / "run", 1, _cfg(tmp_path / "run", model))
    # what a resumed run may change: its length, logging, saving, deadlines
    checkpoint.check_same_run(path, _cfg(tmp_path / "run", model, train__max_steps=99, checkpoint__save_every=5,
                                         logging__console=False, placement__call_timeout_s=5.0))
    with pytest.raises(checkpoint.CheckpointError, match=r"another config: optim.lr: 1e-05 -> 0.001"):
        checkpoint.check_same_run(path, _cfg(tmp_path / "run", model, optim__lr=1e-3))
    checkpoint.check_same_run(path, _cfg(tmp_path / "run", model, optim__lr=1e-3, checkpoint__allow_config_change=True))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2}))
    with pytest.raises(checkpoint.CheckpointError, match=r"another shape .*hidden_size 64 -> 32"):
        checkpoint.check_same_run(path, _cfg(tmp_path / "run", model, checkpoint__allow_config_change=True))


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_path_and_free_space(tmp_path):
    good = _save(tmp_path, 1)
    with pytest.raises(RunFailure, match=r"step_00000002.tmp: write failed \(No space left on device\); \d+ MiB free "
                                         r".*step_00000001 is intact"):
        with checkpoint.saving(tmp_path, 2) as tmp:
            (tmp / "partial").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not (tmp_path / "checkpoints" / "step_00000002.tmp").exists()  # the partial save is gone
    assert checkpoint.resolve_resume("auto", tmp_path) == good and checkpoint.damage(good) is None
    with pytest.raises(ValueError, match="not a disk"):  # other errors pass through unchanged
        with checkpoint.saving(tmp_path, 3):
            raise ValueError("not a disk problem")


@pytest.mark.parametrize("harm, needle", [
    (lambda p: (p / "run_state.json").write_text('{"step": 2, "conf'), "run_state.json is not valid JSON"),
    (lambda p: (p / "run_state.json").write_text("[]"), "has no step number"),
    (lambda p: (p / checkpoint.MANIFEST).unlink(), "manifest.json is missing"),
    (lambda p: (p / "engine" / "model_states.pt").unlink(), "model_states.pt is missing"),
])
def test_damage_inside_a_step_is_one_line_naming_the_file(tmp_path, harm, needle):
    model = tmp_path / "model"
    model.mkdir()
    path = _save(tmp_path / "run", 2, _cfg(tmp_path / "run", model))
    harm(path)
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint.resume={path}: damaged: .*{needle}"):
        checkpoint.resolve_resume(str(path), tmp_path / "run")
    assert checkpoint.resolve_resume("auto", tmp_path / "run") is None  # auto never takes it


def test_a_folder_of_unrelated_files_or_a_file_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for name in ("trainer_state.json", "pytorch_model.bin", "notes.txt"):
        (other / name).write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match=r"is not a checkpoint of this project \(no run_state.json or "
                       r"manifest.json; it holds notes.txt, pytorch_model.bin, trainer_state.json\)"):
        checkpoint.resolve_resume(str(other), tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointError, match="is a file, not a checkpoint folder"):
        checkpoint.resolve_resume(str(other / "notes.txt"), tmp_path / "run")

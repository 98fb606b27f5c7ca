"""Checkpoint markers that vouch for the content: the marker of a complete checkpoint records every file's size and
sha256; a resume checks the newest complete checkpoint against it and falls back past a damaged one (truncated,
garbled, missing file), saying which file, or stops when no intact one is left. (Training runs that resume from a
damaged checkpoint: tests/test_train.py.)"""
import hashlib
import json

import pytest

from ftlib import checkpoints
from ftlib.errors import UserError


def fake_checkpoint(folder, step, complete=True):
    """A checkpoint folder shaped like a ZeRO one (files at the top and in global_step<N>/)."""
    cp = folder / f"checkpoint-{step}"
    (cp / f"global_step{step}").mkdir(parents=True)
    (cp / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 40 + bytes([step]))
    (cp / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x01\x02" * 3000)
    (cp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints.mark_complete(cp, step)
    return cp


def garble(path, at=None):
    """Flip one byte: same size, different content."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def test_marker_records_each_files_size_and_sha256(tmp_path):
    cp = fake_checkpoint(tmp_path, 4)
    marker = json.loads((cp / checkpoints.MARKER).read_text())
    assert marker["step"] == 4
    files = {p.relative_to(cp).as_posix(): p for p in cp.rglob("*") if p.is_file() and p.name != checkpoints.MARKER}
    assert set(marker["files"]) == set(files) == {"adapter_model.safetensors", "trainer_state.json",
                                                   "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for rel, p in files.items():
        assert marker["files"][rel] == {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    assert checkpoints.verify(cp) is None


def test_a_truncated_file_is_named_with_both_sizes(tmp_path):
    cp = fake_checkpoint(tmp_path, 4)
    truncate(cp / "adapter_model.safetensors")
    assert checkpoints.verify(cp) == ("adapter_model.safetensors is 100 bytes, 10,241 when it was saved "
                                      "(truncated)")


def test_a_garbled_byte_of_the_same_size_is_found(tmp_path):
    cp = fake_checkpoint(tmp_path, 4)
    garble(cp / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoints.verify(cp) == ("global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match the "
                                      "sha256 recorded when it was saved (same size, different content)")


def test_a_missing_file_and_several_bad_ones(tmp_path):
    cp = fake_checkpoint(tmp_path, 4)
    (cp / "trainer_state.json").unlink()
    garble(cp / "adapter_model.safetensors")
    assert checkpoints.verify(cp) == ("adapter_model.safetensors does not match the sha256 recorded when it was "
                                      "saved (same size, different content) (and 1 more damaged file)")
    (cp / "adapter_model.safetensors").unlink()
    assert checkpoints.verify(cp).startswith("adapter_model.safetensors is missing (and 1 more")


def test_an_unreadable_marker_is_damage_and_an_old_marker_is_trusted(tmp_path):
    cp = fake_checkpoint(tmp_path, 4)
    (cp / checkpoints.MARKER).write_text('{"step": 4, "files": {"adapter_mod')  # cut short
    assert checkpoints.verify(cp) == "its COMPLETE marker is unreadable"
    (cp / checkpoints.MARKER).write_text("step 4\n")  # written before markers listed files: nothing to check
    assert checkpoints.verify(cp) is None


def test_resume_falls_back_past_damaged_checkpoints_and_moves_them_aside(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)  # a save cut short: not a candidate (remove_incomplete's job)
    truncate(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    garble(tmp_path / "checkpoint-4" / "trainer_state.json", at=3)

    resume, notes = checkpoints.resume_point(tmp_path)
    assert resume == tmp_path / "checkpoint-2"
    assert notes == [
        f"{tmp_path / 'checkpoint-6'} is damaged: adapter_model.safetensors is 100 bytes, 10,241 when it was saved "
        f"(truncated); moved to checkpoint-6.damaged, resuming from checkpoint-2",
        f"{tmp_path / 'checkpoint-4'} is damaged: trainer_state.json does not match the sha256 recorded when it was "
        f"saved (same size, different content); moved to checkpoint-4.damaged, resuming from checkpoint-2"]
    assert (tmp_path / "checkpoint-6.damaged" / "adapter_model.safetensors").stat().st_size == 100
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    assert checkpoints.latest_complete(tmp_path) == resume  # what every other rank then finds by itself
    assert checkpoints.rotate(tmp_path, keep=1) == []  # a moved-aside checkpoint is never rotated away

    # The same step damaged again later: the newer damaged copy replaces the older one.
    fake_checkpoint(tmp_path, 6)
    garble(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert checkpoints.resume_point(tmp_path)[0] == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-6.damaged" / "adapter_model.safetensors").stat().st_size == 10_241


def test_no_intact_checkpoint_stops_with_the_damage_and_touches_nothing(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    truncate(tmp_path / "checkpoint-4" / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", keep=0)
    garble(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    with pytest.raises(UserError) as stop:
        checkpoints.resume_point(tmp_path)
    assert str(stop.value) == (
        f"{tmp_path / 'checkpoint-4'} is damaged: global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt is 0 bytes, "
        f"6,000 when it was saved (truncated); no intact earlier checkpoint to resume from (checkpoint-2 is damaged "
        f"too: adapter_model.safetensors does not match the sha256 recorded when it was saved (same size, different "
        f"content)); not training on it: restore the files, or delete {tmp_path} to train from the start")
    assert "\n" not in str(stop.value)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


def test_nothing_to_resume(tmp_path):
    assert checkpoints.resume_point(tmp_path / "missing") == (None, [])
    fake_checkpoint(tmp_path, 2, complete=False)
    assert checkpoints.resume_point(tmp_path) == (None, [])

"""tune/state.py: the whole copy of Tune's driver state that `--resume` restores (no Ray cluster needed)."""
from __future__ import annotations

from pathlib import Path

from modelworks.tune.state import MIRROR_DIR, mirror, restore_mirror

S1, S2 = "2026-11-28_19-02-06", "2026-11-28_19-05-44"


def _staging(root: Path) -> Path:
    st = root / "staging"
    (st / "abc_00000" / "checkpoint_000000").mkdir(parents=True)
    (st / f"experiment_state-{S1}.json").write_text('{"trial_data": [1, 2, 3, 4]}')
    (st / f"basic-variant-state-{S1}.json").write_bytes(b"\x80\x05searcher")
    (st / f"tmp-basic-variant-state-{S1}.json").write_text("half")  # Tune's own atomic-save temp file
    (st / "abc_00000" / "progress.csv").write_text("epoch,val_accuracy\n1,0.9\n")
    (st / "abc_00000" / "checkpoint_000000" / "model.safetensors").write_text("big")
    return st


def test_mirror_copies_state_and_trial_logs_but_not_checkpoints_or_temp_files(tmp_path):
    st, search = _staging(tmp_path), tmp_path / "search"
    mirror(st, search / MIRROR_DIR)
    m = search / MIRROR_DIR
    assert (m / f"experiment_state-{S1}.json").read_text() == '{"trial_data": [1, 2, 3, 4]}'
    assert (m / "abc_00000" / "progress.csv").is_file()
    assert not (m / f"tmp-basic-variant-state-{S1}.json").exists()
    assert not (m / "abc_00000" / "checkpoint_000000").exists()
    # A second copy replaces the first whole: a file gone from staging is gone from the copy.
    (st / "abc_00000" / "progress.csv").unlink()
    mirror(st, m)
    assert not (m / "abc_00000" / "progress.csv").exists()
    assert sorted(p.name for p in search.iterdir()) == [MIRROR_DIR]  # no .new/.old left behind


def test_restore_puts_the_whole_copy_over_a_torn_one_and_sets_newer_sessions_aside(tmp_path):
    st, search = _staging(tmp_path), tmp_path / "search"
    mirror(st, search / MIRROR_DIR)
    # What a kill during Tune's copy leaves: a cut trial list, an empty searcher state, and a state file of
    # a later driver that died before modelworks copied anything of it.
    (search / f"experiment_state-{S1}.json").write_text('{"trial_da')
    (search / f"basic-variant-state-{S1}.json").write_bytes(b"")
    (search / f"experiment_state-{S2}.json").write_text('{"trial_data": [1]}')
    (search / "abc_00000" / "checkpoint_000000").mkdir(parents=True)
    (search / "abc_00000" / "checkpoint_000000" / "model.safetensors").write_text("kept")

    assert restore_mirror(search) is True
    assert (search / f"experiment_state-{S1}.json").read_text() == '{"trial_data": [1, 2, 3, 4]}'
    assert (search / f"basic-variant-state-{S1}.json").read_bytes() == b"\x80\x05searcher"
    assert not (search / f"experiment_state-{S2}.json").exists()
    assert (search / f"{MIRROR_DIR}.stale" / f"experiment_state-{S2}.json").is_file()  # set aside, not deleted
    assert (search / "abc_00000" / "checkpoint_000000" / "model.safetensors").read_text() == "kept"
    assert not list(search.rglob("*.mw-tmp"))


def test_restore_uses_the_previous_copy_when_killed_between_the_renames(tmp_path):
    st, search = _staging(tmp_path), tmp_path / "search"
    mirror(st, search / MIRROR_DIR)
    (search / MIRROR_DIR).rename(search / f"{MIRROR_DIR}.old")
    (search / f"{MIRROR_DIR}.new").mkdir()  # half-written: never used
    (search / f"{MIRROR_DIR}.new" / f"experiment_state-{S1}.json").write_text("{")
    assert restore_mirror(search) is True
    assert (search / f"experiment_state-{S1}.json").read_text() == '{"trial_data": [1, 2, 3, 4]}'


def test_no_copy_no_change(tmp_path):
    search = tmp_path / "search"
    search.mkdir()
    (search / f"experiment_state-{S1}.json").write_text("as Tune left it")
    assert restore_mirror(search) is False
    assert (search / f"experiment_state-{S1}.json").read_text() == "as Tune left it"

"""Atomic writes under faults: a full disk (a real file-size limit) or a kill mid-write leaves the previous file whole."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest
import torch

from callbacks.checkpoint_io import AtomicCheckpointIO

from tests.paths import ROOT


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_keeps_the_previous_file_and_names_it(tmp_path):
    # RLIMIT_FSIZE is a full disk any user can make: writes past it fail with EFBIG (Python ignores SIGXFSZ).
    target = tmp_path / "result.json"
    target.write_text("previous")
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from robustx.io.files import atomic_write
        from callbacks.checkpoint_io import AtomicCheckpointIO
        from robustx.io.export import save_model
        from robustx.models import SmallCNN
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        for write in (lambda: atomic_write({str(target)!r}, "x" * 100_000),
                      lambda: AtomicCheckpointIO().save_checkpoint({{"w": torch.zeros(100_000)}}, {str(tmp_path / 'last.ckpt')!r}),
                      lambda: save_model(SmallCNN(), {str(tmp_path / 'model.safetensors')!r},
                                         model_config={{"_target_": "robustx.models.SmallCNN"}})):
            try:
                write()
            except OSError as err:
                print(err.errno, err.filename)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == f"{errno.EFBIG} {target}" and out[1] == f"{errno.EFBIG} {tmp_path / 'last.ckpt'}"
    assert out[2] == f"{errno.EFBIG} {tmp_path / 'model.safetensors'}"
    assert target.read_text() == "previous" and not (tmp_path / "last.ckpt").exists() and _leftovers(tmp_path) == []
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError])
def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    import builtins

    real_open = builtins.open

    class HalfThenDie:  # half the bytes reach the disk, then the process is stopped
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(bytes(data)[: len(data) // 2])
            self.fh.flush()
            raise fault

    def opener(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return HalfThenDie(fh) if "w" in mode and str(file).endswith(".tmp") else fh

    monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(fault):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == good and _leftovers(path.parent) == []
    assert torch.load(path, weights_only=True)["step"] == 1


def test_checkpoints_are_written_beside_their_target_not_in_tmp(tmp_path, monkeypatch):
    # Lightning's own save moves a file from the system temp folder (a copy across file systems).
    import robustx.io.files as files

    dirs = []
    real = files.tempfile.mkstemp

    def spy(*args, **kwargs):
        dirs.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", spy)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "a" / "last.ckpt")
    assert dirs == [tmp_path / "a"]
    assert torch.equal(torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["w"], torch.ones(2))

"""`<entry>.py --help` of every entry point, as a subprocess (the configs themselves: tests/unit/test_configs.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.paths import CONF


@pytest.mark.parametrize("entry, own, foreign", [
    ("train", ["method:", "optim:", "trainer:", "+experiment:", "demo ", "seed: 1234", "# Resume from a Lightning checkpoint"], []),
    ("eval", ["data:", "ara:", "protocol: paper", "# override the protocol's value", "cross_check:"], ["method:", "optim:", "trainer:", "+experiment:"]),
    ("explain", ["rho: 0.1", "# RMSE budget", "targets:"], ["data:", "method:", "trainer:"]),
    ("study", ["data:", "study:", "manipulation:", "# the first N correctly classified"], ["method:", "trainer:", "+experiment:"]),
])
def test_help_lists_own_groups_and_commented_keys(entry, own, foreign):
    """`<entry>.py --help`: its own config groups with their options, its keys with their comments, nothing else."""
    root = CONF.parent
    proc = subprocess.run([sys.executable, str(root / f"{entry}.py"), "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith(f"{entry}.py: ") and "Usage:" in text
    for s in own:
        assert s in text, (s, text[:3000])
    groups = text.split("Config groups", 1)[-1].split("Keys (", 1)[0]
    for s in foreign:
        assert f"\n  {s}" not in groups, (s, groups)
    assert "== Config ==" not in text and "Powered by Hydra" not in text  # not Hydra's generic dump

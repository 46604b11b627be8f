"""The ``samadapt`` command turns on torch's transparent huge pages for CPU tensors unless the environment says no."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = "import samadapt.cli, torch, os; torch.zeros(1 << 22); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_cli_sets_huge_pages_unless_told_not_to(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected

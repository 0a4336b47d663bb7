"""Every benchmark starts the way the README runs it (`python bench/<name>.py`), imports and all.

Run from its own folder, a script has `bench/` first on its path, where `bench/serving.py` shadows the
`serving` package: `bench/tune_round.py` failed that way, unnoticed, because nothing ran it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in {"__init__.py", "rules.py"})


def test_every_benchmark_is_covered() -> None:
    assert {"adaptation.py", "serving.py", "tune_round.py", "training_step.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_starts(script: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout

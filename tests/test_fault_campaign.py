"""The fault campaign (``benchmarks/fault_campaign.py``) with a handful of faults: a disk that
fills, a flipped byte, two writers at once; each must be survived, the flip detected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).resolve().parent.parent / "benchmarks" / "fault_campaign.py"


@pytest.mark.slow
def test_a_small_fault_campaign_survives_every_fault(tmp_path) -> None:
    out = tmp_path / "campaign.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, str(CAMPAIGN), "--faults", "3", "--seed", "1", "--out", str(out),
         "--only", "disk_full", "bitflip", "two_writers"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["faults_tried"] == 3 and result["survived"] == 3
    assert result["lost_or_mixed"] == 0
    by = result["by_fault"]
    assert by["disk_full"] == {"tried": 1, "survived": 1}
    assert by["two_writers"] == {"tried": 1, "survived": 1}
    records = {r["fault"]: r for r in result["records"]}
    assert records["two_writers"]["one_refused"]
    assert records["disk_full"]["one_line"]
    flip = records["bitflip"]
    assert flip["flipped"] is None or flip["detected"]

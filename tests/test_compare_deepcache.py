"""tools/compare_deepcache.py's statistics and its command line, without running a model.

The tool's result decides whether diffspeed's ``deepcache`` is "no slower" than the DeepCache package; these
check that the paired-ratio interval is computed as documented (geometric mean, Student's t on the logarithms)
and that bad ``--rounds`` input is refused with one line naming the field.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "compare_deepcache.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compare_deepcache", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_is_the_geometric_mean_with_a_t_interval(tool):
    ratios = [0.9, 1.0, 1.1, 0.95, 1.05]
    got = tool.ratio_interval(ratios)
    logs = [math.log(r) for r in ratios]
    assert got["geometric_mean"] == pytest.approx(math.exp(sum(logs) / 5))
    lo, hi = got["interval"]
    assert lo < got["geometric_mean"] < hi
    # t(0.975, 4) = 2.776: the half-width on the log scale
    sd = (sum((x - sum(logs) / 5) ** 2 for x in logs) / 4) ** 0.5
    assert math.log(hi) - math.log(got["geometric_mean"]) == pytest.approx(2.7764 * sd / 5 ** 0.5, rel=1e-3)
    assert got["rounds"] == 5 and got["level"] == 0.95


def test_interval_narrows_with_rounds_and_is_symmetric_in_logs(tool):
    few = tool.ratio_interval([0.9, 1.1, 1.0])
    many = tool.ratio_interval([0.9, 1.1, 1.0] * 6)
    assert many["interval"][1] - many["interval"][0] < few["interval"][1] - few["interval"][0]
    lo, hi = many["interval"]
    centre = math.log(many["geometric_mean"])
    assert centre - math.log(lo) == pytest.approx(math.log(hi) - centre)
    assert tool.ratio_interval([1.2])["interval"] is None  # one round: no spread to estimate


def test_bad_rounds_is_one_line_naming_the_field():
    out = subprocess.run([sys.executable, str(TOOL), "--sizes", "128", "256", "--rounds", "3", "4", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--rounds" in out.stderr and "Traceback" not in out.stderr

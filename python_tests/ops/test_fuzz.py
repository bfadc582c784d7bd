"""Runs each property of ``fuzz_ops.py`` in a child process, so that a crash (a signal)
fails its test with the signal named instead of killing the test run.

Budget: ``SSS_FUZZ_EXAMPLES`` examples per property (default 150, deterministic);
e.g. ``SSS_FUZZ_EXAMPLES=5000 python -m pytest python_tests/test_fuzz.py`` for a long run.
Each run prints its census (examples compared with the reference, refused alike, empty), and
the properties that compare must compare at least two thirds of the budget: at 150, 100
non-empty valid calls that reach the kernels.
"""

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sss_ext

pytestmark = [pytest.mark.fuzz, pytest.mark.requires("hypothesis")]
PROPERTIES_FILE = Path(__file__).with_name("fuzz_ops.py")
PROPERTIES = [node.name for node in ast.parse(PROPERTIES_FILE.read_text()).body
              if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


def test_there_are_properties():
    assert len(PROPERTIES) >= 4


EXAMPLES = int(os.environ.get("SSS_FUZZ_EXAMPLES", "150"))
COMPARING = ("test_verify_equals_reference_or_both_refuse", "test_sample_equals_reference_or_both_refuse",
             "test_warp_probs_is_a_distribution_or_refuses")


def run_property(path: Path, name: str, census: Path | None = None) -> tuple[int, str]:
    """Exit status (negative: killed by that signal) and the output tail of one property's run."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", f"{path}::{name}"]
    # The child imports the very sss_ext this process imported (e.g. a sanitizer build elsewhere).
    package_root = str(Path(sss_ext.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH")))))
    if census is not None:
        env["SSS_FUZZ_CENSUS"] = str(census)
    child = subprocess.run(command, cwd=PROPERTIES_FILE.parent, env=env, capture_output=True, text=True, timeout=1800)
    return child.returncode, (child.stdout + child.stderr)[-6000:]


@pytest.mark.parametrize("name", PROPERTIES)
def test_property_in_child_process(name, tmp_path):
    census_file = tmp_path / "census.txt"
    returncode, output = run_property(PROPERTIES_FILE, name, census_file)
    if returncode < 0:
        pytest.fail(f"{name} crashed the process with {signal.Signals(-returncode).name}:\n{output}")
    assert returncode == 0, f"{name} failed (exit {returncode}):\n{output}"
    outcomes = census_file.read_text().split() if census_file.exists() else []
    census = {kind: outcomes.count(kind) for kind in ("compared", "refused", "empty")}
    print(f"\n{name}: {EXAMPLES} examples, census {census}")
    if name in COMPARING:
        assert census["compared"] >= 2 * EXAMPLES // 3, f"{name}: too few calls reached the kernels: {census}"


def test_a_crash_is_reported_not_fatal(tmp_path):
    crashing = tmp_path / "crashing_property.py"
    crashing.write_text("import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    returncode, _ = run_property(crashing, "test_crash")
    assert returncode < 0  # killed by a signal (SIGSEGV; SIGABRT when a sanitizer runtime reports it)

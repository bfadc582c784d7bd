"""No shipped file names a folder of the machine that built it: the package (weights and their
MANIFEST.json included), the docs and the recorded benchmark results hold repository-relative
paths only."""

import re
import subprocess
from pathlib import Path

import pytest

from sss_ext.models.manifest import portable, portable_path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("sss_ext", "docs", "benchmarks/results", "README.md")
# An absolute path into a machine's own folders (a home, a checkout, a scratch or cache folder).
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp|Users|mnt|scratch|var/folders)/[\w.-]")


def shipped_text_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-z", *SHIPPED], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, listed.decode().split("\0")):
        path = REPO / name
        data = path.read_bytes() if path.is_file() else b""
        if b"\0" not in data[:4096]:
            yield name, data.decode("utf-8", errors="replace")


def test_shipped_files_hold_no_absolute_machine_path():
    found = [f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}"
             for name, text in shipped_text_files() for match in MACHINE_PATH.finditer(text)]
    assert found == []


def test_the_manifest_records_paths_portably():
    repo_file = str(REPO / "sss_ext" / "models" / "weights" / "draft_layers.safetensors")
    home_file = str(Path.home() / ".cache" / "sss_ext" / "x.pt")
    assert portable_path(repo_file) == "sss_ext/models/weights/draft_layers.safetensors"
    assert portable_path(home_file) == "~/.cache/sss_ext/x.pt"
    assert portable_path("relative/path") == "relative/path"
    entry = portable({"out": repo_file, "args": {"data": [home_file]}, "steps": 3})
    assert entry == {"out": "sss_ext/models/weights/draft_layers.safetensors", "args": {"data": ["~/.cache/sss_ext/x.pt"]}, "steps": 3}
    assert MACHINE_PATH.search("/tmp/dpo_lr1e-4") and not MACHINE_PATH.search("see docs/build.md and ~/.cache/sss_ext")


def test_embedded_repository_and_home_paths_are_shortened():
    text = f"[PosixPath('{Path.home()}/.cache/a.pt'), PosixPath('{REPO}/sss_ext/b')]"
    assert portable_path(text) == "[PosixPath('~/.cache/a.pt'), PosixPath('sss_ext/b')]"

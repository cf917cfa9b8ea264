"""`moedsl quantize` asks torch for faster pinned allocations, before torch reads its allocator settings."""

import os
import subprocess
import sys
from pathlib import Path

from moedsl.execute.pinned import configure_pinned_memory, with_pinned_settings

REPO = Path(__file__).resolve().parent.parent
OURS = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def test_settings_are_added_to_what_is_there():
    assert with_pinned_settings(None) == OURS
    assert with_pinned_settings("") == OURS
    assert with_pinned_settings("expandable_segments:True") == "expandable_segments:True," + OURS
    assert with_pinned_settings(" expandable_segments:True , ") == "expandable_segments:True," + OURS


def test_a_users_own_pinned_setting_is_kept():
    for conf in ("pinned_use_cuda_host_register:False", "expandable_segments:True,pinned_num_register_threads:2",
                 "pinned_use_background_threads:True"):
        assert with_pinned_settings(conf) == conf


def test_the_newer_variable_is_used_when_set():
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    configure_pinned_memory(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True," + OURS}
    env = {}
    configure_pinned_memory(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": OURS}


def test_the_command_sets_them_before_torch_is_imported():
    """The environment torch finds when `moedsl quantize` first imports it (a real CLI process, stopped
    there by an import hook) holds the settings."""
    probe = r"""
import os, sys
class AtTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
            raise SystemExit(0)
sys.meta_path.insert(0, AtTorch())
from moedsl.cli import main
main(["quantize", "--out", sys.argv[1]])
raise SystemExit("torch was never imported")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", probe, "/tmp/moedsl-never-written"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == OURS

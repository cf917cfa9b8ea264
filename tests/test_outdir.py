"""The output directory: never a source, locked, resumable after a kill at any moment, complete or
visibly not, and filesystem errors reported with exit 2.

Refusals run the CLI in-process (they must fail before any model is loaded); locking, kills and
filesystem errors run real processes: forked from a server that has imported moedsl once
(tests/cli_process.py), and `python -m moedsl` in a fresh interpreter inside the tmpfs mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_checkpoint, report_results
from moedsl.cli import main as cli_main
from tests import cli_process

FAST = ["--group-size", "32", "--samples", "2", "--seq-len", "16", "--no-progress"]
REPORT = "moedsl-report.json"


def _tree(root: Path) -> dict[str, str]:
    """Every file below `root` (relative path → sha256), symlinks by their target; not the lock file, which
    comes and goes with each run that takes hold of the directory."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".moedsl-lock":
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _refused(capsys, *args: str) -> str:
    rc = cli_main(["quantize", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def _looks_finished(d: Path) -> Path:
    """Make `d` look like a finished moedsl output (what --overwrite replaces)."""
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "config.json").exists():
        (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (d / REPORT).write_text("{}")
    return d


@pytest.fixture
def model_copy(default_model, tmp_path) -> Path:
    return Path(shutil.copytree(default_model, tmp_path / "model"))


# ---- 1. a source is never deleted or written ----------------------------------------------------


def test_out_is_the_model(model_copy, capsys):
    _looks_finished(model_copy)
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(model_copy), "--overwrite", *FAST)
    assert f"--out {model_copy} is --model {model_copy}" in err
    assert _tree(model_copy) == before


def test_model_inside_out(model_copy, tmp_path, capsys):
    out = _looks_finished(tmp_path / "out")
    model = Path(shutil.move(model_copy, out / "src"))
    before = _tree(out)
    err = _refused(capsys, "--model", str(model), "--out", str(out), "--overwrite", *FAST)
    assert f"--out {out} holds --model {model}" in err
    assert _tree(out) == before


def test_no_resume_over_a_killed_run_holding_the_model(model_copy, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".moedsl-run").mkdir(parents=True)
    (out / ".moedsl-run" / "state.json").write_text(json.dumps({"finished": 1}))
    model = Path(shutil.move(model_copy, out / "src"))
    before = _tree(out)
    err = _refused(capsys, "--model", str(model), "--out", str(out), "--no-resume", *FAST)
    assert "holds --model" in err
    assert _tree(out) == before


def test_out_is_a_symlink_to_the_model(model_copy, tmp_path, capsys):
    _looks_finished(model_copy)
    link = tmp_path / "link"
    link.symlink_to(model_copy, target_is_directory=True)
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(link), "--overwrite", *FAST)
    assert f"--out {link} is --model {model_copy}" in err
    assert _tree(model_copy) == before


def test_out_inside_the_model(model_copy, capsys):
    before = _tree(model_copy)
    err = _refused(capsys, "--model", str(model_copy), "--out", str(model_copy / "q"), *FAST)
    assert "lies inside --model" in err
    assert _tree(model_copy) == before and not (model_copy / "q").exists()


def test_out_holds_the_files_the_model_links_to(model_copy, tmp_path, capsys):
    """A hub-cache layout: the snapshot's files are symlinks into a blobs directory."""
    blobs = _looks_finished(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in model_copy.iterdir():
        if f.name != "config.json":
            target = Path(shutil.move(f, blobs / ("blob-" + f.name)))
            (snapshot / f.name).symlink_to(target)
    shutil.move(model_copy / "config.json", snapshot / "config.json")
    before = _tree(blobs)
    err = _refused(capsys, "--model", str(snapshot), "--out", str(blobs), "--overwrite", *FAST)
    assert "through a symlink" in err
    assert _tree(blobs) == before


def test_out_holds_the_calibration_file(tmp_path, capsys, default_model):
    out = _looks_finished(tmp_path / "out")
    calib = out / "calib.jsonl"
    calib.write_text(json.dumps({"input_ids": list(range(64))}) + "\n")
    before = _tree(out)
    err = _refused(capsys, "--calib", str(calib), "--out", str(out), "--overwrite", *FAST)
    assert f"holds the --calib file {calib}" in err
    assert _tree(out) == before


def test_out_holds_the_builtin_default_model(default_model, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(default_model, cache / default_model.name)
    _looks_finished(cache)
    monkeypatch.setenv("MOEDSL_CACHE", str(cache))
    before = _tree(cache)
    err = _refused(capsys, "--out", str(cache), "--overwrite", *FAST)
    assert "holds the built-in default model" in err
    assert _tree(cache) == before


def test_overwrite_keeps_the_old_checkpoint_when_the_run_fails_on_input(tmp_path, capsys, default_model):
    """--overwrite clears the old checkpoint only when the new run starts writing."""
    out = _looks_finished(tmp_path / "out")
    (out / "layer-00000.safetensors").write_bytes(b"the old checkpoint")
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"input_ids": [1, 2,\n')
    before = _tree(out)
    err = _refused(capsys, "--calib", str(calib), "--out", str(out), "--overwrite", *FAST)
    assert f"{calib}:1:" in err
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_out_below_a_regular_file(tmp_path, capsys, default_model):
    f = tmp_path / "file"
    f.write_text("not a directory\n")
    err = _refused(capsys, "--out", str(f / "sub"), *FAST)
    assert f"--out {f / 'sub'}: cannot create it: {f} is a file, not a directory" in err
    assert f.read_text() == "not a directory\n"


# ---- real processes: a tiny 4-layer model, few tokens, one thread -------------------------------

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--group-size", "32", "--samples", "4", "--seq-len", "16", "--batch-size", "2", "--no-progress",
        "--resume-interval", "0"]  # a resume state after every layer
MARKERS = ("config.json", "quantize_config.json", REPORT)  # what makes a directory look finished
_HOW = {"out", "resume", "overwrite"}  # options that say where and how, not what


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}  # one thread: fast on shared cores, and deterministic
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--out", str(out), *ARGS, *extra]


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moedsl", *_args(model, out, *extra)]


def _run(model: Path, out: Path, *extra: str, preexec_fn=None) -> cli_process.Completed:
    """The command to its end, as a process of its own (forked from the preloaded server, tests/cli_process.py)."""
    r = cli_process.run(_args(model, out, *extra), REPO, _env(), timeout=300, preexec_fn=preexec_fn)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _stopped(model: Path, out: Path, point: str, *extra: str) -> cli_process.Process:
    """A run (a process of its own) stopped at `point` (a `stop_point` name), waiting there to be killed."""
    marker = out.parent / f".stopped-{out.name}-{time.monotonic_ns()}"
    env = _env(MOEDSL_TEST_STOP=point, MOEDSL_TEST_STOP_FILE=str(marker))
    p = cli_process.Process(_args(model, out, *extra), REPO, env, stderr=out.parent / f".stderr-{out.name}")
    deadline = time.monotonic() + 300
    while not (marker.is_file() and marker.read_text().endswith("\n")):
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"the run never reached {point} (rc {p.wait()}):\n"
                                 + (out.parent / f".stderr-{out.name}").read_text())
        time.sleep(0.05)
    assert int(marker.read_text()) == p.pid
    marker.unlink()
    return p


def _kill(p: cli_process.Process) -> None:
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL


def _report_without_timing(out: Path) -> dict:
    return report_results(out, _HOW)


def _assert_same_checkpoint(out: Path, ref: Path) -> None:
    assert_same_checkpoint(out, ref, _HOW)


def _assert_complete_or_visibly_not(out: Path, ref: Path) -> None:
    """What a kill leaves: every visible file final (none truncated or stale), and config.json, the
    completion marker, only beside every other file of the finished checkpoint."""
    for p in sorted(out.iterdir()):
        if p.name == REPORT:
            assert _report_without_timing(out) == _report_without_timing(ref)
        elif not p.name.startswith("."):
            assert p.read_bytes() == (ref / p.name).read_bytes(), f"{p.name} is there but not final"
    if (out / "config.json").exists():
        assert {p.name for p in ref.iterdir()} <= {p.name for p in out.iterdir()}


@pytest.fixture(scope="module")
def tiny4(tiny_model) -> Path:
    return tiny_model("qwen3_moe", num_hidden_layers=4)


@pytest.fixture(scope="module")
def reference(tiny4, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "out"
    r = _run(tiny4, out)
    assert r.returncode == 0, r.stderr
    assert not (out / ".moedsl-run").exists() and not (out / ".moedsl-lock").exists()
    return out


# ---- 2. kills at any moment resume to the same bytes ------------------------------------------

# In run order; each process is killed at the first time it reaches its point, and the next one
# resumes from what the kill left (after a kill before layer 0's state, it starts over).
KILL_POINTS = [
    "layer:0:start",  # an empty .moedsl-run/
    "write:layer-00000.safetensors",  # layer 0's shard written, not yet renamed
    "write:state.json",  # layer 0's shard and layer 1's inputs in place, the state not yet
    "write:acts-00002.safetensors",  # layer 1's shard in place, layer 2's inputs being written
    "write:state.json",  # layer 2's inputs in place, the state still says 1
    "layer:3:start",
    "write:model-rest.safetensors",  # after the last layer but one (here the resumed run's first)
    "write:tokenizer.json",
    "write:config.json",  # everything but the completion marker
    "finish",  # complete; .moedsl-run/ not yet removed
]


def test_kills_at_any_moment_resume_byte_identical(tiny4, reference, tmp_path):
    out = tmp_path / "out"
    for point in KILL_POINTS:
        _kill(_stopped(tiny4, out, point))
        assert (out / ".moedsl-run").is_dir(), point  # ours, and resumable
        _assert_complete_or_visibly_not(out, reference)
    r = _run(tiny4, out)
    assert r.returncode == 0, r.stderr
    _assert_same_checkpoint(out, reference)


def test_no_resume_and_overwrite_clear_a_killed_run(tiny4, reference, tmp_path):
    out = tmp_path / "out"
    _kill(_stopped(tiny4, out, "layer:0:start"))
    assert sorted(p.name for p in out.iterdir()) == [".moedsl-lock", ".moedsl-run"]
    _kill(_stopped(tiny4, out, "layer:2:start", "--no-resume"))
    r = _run(tiny4, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    _assert_same_checkpoint(out, reference)


# ---- 3. one run at a time -------------------------------------------------------------------


def test_a_second_run_into_a_held_directory_is_refused(tiny4, tmp_path):
    out = tmp_path / "out"
    first = _stopped(tiny4, out, "layer:1:start")
    try:
        before = _tree(out)
        r = _run(tiny4, out, "--overwrite")
        assert r.returncode == 2, r.stderr
        assert f"--out {out}: another moedsl run (pid {first.pid}) holds this output directory" in r.stderr
        assert _tree(out) == before
    finally:
        _kill(first)


# ---- 4. resume only what the same source would give --------------------------------------------


def test_resume_refuses_a_changed_source(tiny4, reference, tmp_path):
    model = Path(shutil.copytree(tiny4, tmp_path / "model"))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": list(range(i, i + 40))}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    _kill(_stopped(model, out, "layer:2:start", "--calib", str(calib)))
    before = _tree(out)

    def refused(*changed: str) -> None:
        r = _run(model, out, "--calib", str(calib))
        assert r.returncode == 2, r.stderr
        assert "the source changed since the interrupted run" in r.stderr and "--no-resume" in r.stderr
        for what in changed:
            assert what in r.stderr, r.stderr
        assert _tree(out) == before

    original = calib.read_text()
    calib.write_text(original.replace('[', '[100, '))
    refused("the calibration tokens differ")
    calib.write_text(original)  # the same tokens again

    config = (model / "config.json").read_bytes()
    (model / "config.json").write_text(json.dumps({**json.loads(config), "rms_norm_eps": 1e-5}))
    refused("config.json changed")
    (model / "config.json").write_bytes(config)

    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-2:] = bytes(b ^ 0xFF for b in data[-2:])  # one weight, in place: same size, same header
    shard.write_bytes(bytes(data))
    refused("model.safetensors changed")


# ---- 5. filesystem errors: exit 2 naming the file, nothing that looks complete, then resumable ----


def _private_mounts() -> list[str] | None:
    """`unshare` arguments for a private mount namespace where tmpfs may be mounted, or None."""
    if shutil.which("unshare") is None:
        return None
    for args in (["unshare", "-m"], ["unshare", "-rm"]):  # as root; else as root of a user namespace
        probe = subprocess.run([*args, "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True)
        if probe.returncode == 0:
            return args
    return None


UNSHARE = _private_mounts()
FINAL_FILES = ("model-rest.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "model.safetensors.index.json", "quantize_config.json", REPORT, "config.json")
needs_mounts = pytest.mark.skipif(UNSHARE is None, reason="cannot mount a private tmpfs here (no mount namespace)")


def _in_tmpfs(tmp_path: Path, script: str) -> None:
    """Run the sh `script` in a private mount namespace, `$FS` a fresh tmpfs (gone when it ends)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    env = _env(FS=str(fs), PY=sys.executable)
    r = subprocess.run([*UNSHARE, "sh", "-ec", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def _quantize_sh(model: Path, out: str, name: str, host: Path) -> str:
    """sh: run the CLI into `out`, leaving its rc, stderr and a copy of `out` in host/name.*"""
    argv = " ".join(f"'{a}'" for a in _argv(model, Path("OUT"))[1:]).replace("'OUT'", f'"{out}"')
    return (f'rc=0; "$PY" {argv} 2> {host}/{name}.err || rc=$?; echo $rc > {host}/{name}.rc; '
            f'if [ -d "{out}" ]; then cp -a "{out}" {host}/{name}.out; fi\n')


def _result(host: Path, name: str) -> tuple[int, str, Path]:
    err = (host / f"{name}.err").read_text()
    assert "Traceback" not in err, err
    return int((host / f"{name}.rc").read_text()), err, host / f"{name}.out"


@needs_mounts
@pytest.mark.parametrize("room", ["layers", "final"])
def test_disk_full_then_resume(tiny4, reference, tmp_path, room):
    """A tmpfs too small for the checkpoint: exit 2 naming the file; then, with room, the same command
    resumes to the same bytes."""
    sizes = {p.name: p.stat().st_size for p in reference.iterdir()}
    layers = sorted(n for n in sizes if n.startswith("layer-"))
    if room == "layers":
        kib = (sizes[layers[0]] + sizes[layers[1]]) // 1024 + 8
    else:  # what the run holds on disk at its last write (config.json's), in tmpfs pages, less one page
        probe = tmp_path / "probe"
        _kill(_stopped(tiny4, probe, "write:config.json"))
        kib = 4 * (sum(-(-p.stat().st_size // 4096) for p in probe.rglob("*") if p.is_file()) - 1)
    host = tmp_path / "host"
    host.mkdir()
    before = _tree(tiny4)
    _in_tmpfs(tmp_path, f'mount -t tmpfs -o size={kib}k tmpfs "$FS"\n'
              + _quantize_sh(tiny4, "$FS/out", "full", host)
              + 'mount -o remount,size=64m "$FS"\n'
              + _quantize_sh(tiny4, "$FS/out", "resumed", host))
    rc, err, left = _result(host, "full")
    assert rc == 2, err
    assert "No space left on device" in err and "run the same command again" in err
    failed = re.search(rf"cannot write {tmp_path}/fs/out/(\S+): ", err).group(1)
    assert failed.startswith("layer-") if room == "layers" else failed in FINAL_FILES, failed
    assert not [n for n in MARKERS if (left / n).exists()]  # nothing that looks finished
    assert not list(left.glob(".*.partial")) and not list(left.glob(".moedsl-run/.*.partial"))
    assert (left / ".moedsl-run" / "state.json").is_file()  # at least one layer finished: resumable
    rc, err, final = _result(host, "resumed")
    assert rc == 0, err
    _assert_same_checkpoint(final, reference)
    assert _tree(tiny4) == before


@needs_mounts
def test_read_only_output(tiny4, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    _in_tmpfs(tmp_path, 'mount -t tmpfs tmpfs "$FS"; mkdir "$FS/empty"; mount -o remount,ro "$FS"\n'
              + _quantize_sh(tiny4, "$FS/new", "new", host) + _quantize_sh(tiny4, "$FS/empty", "empty", host))
    fs = tmp_path / "fs"
    rc, err, _ = _result(host, "new")
    assert rc == 2 and f"cannot create {fs}/new: Read-only file system" in err, err
    rc, err, left = _result(host, "empty")
    assert rc == 2 and f"cannot create the lock file {fs}/empty/.moedsl-lock: Read-only file system" in err, err
    assert not any(left.iterdir())


def test_file_size_limit_then_resume(tiny4, reference, tmp_path):
    """RLIMIT_FSIZE (works without privileges): the first file above the limit fails with EFBIG."""
    limit = 40_000
    assert any(p.stat().st_size > limit for p in reference.glob("layer-*"))
    out = tmp_path / "out"
    r = _run(tiny4, out, preexec_fn=cli_process.file_size_limit(limit))
    assert r.returncode == 2, r.stderr
    assert f"cannot write {out}/" in r.stderr and "File too large" in r.stderr and "ulimit -f" in r.stderr
    assert not [n for n in MARKERS if (out / n).exists()] and not list(out.glob(".*.partial"))
    r = _run(tiny4, out)
    assert r.returncode == 0, r.stderr
    _assert_same_checkpoint(out, reference)

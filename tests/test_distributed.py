"""Several ranks on one model (gloo on the CPU): the same bytes as one process, whatever the number of ranks;
a killed or failing rank ends the whole run, and the run resumes.

Every test starts real rank processes on a tiny Qwen3-MoE checkpoint (8 experts in 8 blocks, `--expert-blocks 8`
for every rank count, so 2 and 3 ranks own unequal slices): one under `python -m torch.distributed.run` itself, the others as torchrun
starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set for each `moedsl quantize`), forked from the
tests' preloaded server (tests/cli_process.py), so that they do not pay for Python's imports each time; no
torchrun then ends the other ranks for them, so a failure is seen by moedsl's own collectives alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import assert_same_checkpoint
from tests import cli_process

REPO = Path(__file__).resolve().parent.parent
REPORT = "moedsl-report.json"
# 8 blocks whatever the rank count: the bytes depend on the blocks, never on the ranks
ARGS = ["--group-size", "32", "--samples", "3", "--seq-len", "8", "--batch-size", "1", "--no-progress",
        "--expert-blocks", "8"]
_NOT_RESULTS = {"ranks", "out", "resume", "resume_interval", "overwrite", "pipeline"}  # beyond timing: how, not what


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}  # one thread per rank, as torchrun sets it
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MOEDSL_TEST_STOP", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantize(ranks: int, model: Path, out: Path, *extra: str, env: dict | None = None, timeout: float = 240,
              torchrun: bool = False) -> cli_process.Completed:
    """`moedsl quantize` as one process (ranks=0), or as `ranks` rank processes: started by torchrun itself, or
    with the environment it gives them. stdout and stderr: every rank's, in rank order; the exit status: the
    first rank's that failed (0 when every one succeeded)."""
    argv = ["quantize", "--model", str(model), "--out", str(out), *ARGS, *extra]
    env = env or _env()
    if ranks == 0:
        return cli_process.run(argv, REPO, env, timeout)
    t0 = time.perf_counter()
    if torchrun:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(ranks), "-m", "moedsl", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
        return cli_process.Completed(r.returncode, r.stdout, r.stderr, time.perf_counter() - t0)
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="moedsl-ranks-") as tmp:
        files = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(ranks)]
        procs = [cli_process.Process(argv, REPO, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                                                  "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": port}, *files[r]) for r in range(ranks)]
        try:
            codes = [p.wait(max(1.0, timeout - (time.perf_counter() - t0))) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        read = lambda f: f.read_text(errors="replace") if f.exists() else ""  # noqa: E731
        return cli_process.Completed(next((c for c in codes if c), 0), "".join(read(o) for o, _ in files),
                                     "".join(read(e) for _, e in files), time.perf_counter() - t0)


def _assert_same_checkpoint(out: Path, ref: Path) -> None:
    # the same errors, losses and tokens per expert, to the last bit; `ranks` says how many made them
    assert_same_checkpoint(out, ref, _NOT_RESULTS)


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model("qwen3_moe", num_hidden_layers=2)


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """(policy, solver) -> the checkpoint one process writes."""
    made: dict[tuple[str, str], Path] = {}

    def get(policy: str, solver: str = "gptq") -> Path:
        if (policy, solver) not in made:
            out = tmp_path_factory.mktemp("single") / f"{policy}-{solver}"
            r = _quantize(0, tiny, out, "--policy", policy, "--solver", solver)
            assert r.returncode == 0, r.stderr
            made[policy, solver] = out
        return made[policy, solver]

    return get


# `routed` on 2 ranks: the killed run and its resumption below (each layer made by 2 ranks) write these bytes.
# gptaq: the full-precision stream and the cross statistics (under `all`, one shared Hessian and its cross term
# for every block), split by batch and by expert block like the rest.
@pytest.mark.parametrize("policy,ranks,solver", [("all", 2, "gptaq"), ("all", 3, "gptq"), ("routed", 3, "gptq")])
def test_ranks_write_the_bytes_one_process_writes(tiny, single, tmp_path, policy, ranks, solver):
    out = tmp_path / "out"
    r = _quantize(ranks, tiny, out, "--policy", policy, "--solver", solver)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    _assert_same_checkpoint(out, single(policy, solver))
    figures = json.loads((out / REPORT).read_text())["ranks"]
    assert figures["world_size"] == ranks and figures["backend"] == "gloo"
    assert len(figures["host_peak_bytes"]) == ranks and all(b > 0 for b in figures["host_peak_bytes"])
    assert not (out / ".moedsl-run").exists() and not (out / ".moedsl-lock").exists()


def test_a_killed_rank_ends_the_run_and_it_resumes(tiny, single, tmp_path):
    """Rank 1 is SIGKILLed as layer 1 starts (layer 0 is on disk: `--pipeline serial` writes it first); the
    run ends within 60 s of the kill, and the same command on 2 ranks resumes to one process's bytes."""
    out = tmp_path / "out"
    struck = tmp_path / "struck"
    r = _quantize(2, tiny, out, "--policy", "routed", "--pipeline", "serial", "--resume-interval", "0",
                  env=_env(MOEDSL_TEST_RANK_FAULT="1:layer:1:start:kill", MOEDSL_TEST_RANK_FAULT_FILE=str(struck)),
                  timeout=180)
    ended = time.time()
    assert r.returncode != 0
    assert ended - float(struck.read_text()) < 60
    text = r.stdout + r.stderr
    assert "moedsl rank 0: " in text and "lost contact with the other ranks while" in text, text[-3000:]
    state = json.loads((out / ".moedsl-run" / "state.json").read_text())
    assert state["finished"] == 1
    assert not (out / "config.json").exists()  # visibly unfinished
    r = _quantize(2, tiny, out, "--policy", "routed")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_checkpoint(out, single("routed"))


def test_a_rank_that_raises_ends_every_rank(tiny, tmp_path):
    """A bug on rank 0 after a solve, while rank 1 waits for its weights: both end, the error is named."""
    out = tmp_path / "out"
    struck = tmp_path / "struck"
    r = _quantize(2, tiny, out, "--policy", "all", env=_env(MOEDSL_TEST_RANK_FAULT="0:layer:0:solved:raise",
                                                             MOEDSL_TEST_RANK_FAULT_FILE=str(struck)), timeout=180)
    assert r.returncode != 0
    assert time.time() - float(struck.read_text()) < 60
    assert "moedsl rank 0: failed: RuntimeError: test fault injected on rank 0 at layer:0:solved" in r.stderr
    assert not (out / ".moedsl-lock").exists()  # rank 0 let go of the directory before it ended


def test_rank_0_refusing_the_output_directory_refuses_on_every_rank(tiny, tmp_path):
    """Under torchrun itself (its environment, its rendezvous, its exit status)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a moedsl run")
    r = _quantize(2, tiny, out, timeout=120, torchrun=True)
    assert r.returncode != 0
    assert r.stderr.count("is not empty and holds no moedsl run to resume") == 2, r.stderr[-3000:]
    assert "lost contact" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_units_are_fixed_by_the_plan_and_each_has_one_owner(tiny):
    from moedsl.execute.distributed import Ranks, expert_blocks
    from moedsl.execute.layer import plan_units
    from moedsl.lang.library import for_model
    from moedsl.models.source import build, config_from_file
    from moedsl.plan.compiler import compile_plan
    from moedsl.plan.schema import Policy

    assert expert_blocks(8, 3) == [(0, 2), (2, 5), (5, 8)]
    assert expert_blocks(4, 8) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # at most one block per expert
    assert expert_blocks(128, 8)[-1] == (112, 128)
    model = build(config_from_file(tiny / "config.json"))
    kind = compile_plan(for_model(model), model, policy=Policy.parse("routed")).kinds[0]
    one = plan_units(kind, Ranks(), 8)
    assert {u.owner for u in one} == {0}
    for world in (2, 3, 5):
        units = plan_units(kind, Ranks(rank=0, world=world), 8)
        # the same units in the same order whatever the number of ranks: only the owners differ
        assert [(u.stage, u.key, u.block) for u in units] == [(u.stage, u.key, u.block) for u in one]
        for key in {u.key for u in units if u.block is not None}:
            blocks = [u for u in units if u.key == key]
            assert [e for u in blocks for e in range(*u.block)] == list(range(8))  # every expert exactly once
            assert [u.owner for u in blocks] == [j % world for j in range(len(blocks))]
        linear = [u.owner for u in units if u.block is None]
        assert linear == [j % world for j in range(len(linear))]


def test_bad_distributed_settings_are_refused(tmp_path, monkeypatch):
    from moedsl.errors import MoedslError
    from moedsl.execute import distributed
    from moedsl.execute.options import QuantizeOptions

    with pytest.raises(MoedslError, match="--expert-blocks 0: must be a positive integer"):
        QuantizeOptions(out=tmp_path, expert_blocks=0)
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "soon")
    with pytest.raises(MoedslError, match="MOEDSL_DIST_TIMEOUT=soon: not a number of seconds"):
        distributed._timeout()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(MoedslError, match="under torchrun every rank uses cuda:LOCAL_RANK"):
        distributed.init("cuda:1")


def test_grouped_containers_are_refused_on_several_ranks(tiny_model):
    """JetMoE's `:grouped` containers apply their statistics inside the forward: one process only, said at once."""
    from moedsl.errors import MoedslError
    from moedsl.execute.distributed import SINGLE, Ranks, check_plan
    from moedsl.lang.library import for_model
    from moedsl.models.source import build, config_from_file
    from moedsl.plan.compiler import compile_plan

    src = tiny_model("jetmoe")
    model = build(config_from_file(src / "config.json"))
    plan = compile_plan(for_model(model), model)
    check_plan(SINGLE, plan)  # one process quantizes it (tests/test_grouped.py)
    with pytest.raises(MoedslError, match=r"holds its experts in grouped containers \(`:grouped`\), which moedsl "
                                          r"quantizes in one process only: 2 ranks were started"):
        check_plan(Ranks(rank=1, world=2), plan)


@pytest.fixture(scope="module")
def busy_model():
    """A tiny Qwen3-MoE (8 experts, top-4) and 2048 calibration tokens: ~1000 rows an expert, enough that the
    CPU's products split their sums."""
    import torch

    from moedsl.models.tiny import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("qwen3_moe", num_experts_per_tok=4), device="cpu").eval()
    return model, torch.randint(0, model.config.vocab_size, (4, 512))


@pytest.mark.parametrize("policy", ["routed", "all"])
def test_expert_blocks_compute_the_statistics_of_all_experts_at_once(busy_model, policy):
    """Each block's Hessians are the very bytes the whole layer's experts get in one block (`--expert-blocks 1`,
    as before blocks existed): a block's routed rows are padded as all the experts' are, and the products see
    the same lengths."""
    import copy

    import torch

    from moedsl.bind.binder import get_path
    from moedsl.execute.layer import LayerQuantizer
    from moedsl.execute.run import capture_layer_inputs
    from moedsl.execute.stats import BlockedHessian
    from moedsl.gptq.quantizer import QuantConfig
    from moedsl.lang.library import for_model
    from moedsl.plan.compiler import compile_plan

    model, ids = busy_model
    plan = compile_plan(for_model(model), model, policy=policy, tokens=ids.numel())
    cpu = torch.device("cpu")
    hidden, kwargs = capture_layer_inputs(model, plan, list(ids.split(2)), cpu, cpu)
    i = next(n for n, k in enumerate(plan.kind_of_layer) if plan.kind(k).moe)
    kind = plan.kind_for_layer(i)
    stats = []
    for blocks in (1, 4):
        layer = copy.deepcopy(get_path(model, plan.layers_path)[i])
        q = LayerQuantizer(kind, layer, QuantConfig(bits=4, group_size=-1), plan.policy, cpu, expert_blocks=blocks)
        got = {}
        for stage in kind.stages:
            for name, h in q.collect(stage, hidden, kwargs[i]).items():
                parts = [h.parts[k] for k in sorted(h.parts)] if isinstance(h, BlockedHessian) else [h]
                got[name] = [torch.cat([p.sum.reshape(-1) for p in parts]),
                             torch.cat([p.count.reshape(-1) for p in parts])]
        stats.append(got)
    assert stats[0].keys() == stats[1].keys() and any("{e}" in k for k in stats[0])
    for name in stats[0]:
        assert torch.equal(stats[0][name][1], stats[1][name][1]), name  # tokens per expert
        assert torch.equal(stats[0][name][0], stats[1][name][0]), name  # the Hessians, bit for bit

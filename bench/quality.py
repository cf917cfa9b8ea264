"""Quantization quality on a small MoE trained on real text: held-out perplexity of RTN and GPTQ.

Random weights cannot show quantization quality, and there is no hub here, so this script
1. trains a small qwen3_moe from config (6 layers, hidden 512, 32 experts, top-4, expert
   intermediate 256, 8 heads, byte-level vocabulary) on the Python standard library's own
   source and docs (.py/.rst/.txt under sysconfig's stdlib path), split BY FILE into train and
   held-out sets (sorted paths, a hash of each relative path picks the held-out ~10 %), and saves
   it (bf16, save_pretrained + byte tokenizer) under --work;
2. measures held-out perplexity (fixed windows) of: the saved model; round-to-nearest (our own
   baseline: every target of the moedsl plan replaced by `rtn_quantize(W).weight`); and
   `moedsl.quantize` GPTQ checkpoints for each bits × policy × calibration size, whose packed
   weights this script unpacks itself (docs/formats.md) into a copy of the model;
3. reports per-expert calibration token counts under `routed` (from moedsl-report.json) and plots
   expert coverage and per-stage GPTQ/RTN error (matplotlib, skipped with a message if missing);
4. prints a table and the checks, and writes results.json; `--repeat N` redoes everything with the
   same seed to show run-to-run spread, and `--noise-solvers A,B --noise-draws K` quantizes those
   solvers again on K other calibration draws (windows of the training files drawn with other
   seeds) in the same run: the spread of one solver's perplexity over its draws is the noise the
   checks hold every comparison at that bit width to.

    python bench/quality.py                                # one H100: a few minutes
    python bench/quality.py --repeat 2                     # + run-to-run spread
    python bench/quality.py --small --device cpu           # ~1 minute on 2 cores (tests)
    python bench/quality.py --solver-sweep                 # the solvers at 4 and 3 bits, routed, 256 seqs,
                                                           # with calibration-draw noise on two of them

A solver on the --solvers axis is a `--solver` value (gptq, rtn, mse, gptaq, gptaq-mse,
`gptaq(alpha=0.5)`, gptq-refit, `gptaq-mse-cd(alpha=0.5)`, `gptq(damp=0.001)`, a file.py:Name;
docs/solvers.md), optionally followed by `+act`: activation order with static groups
(`--act-order --static-groups`, the form vLLM's MoE kernels load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import moedsl
from moedsl.experts import layout as fused
from moedsl.gptq.quantizer import QuantConfig, rtn_quantize
from moedsl.models.default import BOS_TOKEN, BYTE_VOCAB_SIZE, save_byte_tokenizer

EOS_ID, BOS_ID, PAD_ID = 257, 256, 258  # the byte tokenizer: bytes 0..255, then <|bos|> <|eos|> <|pad|>
assert BOS_TOKEN == "<|bos|>" and BYTE_VOCAB_SIZE == 259

FULL = dict(
    model=dict(num_hidden_layers=6, hidden_size=512, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
               num_attention_heads=8, num_key_value_heads=4, head_dim=64, intermediate_size=1024),
    train_steps=1500, batch=32, seq_len=512, lr=1e-3, log_every=50,
    eval_windows=64, calib_sizes="16,256", bits="4,3", policies="routed,all,auto", group_size=128, solvers="gptq",
    noise_solvers="", noise_draws=2,
)
# the solver comparison of issue 15 (--solver-sweep): the references (gptq, with and without act order), each
# step that composes with them (GPTAQ's correction, the mse grids, the scale refit, coordinate descent, low damping),
# and their combinations; noise: gptq+act and gptaq-cd(alpha=0.5)+act, each on two more calibration draws
SWEEP = dict(solvers="gptq,gptq+act,gptaq(alpha=0.5)+act,gptq-refit+act,gptq-cd+act,gptq(damp=0.001)+act,"
                     "mse-cd+act,gptaq-cd(alpha=0.5)+act,gptaq-mse-cd(alpha=0.5)+act,gptaq-cd(alpha=0.5,sweeps=4)+act",
             policies="routed", calib_sizes="256", noise_solvers="gptq+act,gptaq-cd(alpha=0.5)+act", noise_draws=2)
SMALL = dict(
    model=dict(num_hidden_layers=2, hidden_size=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128),
    train_steps=60, batch=8, seq_len=64, lr=3e-3, log_every=10,
    eval_windows=8, calib_sizes="4,8", bits="4", policies="routed,all", group_size=32, solvers="gptq,gptaq",
    noise_solvers="gptq", noise_draws=1,
)
STARVED = 16  # an expert with fewer calibration tokens than this counts as starved


# ----------------------------------------------------------------------------------------------
# data: the standard library, split by file
# ----------------------------------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    rels = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix in (".py", ".rst", ".txt") and not skip & set(rel.parts) and p.is_file():
            rels.append(rel.as_posix())
    return root, sorted(rels)


def is_heldout(rel: str) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] % 10 == 0  # ~10 % of the files


def load_corpus() -> dict:
    """Two byte streams (uint16 token ids, files separated by EOS): train and held-out."""
    root, rels = stdlib_files()
    parts = {"train": [], "heldout": []}
    eos = np.array([EOS_ID], dtype=np.uint16)
    for rel in rels:
        data = np.frombuffer((root / rel).read_bytes(), dtype=np.uint8).astype(np.uint16)
        parts["heldout" if is_heldout(rel) else "train"] += [data, eos]
    streams = {k: torch.from_numpy(np.concatenate(v).astype(np.int64)) for k, v in parts.items()}
    n_held = sum(map(is_heldout, rels))
    print(f"data: {root}: {len(rels)} files, train {len(rels) - n_held} files / {len(streams['train']):,} tokens, "
          f"held-out {n_held} files / {len(streams['heldout']):,} tokens")
    return {**streams, "root": str(root), "files": len(rels), "heldout_files": n_held}


def fixed_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """n windows at evenly spaced offsets (no randomness: the same windows for every run)."""
    starts = torch.linspace(0, len(stream) - seq_len - 1, n).long()
    return torch.stack([stream[s:s + seq_len] for s in starts])


def random_windows(stream: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (n,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts])


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def make_config(shape: dict, seq_len: int):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=BYTE_VOCAB_SIZE, max_position_embeddings=max(1024, seq_len), norm_topk_prob=True,
        mlp_only_layers=[], decoder_sparse_step=1, tie_word_embeddings=False, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, output_router_logits=True, router_aux_loss_coef=0.01, **shape)


def train(args, corpus: dict, out_dir: Path, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = make_config(args.shape, args.seq_len)
    model = AutoModelForCausalLM.from_config(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = max(1, args.train_steps // 20)

    def lr_at(step):  # linear warmup, cosine decay to 10 %
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.train_steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(f"train: qwen3_moe {n_params / 1e6:.1f}M params on {device}, {args.train_steps} steps of "
          f"{args.batch} x {args.seq_len} tokens")
    t0 = time.perf_counter()
    losses = []
    for step in range(args.train_steps):
        x = random_windows(corpus["train"], args.batch, args.seq_len, gen).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast:
            out = model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.train_steps - 1:
            ce = float(out.loss.detach() - config.router_aux_loss_coef * out.aux_loss.detach())
            losses.append((step, ce))
            dt = time.perf_counter() - t0
            eta = dt / (step + 1) * (args.train_steps - step - 1)
            print(f"  step {step:5d}  loss {ce:.4f}  aux {float(out.aux_loss.detach()):.3f}  lr {lr_at(step):.2e}  "
                  f"{dt:6.1f}s (eta {eta:.0f}s)", flush=True)
    seconds = time.perf_counter() - t0
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    save_byte_tokenizer(out_dir)
    print(f"train: {seconds:.1f}s, saved {out_dir}")
    return {"seconds": seconds, "params": n_params, "losses": losses}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def load_model(model_dir: Path, device: torch.device):
    """The saved (bf16) model in fp32, so every variant's weights are held exactly."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return model.eval()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device, batch: int = 8) -> float:
    nll, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for x in windows.split(batch):
        x = x.to(device)
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(),
                                                 reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def plan_targets(model):
    """(layer index, Target) for every weight the moedsl plan quantizes."""
    plan = moedsl.compile_plan(moedsl.load("qwen3_moe"), model)
    return plan, [(i, t) for kind in plan.kinds for i in kind.layers for s in kind.stages for t in s.targets]


@torch.no_grad()
def apply_rtn(model, cfg: QuantConfig) -> None:
    """Our baseline: every plan target rounded to nearest on the same grids (fp16 scales) GPTQ uses."""
    plan, targets = plan_targets(model)
    for i, t in targets:
        layer = get(model, f"{plan.layers_path}.{i}")
        if t.kind == "linear":
            lin = get(layer, t.path)
            lin.weight.copy_(rtn_quantize(lin.weight, cfg).weight)
        else:  # fused experts: one role of all E experts
            param = get(layer, f"{t.path}.{t.param}")
            W = fused.read(param, t.layout, t.split, t.roles, t.role, t.experts)
            Q = torch.stack([rtn_quantize(W[e], cfg).weight for e in range(t.experts)])
            fused.write(param, t.layout, t.split, t.roles, t.role, t.experts, Q)


def apply_llmcompressor(model, calib: np.ndarray, bits: int, group_size: int, seq_len: int) -> dict:
    """llm-compressor's GPTQ (its defaults: symmetric, static activation order, every expert calibrated on
    every token) on the same calibration windows, applied in place; None when it is not installed."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
               "actorder": "static"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head", "re:.*mlp.gate$"])
    data = Dataset.from_dict({"input_ids": [list(map(int, row)) for row in calib],
                              "attention_mask": [[1] * calib.shape[1] for _ in calib]})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib), max_seq_length=seq_len,
            moe_calibrate_all_experts=True, shuffle_calibration_samples=False)
    import llmcompressor

    return {"llmcompressor": llmcompressor.__version__}


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ packing along dim 0: [n*bits/32, m] int32 -> [n, m] codes. Every 32 values form a
    little-endian bit stream over `bits` words (value k starts at bit k*bits), which covers the
    2/4/8-bit layouts and AutoGPTQ's 3-bit one alike."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the uint32 bit patterns
    m = words.shape[1]
    shifts = torch.arange(32, device=packed.device)
    stream = ((words[:, None, :] >> shifts[None, :, None]) & 1)  # [words, 32 bits, m]
    stream = stream.reshape(-1, 32 * bits, m).reshape(-1, 32, bits, m)  # [runs, 32 values, bits, m]
    weights = (1 << torch.arange(bits, device=packed.device))[None, None, :, None]
    return (stream * weights).sum(2).reshape(-1, m)[:n]


def dequantize_gptq(t: dict, name: str, bits: int, v1: bool) -> torch.Tensor:
    """Module `name` of a GPTQ checkpoint as a dense fp32 [out, in] weight."""
    qweight, qzeros = t[f"{name}.qweight"], t[f"{name}.qzeros"]
    scales, g_idx = t[f"{name}.scales"].float(), t[f"{name}.g_idx"].long()
    n_in, n_out = qweight.shape[0] * 32 // bits, scales.shape[1]
    codes = unpack_rows(qweight, bits, n_in)  # [in, out]
    zeros = unpack_rows(qzeros.T.contiguous(), bits, n_out).T + (1 if v1 else 0)  # [G, out]
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).T.contiguous()


@torch.no_grad()
def load_gptq(model, ckpt: Path) -> None:
    """Overwrite every plan target of `model` with the dequantized weights of a GPTQ checkpoint."""
    from safetensors.torch import load_file

    qcfg = json.loads((ckpt / "quantize_config.json").read_text())
    bits, v1 = qcfg["bits"], qcfg["checkpoint_format"] == "gptq"
    tensors = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    plan, targets = plan_targets(model)
    for i, t in targets:
        layer = get(model, f"{plan.layers_path}.{i}")
        prefix = f"{plan.layers_path}.{i}."
        if t.kind == "linear":
            get(layer, t.path).weight.copy_(dequantize_gptq(tensors, prefix + t.ckpt, bits, v1))
        else:
            Q = torch.stack([dequantize_gptq(tensors, prefix + t.ckpt.format(e=e), bits, v1)
                             for e in range(t.experts)])
            fused.write(get(layer, f"{t.path}.{t.param}"), t.layout, t.split, t.roles, t.role, t.experts,
                        Q.to(model.device))


# ----------------------------------------------------------------------------------------------
# reports: expert coverage and per-stage error
# ----------------------------------------------------------------------------------------------

def coverage(report: dict) -> list[dict]:
    """Per layer: the tokens each expert's gate/up saw, and how many experts were starved."""
    rows = []
    for layer in report["layers"]:
        for stage in layer["stages"]:
            for t in stage["targets"]:
                if ".experts." in t["id"] and t["id"].endswith("gate_proj"):
                    tok = t["tokens"]
                    rows.append({"layer": layer["layer"], "tokens": tok, "zero": sum(x == 0 for x in tok),
                                 f"below_{STARVED}": sum(x < STARVED for x in tok), "min": min(tok),
                                 "median": float(np.median(tok)), "max": max(tok)})
    return rows


def stage_errors(report: dict) -> list[dict]:
    return [{"layer": layer["layer"], "stage": s["stage"], "error": s["error"], "rtn_error": s["rtn_error"]}
            for layer in report["layers"] for s in layer["stages"]]


def plot(results: dict, work: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); skipping the plots")
        return []
    run = results["runs"][0]
    bits = max(results["settings"]["bits"])
    sizes = results["settings"]["calib_sizes"]
    routed = {r["calib"]: r for r in run["rows"] if r.get("policy") == "routed" and r["bits"] == bits}
    written = []
    if routed:
        layers = len(next(iter(routed.values()))["coverage"])
        fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), sharey=True, squeeze=False)
        for li, ax in enumerate(axes[0]):
            for n in sizes:
                if n in routed:
                    tok = np.array(routed[n]["coverage"][li]["tokens"], dtype=float)
                    ax.semilogy(np.arange(len(tok)), np.maximum(tok, 0.5), "o", ms=3,
                                label=f"routed, {n} seqs ({int((tok == 0).sum())} at 0)")
            ax.axhline(STARVED, color="grey", lw=0.8, ls="--")
            ax.set_title(f"layer {li}")
            ax.set_xlabel("expert")
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("calibration tokens (0 drawn at 0.5)")
        fig.suptitle(f"expert coverage under routed calibration ({bits}-bit runs)")
        fig.tight_layout()
        fig.savefig(work / "coverage.png", dpi=120)
        plt.close(fig)
        written.append("coverage.png")
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in run["rows"]:
        if r["method"] == "gptq":
            ratio = [s["error"] / s["rtn_error"] if s["rtn_error"] else float("nan") for s in r["stage_errors"]]
            ax.plot(ratio, marker=".", lw=1, ls="-" if r["bits"] == bits else "--", label=r["name"])
    ticks = [f"{s['layer']}.{s['stage']}" for s in next(r for r in run["rows"] if r["method"] == "gptq")["stage_errors"]]
    ax.set_xticks(range(len(ticks)), ticks, rotation=90, fontsize=7)
    ax.set_xlabel("layer.stage")
    ax.set_ylabel("GPTQ error / RTN error (report)")
    ax.set_title("per-stage output error on the calibration tokens")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(work / "gptq_error.png", dpi=120)
    plt.close(fig)
    written.append("gptq_error.png")
    print(f"plots: {', '.join(str(work / w) for w in written)}")
    return written


# ----------------------------------------------------------------------------------------------
# one whole run
# ----------------------------------------------------------------------------------------------

def split_solvers(text: str) -> list[str]:
    """`gptq,gptaq-cd(alpha=0.5,sweeps=4)+act` -> its entries: commas inside an option list do not split."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            if text[start:i].strip():
                out.append(text[start:i].strip())
            start = i + 1
    return out


def solver_options(entry: str) -> tuple[str, bool]:
    """`NAME` or `NAME+act` -> (the --solver value, whether to use act order with static groups)."""
    name, plus, extra = entry.partition("+")
    if plus and extra != "act":
        raise SystemExit(f"--solvers {entry}: the only suffix is +act (activation order with static groups)")
    return name, bool(plus)


def one_run(args, corpus: dict, run_dir: Path, device: torch.device) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    model_dir = run_dir / "model"
    training = train(args, corpus, model_dir, device)
    heldout = fixed_windows(corpus["heldout"], args.eval_windows, args.seq_len)
    gen = torch.Generator().manual_seed(args.seed + 1)
    calib = random_windows(corpus["train"], max(args.calib_sizes), args.seq_len, gen).numpy()
    rows = []

    def evaluate(name, **row):
        t0 = time.perf_counter()
        model = load_model(model_dir, device)
        if row["method"] == "rtn":
            apply_rtn(model, QuantConfig(bits=row["bits"], group_size=args.group_size, scale_dtype="float16"))
        elif row["method"] == "llmcompressor":
            t1 = time.perf_counter()
            row |= apply_llmcompressor(model, calib[:row["calib"]], row["bits"], args.group_size, args.seq_len)
            row["quantize_seconds"] = time.perf_counter() - t1
        elif row["method"] == "gptq":
            load_gptq(model, row.pop("ckpt"))
        ppl = perplexity(model, heldout, device)
        rows.append({"name": name, **row, "ppl": ppl, "eval_seconds": time.perf_counter() - t0})
        print(f"  {name:28s} ppl {ppl:9.4f}", flush=True)
        del model

    evaluate("baseline (bf16)", method="baseline", bits=16)
    for bits in args.bits:
        evaluate(f"rtn w{bits} g{args.group_size}", method="rtn", bits=bits)
    for n in args.calib_sizes:
        np.save(run_dir / f"calib-{n}.npy", calib[:n])  # the first n windows: the sets are nested

    def quantized(solver, bits, policy, n, calib_file, draw=0):
        name, act = solver_options(solver)
        tag = f"{solver}-w{bits}-{policy.split('(')[0]}-c{n}" + (f"-draw{draw}" if draw else "")
        out = run_dir / "".join(c if c.isalnum() or c in "-." else "_" for c in tag)
        t0 = time.perf_counter()
        moedsl.quantize(model=model_dir, out=out, bits=bits, group_size=args.group_size, policy=policy,
                        samples=n, seq_len=args.seq_len, calib=calib_file, solver=name,
                        act_order=act, static_groups=act, device=str(device), seed=args.seed,
                        progress=False, overwrite=True, resume=False,
                        engine="none")  # read back here, not served: 3 bits too, without warnings
        seconds = time.perf_counter() - t0
        report = json.loads((out / "moedsl-report.json").read_text())
        evaluate(f"{solver} w{bits} {policy} c{n}" + (f" draw{draw}" if draw else ""), method="gptq", solver=solver,
                 bits=bits, policy=policy, calib=n, draw=draw, ckpt=out, quantize_seconds=seconds,
                 coverage=coverage(report), stage_errors=stage_errors(report))

    for bits in args.bits:
        for solver in args.solvers:
            for policy in args.policies:
                for n in args.calib_sizes:
                    quantized(solver, bits, policy, n, run_dir / f"calib-{n}.npy")
    # calibration-draw noise: the same solver on other windows of the same files, at the largest size
    n = max(args.calib_sizes)
    for draw in range(1, args.noise_draws + 1) if args.noise_solvers else ():
        other = random_windows(corpus["train"], n, args.seq_len, torch.Generator().manual_seed(args.seed + 1 + draw))
        np.save(run_dir / f"calib-{n}-draw{draw}.npy", other.numpy())
        for bits in args.bits:
            for solver in args.noise_solvers:
                quantized(solver, bits, args.policies[0], n, run_dir / f"calib-{n}-draw{draw}.npy", draw)
    if args.llmcompressor:  # the peer, side by side: same trained model, same calibration windows
        import importlib.util

        if importlib.util.find_spec("llmcompressor") is None:
            print("  llm-compressor is not installed: its rows are skipped")
        else:
            for bits in args.bits:
                n = max(args.calib_sizes)
                evaluate(f"llm-compressor w{bits} c{n}", method="llmcompressor", bits=bits, policy="all", calib=n)
    return {"training": training, "rows": rows}


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------

def summarize(results: dict) -> list[str]:
    runs = results["runs"]
    first = {r["name"]: r for r in runs[0]["rows"]}
    base = first["baseline (bf16)"]["ppl"]
    print()
    print(f"{'':34s}{'ppl':>10s}{'Δ vs base':>11s}{'gap closed':>12s}" + "".join(f"{'rep ' + str(k):>10s}"
                                                                              for k in range(1, len(runs))))
    for name, r in first.items():
        rtn = first.get(f"rtn w{r['bits']} g{results['settings']['group_size']}")
        closed = ""
        if r["method"] in ("gptq", "llmcompressor") and rtn and rtn["ppl"] > base:
            closed = f"{(rtn['ppl'] - r['ppl']) / (rtn['ppl'] - base):.0%}"
        reps = "".join(f"{next(x['ppl'] for x in run['rows'] if x['name'] == name):10.4f}" for run in runs[1:])
        print(f"{name:34s}{r['ppl']:10.4f}{r['ppl'] - base:+11.4f}{closed:>12s}{reps}")

    # expert coverage under routed calibration
    print("\nexpert coverage under routed calibration (experts with 0 / <16 tokens, per layer):")
    for r in runs[0]["rows"]:
        if r.get("policy") == "routed":
            cells = "  ".join(f"L{c['layer']}: {c['zero']}/{c[f'below_{STARVED}']}" for c in r["coverage"])
            print(f"  w{r['bits']} c{r['calib']:<5d} {cells}")

    # run-to-run noise, measured in this run: the same-seed spread of --repeat, and for each bit width the largest
    # spread of one --noise-solvers solver over its calibration draws; unmeasured, 0.1 % of the baseline ppl
    spread = None
    if len(runs) > 1:
        spread = max(abs(x["ppl"] - y["ppl"]) for run in runs[1:] for x, y in zip(runs[0]["rows"], run["rows"]))
    settings = results["settings"]
    draws: dict[tuple[str, int], list[float]] = {}
    for r in runs[0]["rows"]:
        if (r["method"] == "gptq" and r["solver"] in settings["noise_solvers"] and r["policy"] == settings["policies"][0]
                and r["calib"] == max(settings["calib_sizes"])):
            draws.setdefault((r["solver"], r["bits"]), []).append(r["ppl"])
    draw_spread = {}
    if draws:
        print(f"\ncalibration-draw noise ({settings['policies'][0]}, {max(settings['calib_sizes'])} seqs; "
              "draw 0 is the windows every other row uses):")
        for (solver, b), ppls in draws.items():
            ppls_t = torch.tensor(ppls, dtype=torch.float64)
            width = float(ppls_t.max() - ppls_t.min())
            draw_spread[b] = max(draw_spread.get(b, 0.0), width)
            print(f"  w{b} {solver:36s} " + "  ".join(f"{x:.4f}" for x in ppls) +
                  f"   spread {width:.4f}  std {float(ppls_t.std()):.4f}")

    def noise_at(b: int) -> float:
        measured = [x for x in (spread, draw_spread.get(b)) if x is not None]
        return max(measured) if measured else 0.001 * base

    def main_rows():  # the rows every comparison is made on: the shared calibration windows (draw 0)
        return (r for r in runs[0]["rows"] if r.get("draw", 0) == 0)

    checks = []
    print("\nchecks:")
    bits = 4 if 4 in results["settings"]["bits"] else results["settings"]["bits"][0]
    rtn = first[f"rtn w{bits} g{results['settings']['group_size']}"]["ppl"]
    for r in main_rows():
        if r["method"] == "gptq" and r["bits"] == bits:
            ok = (rtn - r["ppl"]) >= 0.5 * (rtn - base) if rtn > base else None
            verdict = {True: "PASS", False: "FAIL", None: "N/A (RTN is not worse than the baseline)"}[ok]
            solver = r.get("solver", "gptq")
            line = (f"{verdict}  {bits}-bit {solver} {r['policy']} c{r['calib']} closes >= half of "
                    f"RTN's gap: RTN {rtn:.4f}, {solver} {r['ppl']:.4f}, baseline {base:.4f}")
            checks.append({"check": f"gptq_closes_half_gap w{bits} {solver} {r['policy']} c{r['calib']}", "ok": ok})
            print("  " + line)
    n = min(results["settings"]["calib_sizes"])
    for b in results["settings"]["bits"]:
        a, rt = first.get(f"gptq w{b} all c{n}"), first.get(f"gptq w{b} routed c{n}")
        if a and rt:
            noise = noise_at(b)
            ok = a["ppl"] <= rt["ppl"] + noise
            checks.append({"check": f"all_le_routed w{b} c{n}", "ok": ok})
            print(f"  {'PASS' if ok else 'FAIL'}  {b}-bit, {n} calibration seqs: all {a['ppl']:.4f} <= routed "
                  f"{rt['ppl']:.4f} + noise {noise:.4f}")
    # solvers: none worse than gptq at the same settings; the best at the lowest bit width vs RTN's gap
    for r in main_rows():
        if r.get("solver", "gptq") != "gptq" and r["method"] == "gptq":
            ref = first.get(f"gptq w{r['bits']} {r['policy']} c{r['calib']}")
            if ref:
                noise = noise_at(r["bits"])
                ok = r["ppl"] <= ref["ppl"] + noise
                checks.append({"check": f"solver_not_worse w{r['bits']} {r['solver']} {r['policy']} c{r['calib']}",
                               "ok": ok})
                print(f"  {'PASS' if ok else 'FAIL'}  {r['bits']}-bit {r['solver']} {r['policy']} c{r['calib']}: "
                      f"{r['ppl']:.4f} <= gptq {ref['ppl']:.4f} + noise {noise:.4f}")
    low = min(results["settings"]["bits"])
    rtn_low = first.get(f"rtn w{low} g{results['settings']['group_size']}")
    solved = [r for r in main_rows() if r["method"] == "gptq" and r["bits"] == low]
    if rtn_low and solved and rtn_low["ppl"] > base:
        best = min(solved, key=lambda r: r["ppl"])
        closed = (rtn_low["ppl"] - best["ppl"]) / (rtn_low["ppl"] - base)
        checks.append({"check": f"best_closes_80 w{low}", "ok": closed >= 0.8, "closed": closed, "best": best["name"]})
        print(f"  {'PASS' if closed >= 0.8 else 'FAIL'}  {low}-bit: the best ({best['name']}) closes {closed:.0%} "
              f"of RTN's gap (>= 80%)")
    for peer in (r for r in runs[0]["rows"] if r["method"] == "llmcompressor"):
        ours = [r for r in main_rows() if r["method"] == "gptq" and r["bits"] == peer["bits"]]
        if ours:
            best = min(ours, key=lambda r: r["ppl"])
            noise = noise_at(peer["bits"])
            ok = best["ppl"] < peer["ppl"] - noise
            checks.append({"check": f"beats_llmcompressor w{peer['bits']}", "ok": ok, "best": best["name"]})
            print(f"  {'PASS' if ok else 'FAIL'}  {peer['bits']}-bit: best {best['name']} {best['ppl']:.4f} < "
                  f"{peer['name']} {peer['ppl']:.4f} − noise {noise:.4f}")
    if spread is None and not draw_spread:
        print("  run-to-run noise: not measured (pass --repeat 2 or --noise-solvers); taken as 0.1% of the "
              f"baseline ppl, {0.001 * base:.4f}")
    if spread is not None:
        print(f"  run-to-run spread over {len(runs)} runs (same seed): max |Δppl| = {spread:.4f}")
    for b, width in draw_spread.items():
        print(f"  {b}-bit calibration-draw spread: max over {', '.join(settings['noise_solvers'])} = {width:.4f}")
    results["spread"] = spread
    results["draw_spread"] = draw_spread
    results["noise"] = {b: noise_at(b) for b in settings["bits"]}
    results["checks"] = checks
    return checks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a shrunk model and run (about a minute on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, default=Path(".bench-out/quality"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                   help="allow nondeterministic CUDA kernels (faster; runs with the same seed then differ)")
    p.add_argument("--repeat", type=int, default=1, help="run everything N times with the same seed")
    p.add_argument("--train-steps", type=int)
    p.add_argument("--batch", type=int, help="training sequences per step")
    p.add_argument("--seq-len", type=int, help="tokens per training, held-out and calibration window")
    p.add_argument("--lr", type=float)
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-windows", type=int, help="held-out windows")
    p.add_argument("--calib-sizes", help="calibration sequences per GPTQ run, comma-separated (default 16,256)")
    p.add_argument("--bits", help="comma-separated (default 4,3)")
    p.add_argument("--policies", help="comma-separated: routed, all, auto (= auto(min_tokens=--auto-min-tokens))")
    p.add_argument("--auto-min-tokens", type=int, help="default: the hidden size (an expert seeing fewer tokens "
                                                       "has a rank-deficient gate/up Hessian)")
    p.add_argument("--group-size", type=int)
    p.add_argument("--no-llmcompressor", dest="llmcompressor", action="store_false",
                   help="skip llm-compressor's GPTQ even when it is installed")
    p.add_argument("--solvers", help="comma-separated moedsl solvers to compare (default gptq; e.g. gptq,mse,gptaq,"
                                     "gptaq-mse+act; +act: activation order with static groups)")
    p.add_argument("--noise-solvers", help="comma-separated --solvers entries to quantize again on --noise-draws other "
                                           "calibration draws (first policy, largest size): the spread is the noise "
                                           "the checks use")
    p.add_argument("--noise-draws", type=int, help="extra calibration draws per noise solver (default 2)")
    p.add_argument("--solver-sweep", action="store_true",
                   help=f"compare the solvers: {SWEEP['solvers']} under {SWEEP['policies']} with {SWEEP['calib_sizes']} "
                        "calibration sequences (explicit --solvers/--policies/--calib-sizes win)")
    args = p.parse_args(argv)
    preset = SMALL if args.small else FULL
    if args.solver_sweep:
        preset = {**preset, **SWEEP}
    args.shape = preset["model"]
    for key, value in preset.items():
        if key != "model" and getattr(args, key) is None:
            setattr(args, key, value)
    args.calib_sizes = [int(x) for x in str(args.calib_sizes).split(",")]
    args.bits = [int(x) for x in str(args.bits).split(",")]
    args.solvers = split_solvers(args.solvers)
    args.noise_solvers = split_solvers(args.noise_solvers)
    min_tokens = args.auto_min_tokens or args.shape["hidden_size"]
    args.policies = [f"auto(min_tokens={min_tokens})" if x.strip() == "auto" else x.strip()
                     for x in str(args.policies).split(",")]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and args.deterministic:
        # same seed, same numbers: without this, atomics in the backward pass make two trainings differ by
        # more than 4-bit quantization costs (measured: 0.0095 ppl between two same-seed runs)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {"settings": settings, "data": {k: corpus[k] for k in ("root", "files", "heldout_files")} |
               {"train_tokens": len(corpus["train"]), "heldout_tokens": len(corpus["heldout"])}, "runs": []}
    for r in range(args.repeat):
        print(f"\n=== run {r + 1}/{args.repeat} (seed {args.seed}) ===")
        results["runs"].append(one_run(args, corpus, args.work / f"run{r}", device))
    summarize(results)
    results["plots"] = plot(results, args.work)
    results["seconds"] = time.perf_counter() - t_start
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.work / 'results.json'} ({results['seconds']:.0f}s in all)")
    return results


if __name__ == "__main__":
    main()

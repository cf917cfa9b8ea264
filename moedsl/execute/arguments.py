"""The command-line arguments of `moedsl quantize`.

Kept free of torch (and of everything that imports it) so that building the `moedsl` argument
parser — which every command does, `fmt` and `--help` included — stays fast. The options they
fill are `moedsl.execute.options.QuantizeOptions`, which re-exports `add_quantize_arguments`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


TRUST_HELP = ("let a model directory run its own modeling code (the configuration_*.py / modeling_*.py that "
              "config.json's auto_map names), in this process, as transformers' trust_remote_code=True does")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="a local Hugging Face model directory (default: the built-in tiny MoE)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--out", type=Path, default=Path("moedsl-out"), help="output directory (default: moedsl-out)")
    p.add_argument("--def", dest="definition", help="a .moedef file or library name (default: chosen by model_type)")
    p.add_argument("--calib", type=Path, help="calibration data: .jsonl/.npy/.safetensors token ids, or a text file")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="-1 for one group per row")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--damp", dest="damp_percent", type=float, default=0.01)
    p.add_argument("--solver", default="gptq",
                   help="what quantizes each weight: gptq (default), rtn, mse, gptaq, gptaq-mse, gptaq(alpha=A), or "
                        "your own as file.py:Name or module:Name (docs/solvers.md)")
    p.add_argument("--policy", default="routed", help="MoE calibration: routed | all | topk=N | auto(min_tokens=N)")
    p.add_argument("--format", default="gptq", choices=["gptq", "compressed-tensors"])
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "none"],
                   help="the serving engine the checkpoint is for: auto (default) writes vLLM's names and warns "
                        "before quantizing of what vLLM would not load; vllm refuses that instead; none: only what "
                        "the format can store")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if a partial run is there")
    p.add_argument("--resume-interval", type=float, default=60.0, metavar="SECONDS",
                   help="how often the run records where it is, so that a killed run resumes there: at most every "
                        "SECONDS (default 60; 0: after every layer). A kill redoes the layers since the last record; "
                        "fewer records spare the disk a layer's activations per layer")
    p.add_argument("--overwrite", action="store_true", help="replace a finished output directory")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--activations", default="auto", choices=["auto", "device", "cpu"],
                   help="where the calibration activations live between layers: on the device when they fit "
                        "(auto, the default), always on the device, or in host memory")
    p.add_argument("--pipeline", default="overlap", choices=["overlap", "serial"],
                   help="overlap (the default): read the next layer and write the previous one while a layer is "
                        "quantized; serial: each step to completion before the next, for the least memory. "
                        "Both write the same bytes")
    p.add_argument("--expert-blocks", type=int, default=None, metavar="K",
                   help="split each MoE layer's experts into K fixed blocks (default: one per rank, so 1 in one "
                        "process); under torchrun each rank owns whole blocks. The output may depend on K slightly, "
                        "never on the number of ranks: a run on N ranks writes the bytes of a one-process run "
                        "with the same K (docs/distributed.md)")
    p.add_argument("--allow-missing-weights", action="store_true",
                   help="initialize parameters the checkpoint lacks as from_pretrained would (random weights), "
                        "with a warning in the report, instead of refusing the run")
    p.add_argument("--allow-unused-weights", action="store_true",
                   help="ignore checkpoint tensors that no parameter of the model takes (e.g. a config with fewer "
                        "layers than the checkpoint), with a warning in the report, instead of refusing the run")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also GPTQ-quantize lm_head, on the final-norm outputs of the calibration data")

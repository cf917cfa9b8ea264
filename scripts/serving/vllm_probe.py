"""Load one quantized checkpoint in vLLM (CPU build) and report what it did with it (JSON on stdout).

Runs inside the vLLM venv that scripts/check-serving.sh builds; it never imports moedsl.

    python vllm_probe.py CHECKPOINT_DIR OUT_DIR TOKEN_IDS_JSON

What it reports (OUT_DIR/vllm.json, and OUT_DIR/vllm-experts.safetensors):
  * `error`: vLLM's own exception text when construction or loading failed;
  * `tensors`, `unused`: the checkpoint tensors vLLM's loader was handed, and those it never
    touched. vLLM's `load_weights` skips names it does not map without a word, so every yielded
    tensor is wrapped and counts as used once any real tensor operation reads it;
  * `uninitialized`: model parameters no checkpoint tensor was loaded into (vLLM's own
    `track_weights_loading` check, less the parameters its quantization methods drop or default);
  * `mode`: "run" when vLLM's CPU int4 MoE kernel runs here, then `logprobs` of the prompt;
    "load" when it cannot (it needs AMX on x86, SiLU and plain top-k routing): the model is built
    and loaded with the kernel's device check bypassed and nothing is run;
  * the routed experts as vLLM loaded them, dequantized from its own stacked parameters
    (`<module>.w13` [E, 2N, K] in vLLM's gate/up order, `<module>.w2` [E, K, N]), before any
    kernel-specific repacking, so the caller can compare them with what was quantized.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, where we can see it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# on by default, and an SM100 GPU kernel (cute_dsl): kimi_linear's class imports it at construction, which on CPU
# fails with "No module named 'cutlass'"; vLLM's own log names this switch
os.environ.setdefault("VLLM_KIMI_K3_GEMM_AR", "0")

import torch  # noqa: E402

# parameters a checkpoint need not carry: kv-cache quantization defaults, and expert biases that
# vLLM's int4 MoE methods drop after loading when the checkpoint has none
DEFAULTED = (".attn.k_scale", ".attn.v_scale", ".attn.q_scale", ".attn.k_zero_point", ".attn.v_zero_point",
             ".attn.q_zero_point", ".w13_bias", ".w2_bias",
             ".w13_weight_shape", ".w2_weight_shape")  # registered by the compressed-tensors MoE method, never read
METADATA_OPS = {"__get__", "size", "dim", "numel", "stride", "element_size", "is_contiguous", "data_ptr",
                "__len__", "__repr__", "__format__", "untyped_storage", "is_floating_point", "get_device"}


class Stop(Exception):
    """Raised after loading in "load" mode: nothing is run."""


def main() -> None:
    ckpt, out_dir, ids_json = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = json.loads(ids_json)
    os.makedirs(out_dir, exist_ok=True)
    amx = torch.cpu._is_amx_tile_supported()
    report = run(ckpt, out_dir, ids, mode="run" if amx else "load")
    if report.get("error", "").startswith("NotImplementedError: No WNA16 MoE backend") and amx:
        first = report["error"]
        report = run(ckpt, out_dir, ids, mode="load")
        report["kernel_error"] = first
    with open(os.path.join(out_dir, "vllm.json"), "w") as f:
        json.dump(report, f, indent=1)


def run(ckpt: str, out_dir: str, ids: list[int], mode: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader import default_loader

    used: set[str] = set()
    yielded: list[str] = []

    class Tracked(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name not in METADATA_OPS:
                for a in list(args) + list((kwargs or {}).values()):
                    origin = getattr(a, "_origin", None) if isinstance(a, Tracked) else None
                    if origin is not None:
                        used.add(origin)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    report: dict = {"mode": mode}
    loader_cls = default_loader.DefaultModelLoader
    original = loader_cls.load_weights

    def load_weights(self, model, model_config):
        get_all = self.get_all_weights

        def tracked(mc, m):
            for name, t in get_all(mc, m):
                yielded.append(name)
                w = t.as_subclass(Tracked)
                w._origin = name
                yield name, w

        self.get_all_weights = tracked
        loaded: dict[int, str] = {}
        params = dict(model.named_parameters())

        def wrap(p, fn):
            def loader(*a, **k):
                loaded[id(p)] = True
                return fn(*a, **k)
            return loader

        from vllm.model_executor.model_loader.weight_utils import default_weight_loader
        copies = {}
        for n, p in params.items():
            p.weight_loader = wrap(p, getattr(p, "weight_loader", default_weight_loader))
            copies[n] = p.detach().clone() if p.numel() else None
        original(self, model, model_config)
        # a parameter counts as initialized if a loader was called for it or its data changed
        report["uninitialized"] = sorted(
            n for n, p in params.items()
            if id(p) not in loaded and p.numel() and copies[n] is not None and torch.equal(copies[n], p.detach())
            and not n.endswith(DEFAULTED))
        report["tensors"] = len(yielded)
        report["unused"] = sorted(set(yielded) - used)
        experts = dequantized_experts(model)
        if experts:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in experts[0].items()}, os.path.join(out_dir, "vllm-experts.safetensors"))
            report["experts"] = experts[1]
        if mode == "load":
            raise Stop

    loader_cls.load_weights = load_weights
    scan_kernel_overrides_safely()
    if mode == "load":
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
        k = cpu_moe.CPUExpertsInt4
        k._supports_current_device = staticmethod(lambda: True)
        k._supports_activation = staticmethod(lambda activation: True)
        k._supports_routing_method = staticmethod(lambda *a: True)
    try:
        # prefix caching off: one prompt has no prefix to reuse, and for hybrid mamba models with MLA (kimi_linear)
        # vLLM's CPU build otherwise refuses its own defaults: the mamba block size is aligned for prefix caching,
        # then the CPU platform turns caching off for MLA, and the config check fails with "--mamba-block-size can
        # only be set with --enable-prefix-caching" (vllm/platforms/cpu.py, vllm/config/vllm.py)
        llm = LLM(model=ckpt, dtype="bfloat16", enforce_eager=True, max_model_len=max(64, len(ids) + 8),
                  gpu_memory_utilization=0.15, seed=0, enable_prefix_caching=False)
    except Stop:
        return report
    except Exception as exc:  # the engine's own error is the finding
        traceback.print_exc()  # into the probe's log, beside the one-line finding
        report["error"] = f"{type(exc).__name__}: {engine_message(exc)}"
        return report
    finally:
        loader_cls.load_weights = original
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))
    report["logprobs"] = [d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])]
    return report


def scan_kernel_overrides_safely() -> None:
    """vLLM's CPU build (no Triton) swaps in C++ kernels at worker start by scanning every module in
    `sys.modules` and calling `vars()` on each attribute that has a `__dict__`. llvmlite's ffi `lib` (imported
    with numba, which vLLM's kimi_k3 module pulls in through vllm.utils.jit_monitor) answers any attribute, so
    `vars(lib)` is not a mapping and the scan dies with "AttributeError: '_lib_fn_wrapper' object has no
    attribute 'get'" (vllm/triton_utils/dispatcher.py) before the model is built; the GPU build never scans.
    Such modules hold no vLLM kernel: they are hidden from the scan, so the checkpoint can be checked."""
    from vllm.platforms.cpu import CpuPlatform

    scan = CpuPlatform.register_triton_kernel_overrides.__func__

    def unscannable(module) -> bool:
        for value in list((getattr(module, "__dict__", None) or {}).values()):
            try:
                if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                    return True
            except Exception:
                return True
        return False

    def register(cls) -> None:
        hidden = {name: m for name, m in list(sys.modules.items()) if unscannable(m)}
        for name in hidden:
            del sys.modules[name]
        try:
            scan(cls)
        finally:
            sys.modules.update(hidden)

    CpuPlatform.register_triton_kernel_overrides = classmethod(register)


def engine_message(exc: Exception) -> str:
    """The line of vLLM's error that says what is wrong (pydantic wraps config errors in boilerplate)."""
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    # transformers' missing-backend ImportError: "X requires the Torchvision library but it was not found in your
    # environment. Check out the instructions on the\ninstallation page: ..."
    backend = re.search(r"\S+ requires the \S+ library but it was not found in your environment", " ".join(lines))
    if backend:
        return backend.group(0)
    for line in lines:
        if line.startswith("Value error,"):
            return line.removeprefix("Value error,").split(" [type=")[0].strip()
    return next((l for l in reversed(lines) if not l.startswith("For further information")), "")


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> codes, value j of a word at shift bits·j, along `dim`."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.movedim(dim, -1)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2).movedim(-1, dim)


def dequantized_experts(model) -> tuple[dict, dict] | None:
    """Every routed-experts module's w13/w2 as loaded, dequantized to [E, out, in] float32."""
    tensors, info = {}, {}
    for name, m in model.named_modules():
        p = dict(m.named_parameters(recurse=False))
        if "w13_qweight" in p:  # GPTQ MoE: qweight [E, in/pack, out], scales/qzeros [E, G, out]
            qc = getattr(m.quant_method, "quant_config", None)
            bits = getattr(qc, "weight_bits", 4)
            w = {}
            for part in ("w13", "w2"):
                q = _unpack(p[f"{part}_qweight"].detach(), bits, 1)
                s = p[f"{part}_scales"].detach().float()
                z = _unpack(p[f"{part}_qzeros"].detach(), bits, 2) + 1 if p[f"{part}_qzeros"].numel() else None
                k = q.shape[1]
                g = torch.arange(k) // (k // s.shape[1])
                zero = z[:, g] if z is not None else 2 ** (bits - 1)
                w[part] = ((q - zero) * s[:, g]).transpose(1, 2)
        elif "w13_weight_packed" in p:  # compressed-tensors: packed [E, out, in/pack], scale [E, out, G]
            bits = 32 * p["w13_weight_packed"].shape[2] // p["w2_weight_packed"].shape[1]  # K·bits/32 words of K
            w = {}
            for part in ("w13", "w2"):
                q = _unpack(p[f"{part}_weight_packed"].detach(), bits, 2)
                s = p[f"{part}_weight_scale"].detach().float()
                k = q.shape[2]
                g = torch.arange(k) // (k // s.shape[2])
                w[part] = (q - 2 ** (bits - 1)) * s[:, :, g]
        else:
            continue
        activation = str(getattr(getattr(m, "moe_config", None), "activation", getattr(m, "activation", "")))
        for part, t in w.items():
            tensors[f"{name}.{part}"] = t.float()
        info[name] = {"activation": activation}
    return (tensors, info) if tensors else None


if __name__ == "__main__":
    main()

"""Load one compressed-tensors checkpoint in transformers + compressed-tensors; report JSON.

Runs inside the venv that scripts/check-serving.sh builds (transformers + compressed-tensors 0.20);
it never imports moedsl.

    python hf_probe.py CHECKPOINT_DIR OUT_DIR TOKEN_IDS_JSON

OUT_DIR/hf.json: `unused` (checkpoint tensors transformers did not map: its "unexpected keys"),
`uninitialized` (parameters left at their random init: its "missing keys"), `logprobs` of the
prompt, `ran` (the class whose forward gave them: `logits_model`), or `error` (transformers' own
exception; for a composite without a forward, `logprobs_decompressed` too: `behind_the_hook`).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch


def multimodal_class(model_type: str | None):
    """transformers' multimodal LM class for `model_type`, or None (a text model)."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping in ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
        name = getattr(modeling_auto, mapping, {}).get(model_type or "")
        if name and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    return None


def logits_model(model):
    """The module whose forward gives the logits: the model itself, or, for a composite with no forward of
    its own (Qwen3-Omni's `…ForConditionalGeneration` holds a thinker, which reads and writes text, and a
    talker, which speaks; its forward is torch's `_forward_unimplemented`), its first sub-model with an
    output head and a forward: the thinker, as transformers' own `generate` of that class runs it. And a
    composite whose language model is a complete causal LM of its own (Llama-4's wrapper embeds any images
    and calls its `Llama4ForCausalLM`): that causal LM, the same computation for a text prompt, since the
    wrapper's own forward fails in transformers 5.24 after it (it reads `image_outputs` off the causal LM's
    output, which has none)."""
    language = getattr(model, "language_model", None)
    if (isinstance(language, torch.nn.Module) and language is not model and hasattr(language, "get_output_embeddings")
            and language.get_output_embeddings() is not None):
        return language
    if type(model).forward is not torch.nn.Module.forward:
        return model
    for child in model.children():
        if (type(child).forward is not torch.nn.Module.forward and hasattr(child, "get_output_embeddings")
                and child.get_output_embeddings() is not None):
            return child
    raise TypeError(f"{type(model).__name__} has no forward of its own and no sub-model with an output head")


@torch.no_grad()
def prompt_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t+1] | ids[:t+1]) for every position of the prompt, run through `logits_model`."""
    lp = torch.log_softmax(logits_model(model)(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]


def one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def behind_the_hook(report: dict, model, ids: list[int]) -> None:
    """compressed-tensors decompresses a loaded model in a forward pre-hook of the model transformers loaded
    (ModelCompressor.add_decompress_hook), on its first forward. A composite with no forward of its own never
    fires it: its thinker runs on the still-packed layers (`'Linear' object has no attribute 'weight'`). Where that
    is what failed, `logprobs_decompressed` are the log-probs after compressed-tensors' own `decompress_model`,
    so that the checkpoint behind that limit is checked too (`decompressed_error`, if even that fails)."""
    if getattr(model, "ct_decompress_hook", None) is None or logits_model(model) is model:
        return
    try:
        model.hf_quantizer.compressor.decompress_model(model)
        report["logprobs_decompressed"] = prompt_logprobs(model, ids)
    except Exception as exc:
        traceback.print_exc()
        report["decompressed_error"] = one_line(exc)


def main() -> None:
    ckpt, out_dir, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.makedirs(out_dir, exist_ok=True)
    report: dict = {}
    model = None
    try:
        import compressed_tensors
        from transformers import AutoModelForCausalLM

        report["versions"] = {"compressed_tensors": compressed_tensors.__version__,
                              "transformers": __import__("transformers").__version__}
        import transformers

        # the class the checkpoint was saved from (a composite's `…ForConditionalGeneration`); where config.json
        # names vLLM's class instead (moedsl writes the name vLLM registers: Kimi-K2.5's, Unlimited-OCR's), the
        # multimodal class transformers maps the model_type to; else the causal LM
        with open(os.path.join(ckpt, "config.json")) as f:
            config = json.load(f)
        arch = (config.get("architectures") or [""])[0]
        cls = getattr(transformers, arch, None) or multimodal_class(config.get("model_type")) or AutoModelForCausalLM
        model, info = cls.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
        report["unused"] = sorted(info.get("unexpected_keys", []))
        report["uninitialized"] = sorted(info.get("missing_keys", []))
        report["mismatched"] = sorted(str(k) for k in info.get("mismatched_keys", []))
        model.eval()
        report["ran"] = type(logits_model(model)).__name__
        report["logprobs"] = prompt_logprobs(model, ids)
    except Exception as exc:  # the library's own error is the finding
        traceback.print_exc()  # into the probe's log, beside the one-line finding
        report["error"] = one_line(exc)
        behind_the_hook(report, model, ids)
    with open(os.path.join(out_dir, "hf.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

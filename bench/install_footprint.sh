#!/usr/bin/env bash
# Install footprint of each install path (issue 11): fresh venvs, `du -sm`, the biggest packages.
#   bench/install_footprint.sh [CPU_TORCH_WHEEL] > bench/results/install_footprint.txt
# Without a wheel argument the CPU build comes from PyTorch's CPU index. pip's own configuration is
# ignored (PIP_CONFIG_FILE=/dev/null, no PIP_FIND_LINKS), so local wheel folders or constraints of the
# measuring machine do not change what a user would get. Downloads about 3.5 GB; needs ~8 GB of disk.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-$(mktemp -d)}
py=${PYTHON:-python3}
cpu_torch=${1:-}
plain() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
size() { du -sm "$1" | cut -f1; }
top() { du -sm "$1"/lib/python3*/site-packages/* | sort -n | tail -8; }

echo "machine: $(uname -sm), $("$py" --version)"
"$py" -m venv "$work/cpu"
if [ -n "$cpu_torch" ]; then plain "$work/cpu/bin/pip" install -q --no-cache-dir "$cpu_torch"
else plain "$work/cpu/bin/pip" install -q --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu; fi
plain "$work/cpu/bin/pip" install -q --no-cache-dir -e "$root"
echo "CPU torch first, then pip install -e .: $(size "$work/cpu") MiB; $("$work/cpu/bin/pip" list 2>/dev/null | grep -i '^torch ')"
top "$work/cpu"
plain "$work/cpu/bin/pip" install -q --no-cache-dir -e "$root[api]"
echo "  + [api]: $(size "$work/cpu") MiB"

"$py" -m venv "$work/default"
plain "$work/default/bin/pip" install -q --no-cache-dir -e "$root"
echo "pip install -e .: $(size "$work/default") MiB; $("$work/default/bin/pip" list 2>/dev/null | grep -i '^torch '); nvidia-* packages: $("$work/default/bin/pip" list 2>/dev/null | grep -ci '^nvidia')"
top "$work/default"

# What install.py adds inside A1111 1.10 (Python 3.10; the WebUI already has torch, transformers, ...).
py310=${PYTHON310:-python3.10}
if command -v "$py310" >/dev/null; then
  plain "$py310" -m pip install -q --no-cache-dir --no-deps --target "$work/webui-adds" diffusers==0.31.0 \
    peft==0.13.2 onnxruntime coloredlogs humanfriendly flatbuffers
  echo "A1111 1.10, what install.py adds: $(size "$work/webui-adds") MiB ($(ls "$work/webui-adds" | grep dist-info | sed 's/.dist-info//' | tr '\n' ' '))"
fi
[ -z "${WORK:-}" ] && rm -rf "$work"

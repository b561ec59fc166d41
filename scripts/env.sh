# Source this file: creates (or refreshes) the project's virtual environment and activates it.
#   . scripts/env.sh
# The venv lives outside the repository (default ~/.cache/tta_norm/venv, override with TTA_NORM_VENV) so that
# fresh clones reuse the multi-GB PyTorch install. The optional extras the tests exercise (timm, ray, tensorboard)
# are installed here too. It is refreshed whenever pyproject.toml or the pinned
# versions below change; the project itself is installed editable from the current checkout.
set -e
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${TTA_NORM_VENV:-$HOME/.cache/tta_norm/venv}"
_python="${TTA_NORM_PYTHON:-python3}"
# torch/torchvision pins known to install offline on the project's machines (Python 3.11, x86_64).
_torch_pins="torch==2.14.1 torchvision==0.29.1"
if [ ! -x "$_venv/bin/python" ]; then
    echo "[env] creating virtual environment in $_venv" >&2
    mkdir -p "$(dirname "$_venv")"
    "$_python" -m venv "$_venv"
fi
_stamp_want="$( (cat "$_root/pyproject.toml"; echo "$_torch_pins"; echo "$_root") | sha256sum | cut -c1-16)"
_stamp_file="$_venv/.tta_norm_stamp"
if [ "$(cat "$_stamp_file" 2>/dev/null)" != "$_stamp_want" ]; then
    echo "[env] installing dependencies into $_venv (first run takes a few minutes)" >&2
    "$_venv/bin/python" -m pip install -q $_torch_pins
    "$_venv/bin/python" -m pip install -q -e "$_root[dev,corruptions,timm,ray,tensorboard]"
    echo "$_stamp_want" > "$_stamp_file"
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
set +e

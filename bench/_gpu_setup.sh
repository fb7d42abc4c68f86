# Sourced by bench/gpu.sh and bench/gpu_probe.sh on the GPU machine: carried wheels, the project, versions.
log() { echo "[${0##*/} +${SECONDS}s] $*"; }
export PYTHONUNBUFFERED=1
log "setup"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# fastcache.kernels lives in the top-level kernels/ folder (setuptools package-dir): an editable install maps
# it; if that fails, a copy of the package with kernels/ in place goes on PYTHONPATH.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || ! python3 -c "import fastcache.kernels" 2> /dev/null; then
  log "editable install failed: copying the package to /tmp/fastcache-src"
  rm -rf /tmp/fastcache-src && mkdir -p /tmp/fastcache-src
  cp -r fastcache /tmp/fastcache-src/ && cp -r kernels /tmp/fastcache-src/fastcache/kernels
  export PYTHONPATH="/tmp/fastcache-src:${PYTHONPATH:-}"
fi

log "versions"
nvidia-smi -L || true
python3 - << 'PY'
import platform

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
for name in ("triton", "diffusers", "fastcache"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
    except Exception as error:
        print(f"{name}: not importable ({type(error).__name__}: {error})")
PY

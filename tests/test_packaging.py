"""Import hygiene: `fastcache.kernels` comes from the repo's kernels/ folder, no top-level `kernels` is
shipped, and importing fastcache (and its diffusers front door) does not import diffusers and changes no
global torch setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
before = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype(),
          torch._dynamo.config.recompile_limit, torch._inductor.config.max_autotune)
import fastcache, fastcache.kernels, fastcache.diffusers
after = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.get_default_dtype(),
         torch._dynamo.config.recompile_limit, torch._inductor.config.max_autotune)
print(fastcache.kernels.__file__)
print("diffusers" in sys.modules, before == after)
"""


def test_import_is_light_and_changes_no_global_setting() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent / "tests")
    kernels_file, flags = result.stdout.strip().splitlines()
    assert Path(kernels_file).parent.name == "kernels"
    assert flags == "False True"


def test_the_package_ships_kernels_under_fastcache_only() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert '"fastcache.kernels" = "kernels"' in pyproject
    assert '"kernels"' not in pyproject.split("[tool.setuptools]")[1].split("packages =")[1].split("]")[0]

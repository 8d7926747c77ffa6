#!/usr/bin/env bash
# Wheels the GPU image lacks, fetched here (where PyPI is reachable) into wheels/, which is
# ignored by git and carried to the GPU machine (run's `carry: ["wheels"]`, 64 MiB in all).
# benchmarks/gpu_check.py installs them there with pip --no-index --no-deps into a scratch
# folder. Default: tokamax and those of its import-time requirements the image does not hold
# (it has jax/jaxlib 0.11.2, flax, numpy, absl-py, tqdm; tokamax needs jax >= 0.11.1, so it
# cannot go into CI's jax 0.10.2 venv).
#
#   bash benchmarks/prepare_gpu_wheels.sh                 # the default list
#   bash benchmarks/prepare_gpu_wheels.sh somepkg==1.2    # other packages instead
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=wheels
if [ "$#" -gt 0 ]; then
  PKGS=("$@")
else
  PKGS=(tokamax einshape jaxtyping wadler-lindig qwix immutabledict pydantic pydantic-core
        annotated-types typing-inspection)
fi
PY=${PYTHON:-python3}
# The image's Python (3.12, x86_64 Linux): every platform tag its pip accepts, since pip
# does not widen one --platform to the older manylinux tags most wheels carry.
TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
mkdir -p "$DEST"
"$PY" -m pip download --no-deps "${TAGS[@]}" -d "$DEST" "${PKGS[@]}"
# --no-deps takes each package's newest release; where another wheel pins it exactly
# (pydantic pins pydantic-core), fetch that version and drop the other.
"$PY" - "$DEST" "${TAGS[@]}" <<'EOF'
import re, subprocess, sys, zipfile
from pathlib import Path

dest, tags = Path(sys.argv[1]), sys.argv[2:]
def name(w): return re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
wheels = {name(w): w for w in dest.glob("*.whl")}
for w in list(wheels.values()):
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            m = re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)\s*\(?==\s*([^\s;,)]+)\)?$", line)
            if not m:
                continue
            dep, version = re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(2)
            have = wheels.get(dep)
            if have is not None and f"-{version}-" not in have.name:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *tags,
                                "-d", str(dest), f"{dep}=={version}"], check=True)
                have.unlink()
EOF
ls -l "$DEST"
du -sh "$DEST"
echo "carry it: run(..., carry=[\"$DEST\"]); gpu_check installs it (64 MiB limit for all carried paths)"

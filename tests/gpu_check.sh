#!/usr/bin/env bash
# The CUDA path, on a machine with a GPU: each script for a few iterations on --device cuda, the
# benchmark's settings on CUDA, and a 2-GPU torchrun when two GPUs are present. Prints what it saw.
#   bash tests/gpu_check.sh            (from the repository root, in the project's environment)
set -uo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
run() {     # run NAME COMMAND...: one line per check, the tail of its output on failure
    local name=$1; shift
    local start=$SECONDS
    if "$@" > "$work/$name.log" 2>&1; then
        echo "ok    $name ($((SECONDS - start)) s): $(grep -v '^\s*$' "$work/$name.log" | tail -1 | cut -c1-150)"
    else
        echo "FAIL  $name ($((SECONDS - start)) s)"; tail -15 "$work/$name.log"; status=1
    fi
}

python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB")
EOF
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: nothing to check"; exit 1; }

# a tiny Omniglot-layout folder, as the tests build it (no download)
python - "$work" <<'EOF'
import sys
sys.path.insert(0, "tests")
from conftest import make_omniglot
make_omniglot(__import__("pathlib").Path(sys.argv[1]) / "omniglot", characters=20, drawings=20)
EOF
export XDG_CACHE_HOME="$work/cache"
omni=(--dataset omniglot --data-dir "$work/omniglot" --ways 3 --iterations 5 --val-tasks 4 --test-tasks 8 --device cuda)
run maml-sinusoid      python maml.py --iterations 200 --test-tasks 50 --device cuda
run maml-omniglot      python maml.py "${omni[@]}"
run fomaml-omniglot    python maml.py "${omni[@]}" --first-order
run anil-omniglot      python anil.py "${omni[@]}"
run nil-omniglot       python nil.py "${omni[@]}"
run reptile-omniglot   python reptile.py "${omni[@]}"
run reptile-sinusoid   python reptile.py --iterations 50 --test-tasks 20 --device cuda
run maml-navigation2d  python maml.py --env navigation2d --iterations 2 --meta-batch-size 4 --episodes 5 \
                           --val-tasks 2 --test-tasks 2 --device cuda
run benchmark          python tests/benchmark.py --device cuda --no-memory
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    run torchrun-2gpu  torchrun --standalone --nproc_per_node=2 maml.py --dataset omniglot --data-dir "$work/omniglot" \
                           --ways 3 --iterations 5 --meta-batch-size 4 --val-tasks 4 --test-tasks 8 --device cuda
else
    echo "skip  torchrun-2gpu: one GPU"
fi
cat "$work/benchmark.log" 2>/dev/null | tail -40
exit $status

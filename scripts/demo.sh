#!/usr/bin/env bash
# The offline demo: the real dvc.yaml stages on a small E2E sample and a small GPT-2, on a 2-core CPU.
#
# Builds a fresh git + DVC workspace in $1 (default: demo/), pretrains the small base model there
# (stages/tools/tiny_base.py: GPT-2 Medium's stand-in), then runs the pipeline (`dvc repro`) with the overrides below
# and commits the result as the workspace's baseline, so that afterwards, in that workspace,
#   dvc exp run -S lora.rank=8   reruns only train-lora@110, generate-lora@110, score-lora@110 and report,
#   dvc metrics diff             shows what that changed, and dvc exp show lists both runs.
set -euo pipefail
export DVC_NO_ANALYTICS=1  # no usage reports from an offline demo
here=$(cd "$(dirname "$0")/.." && pwd)
ws=${1:-$here/demo}
start=$SECONDS

# The sample's splits are small, so: 2 epochs in both recipes, a short warm-up, and higher learning rates than the
# paper's (which are tuned for 42k examples x 5 epochs on GPT-2 Medium). Everything else is params.yaml's default.
overrides=(
  data.source=data/sample
  model.source=base-model
  'train.seeds=[110]'
  authors.train.epochs=2
  authors.train.warmup_steps=20
  li_liang.train.epochs=2
  lora.lr=0.005
  full.lr=0.0005
  runtime.generate_batch_size=20
)
# Tests shrink the demo further through these two (space-separated): extra overrides, extra tiny_base args.
read -r -a extra <<< "${DEMO_OVERRIDES:-}"
read -r -a base_args <<< "${DEMO_BASE_ARGS:-}"
overrides+=("${extra[@]}")

if [ -e "$ws" ] && [ ! -e "$ws/.lora-e2e-demo" ]; then
  echo "demo: $ws exists and is not a demo workspace; refusing to delete it" >&2
  exit 2
fi
rm -rf "$ws"
mkdir -p "$ws/data"
touch "$ws/.lora-e2e-demo"
cp -r "$here/stages" "$here/dvc.yaml" "$here/params.yaml" "$ws/"
cp -r "$here/data/sample" "$ws/data/sample"
cd "$ws"
find stages -name __pycache__ -prune -exec rm -rf {} +
printf '/base-model/\n/checkpoints/\n__pycache__/\n' > .gitignore
git init -q
git config user.email demo@localhost
git config user.name demo
dvc init -q
cp "$here/.dvcignore" .dvcignore  # byte code and editor files are not sources: `dvc status` stays clean
dvc config core.autostage true
dvc config core.analytics false
cp -r "$here/.dvc/plots" .dvc/plots  # DVC's plots page with Vega inlined: `dvc plots show` renders offline
dvc config plots.html_template plots/offline.html
git add -A
git commit -qm "Pipeline as shipped (paper defaults)"

echo "== pretraining the demo's small base model (stand-in for GPT-2's pretraining)"
python -m stages.tools.tiny_base --train data/sample/trainset.csv --tokenizer "$here/data/gpt2/tokenizer.json" \
  --out base-model "${base_args[@]}"

echo "== dvc repro with the demo's overrides"
# The overrides go into params.yaml through the function `dvc exp run -S` itself calls (same syntax, comments
# kept); then `dvc repro`, because `dvc exp run` first checks out every output and, on a first run, warns
# "No file hash info found ... It won't be created." once per output, a line no user can act on.
python - "${overrides[@]}" <<'EOF'
import sys
from dvc.utils.hydra import apply_overrides
apply_overrides("params.yaml", sys.argv[1:])
EOF
dvc repro
git add -A
git commit -qm "Demo baseline: ${overrides[*]}"

echo
cat metrics/report.md
echo
echo "Demo finished in $((SECONDS - start)) s. Workspace: $ws"
echo "Try: cd $ws && dvc exp run -S lora.rank=8 && dvc metrics diff && dvc exp show"

#!/usr/bin/env bash
# RIP-AV ablation at equal budget on RITE: configs/rite_ripav.cfg shortened to the same number of
# epochs for every variant, one option changed at a time, each scored on the 20 test images by
# both A/V protocols (whole-image inference, no TTA or vote: the network itself).
#   bash bench/ripav_ablation.sh [data/RITE] [logs] [epochs]
# Needs the RIP pre-training run rip_rite in the log folder (configs/rite_rip_pretrain.cfg).
# Prints one table row per variant; each run's metrics are in <logs>/ablation_<name>/evaluation.
set -euo pipefail
DATA=${1:-data/RITE}
LOGS=${2:-logs}
EPOCHS=${3:-10}
PY=${PYTHON:-python}
BASE='"encoder": "convnext", "widths": [16, 32, 64, 128, 192], "depths": [1, 1, 2, 1], "context_size": 96'
declare -A MODEL=(
  [base]="{$BASE, \"context_fusion\": false}"
  [pcf_seed]="{$BASE, \"context_fusion\": true, \"fusion\": \"pgfusion\", \"context_factor\": 0}"
  [patchgan]="{$BASE, \"context_fusion\": false, \"adversarial_weight\": 0.01}"
  [da_seed]="{$BASE, \"context_fusion\": false, \"distance_form\": \"seed\"}"
  [mixed_sizes]="{$BASE, \"context_fusion\": false}"
  [no_rip]="{$BASE, \"context_fusion\": false}"
)
declare -A EXTRA=([mixed_sizes]="--mixed_patch_sizes=64,128,256" [no_rip]="--pretrained=")
for name in ${VARIANTS:-base pcf_seed patchgan da_seed mixed_sizes no_rip}; do
  run="$LOGS/ablation_$name"
  if [ ! -f "$run/model.keras" ]; then
    $PY bin/train.py --flagfile=configs/rite_ripav.cfg --data_dir="$DATA" --logdir="$LOGS" \
      --run_name="ablation_$name" --epochs="$EPOCHS" --time_budget_minutes=0 \
      --model_config="${MODEL[$name]}" ${EXTRA[$name]:-}
  fi
  $PY bin/evaluate.py --model="$run" --dataset=rite --data_dir="$DATA" --inference=whole --notta \
    --noav_vote --output_dir="$run/evaluation" --overwrite
done
$PY - "$LOGS" ${VARIANTS:-base pcf_seed patchgan da_seed mixed_sizes no_rip} <<'PYEOF'
import json, sys
logs, names = sys.argv[1], sys.argv[2:]
print("| variant | minutes | vessel F1 | AUC-ROC | A/V, all pixels | A/V, RIP-AV protocol "
      "| Se / Sp (RIP-AV) | AUC artery / vein |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    t = json.load(open(f"{logs}/ablation_{n}/metrics.json"))["training_minutes"]
    m = json.load(open(f"{logs}/ablation_{n}/evaluation/metrics.json"))
    m = m.get("metrics", m)
    print(f"| {n} | {t:.1f} | {m['f1']:.4f} | {m['auc_roc']:.4f} | {m['av_acc']:.3f} | "
          f"{m['av_acc_ripav']:.3f} | {m['av_se_ripav']:.3f} / {m['av_sp_ripav']:.3f} | "
          f"{m['av_auc_artery']:.3f} / {m['av_auc_vein']:.3f} |")
PYEOF

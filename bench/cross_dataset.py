"""Cross-dataset vessel table: each run on each labelled test set, as ``bin/evaluate.py`` scores it.

Every cell is one evaluate command (printed with the table); F1 pooled over the set's pixels, the
mean and standard deviation of the per-image F1, and AUC-ROC, inside the FOV, at each run's own
threshold. A cell whose test images the run trained on is marked so. Rows are ``NAME=RUN``
(a run folder or a shipped model name), columns ``--test=NAME=DATASET:FOLDER:SPLIT``:

    .venv/bin/python bench/cross_dataset.py \\
        --runs=DRIVE=logs/vessel_drive,STARE=logs/vessel_stare,DRIVE+STARE=vessel_general \\
        --test="DRIVE test=drive:data/DRIVE:test" --test=STARE=stare:data/STARE:all \\
        --test=CHASE_DB1=chase_db1:data/CHASE_DB1:all --test=HRF=hrf:data/HRF:all \\
        --out=logs/cross_dataset
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from retina_tf.flags import run_reported  # noqa: E402

flags.DEFINE_list("runs", None, "Rows: NAME=RUN (run folder or shipped model name).")
flags.DEFINE_multi_string("test", None, "A column: NAME=DATASET:FOLDER:SPLIT (repeat).")
flags.DEFINE_boolean("tta", None, "Passed to every evaluate (--notta: none); default: each "
                     "run's own choice, as evaluate's.")
flags.DEFINE_string("out", "logs/cross_dataset", "Folder of each cell's evaluate output and "
                    "of table.md / table.json.")
flags.mark_flags_as_required(["runs", "test"])
FLAGS = flags.FLAGS


def _pairs(entries):
    out = []
    for entry in entries:
        name, _, value = entry.partition("=")
        if not value:
            raise SystemExit(f"{entry}: give NAME=VALUE")
        out.append((name.strip(), value.strip()))
    return out


def main(_):
    from retina_tf.config import EvalConfig
    from retina_tf.errors import ConfigError
    from retina_tf.evaluation import evaluate, images_seen_in_training
    from retina_tf.run_folder import find_run

    out_root = Path(FLAGS.out)
    rows, cells = _pairs(FLAGS.runs), {}
    tests = [(name, *value.split(":")) for name, value in _pairs(FLAGS.test)]
    for name, *where in tests:
        if len(where) != 3:
            raise ConfigError(f"--test={name}={':'.join(where)}: give "
                              "<column>=<dataset>:<folder>:<split>")
    commands = []
    for row, run in rows:
        run_info = json.loads((find_run(run) / "run.json").read_text())
        for col, dataset, folder, split in tests:
            out = out_root / f"{row}__{col}".replace(" ", "_").replace("+", "_")
            cfg = EvalConfig(model=run, dataset=dataset, data_dir=folder, eval_split=split,
                             output_dir=str(out), overwrite=True, tta=FLAGS.tta)
            tta = "" if FLAGS.tta is None else " --tta" if FLAGS.tta else " --notta"
            commands.append(f"python bin/evaluate.py --model={run} --dataset={dataset} "
                            f"--data_dir={folder} --eval_split={split} --output_dir={out}{tta}")
            report = evaluate(cfg)
            names = [r["name"] for r in report["per_image"]]
            cells[row, col] = {"f1": report["metrics"]["f1"],
                               "f1_mean": report["per_image_mean"]["f1"],
                               "f1_std": report["per_image_std"]["f1"],
                               "auc_roc": report["metrics"]["auc_roc"],
                               "images": report["images"],
                               "trained_on": any(images_seen_in_training(
                                   run_info, names, dataset, split))}
    header = "| trained on \\ tested on | " + " | ".join(
        f"{col} ({cells[rows[0][0], col]['images']})" for col, *_ in tests) + " |"
    lines = [header, "|---" * (len(tests) + 1) + "|"]
    for row, _ in rows:
        text = []
        for col, *_ in tests:
            c = cells[row, col]
            mark = " (trained on)" if c["trained_on"] else ""
            text.append(f"{c['f1']:.3f} / {c['f1_mean']:.3f} ± {c['f1_std']:.3f} / "
                        f"{c['auc_roc']:.3f}{mark}")
        lines.append(f"| {row} | " + " | ".join(text) + " |")
    table = "\n".join(lines) + "\n"
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "table.md").write_text(table + "\nCommands:\n\n" + "\n".join(
        f"    {c}" for c in commands) + "\n")
    (out_root / "table.json").write_text(json.dumps(
        {f"{r} | {c}": v for (r, c), v in cells.items()}, indent=2))
    print("\nF1 pooled / F1 mean ± sd over images / AUC-ROC, inside the FOV\n")
    print(table)


if __name__ == "__main__":
    run_reported(main)

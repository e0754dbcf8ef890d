"""The command line: flag validation at parse time, conflicting data sources, and errors a
person can read (one or two lines on stderr, exit 2 for usage errors and 1 otherwise, the
traceback only with --verbose).

Flag checks run in-process on a FlagValues with every flag; a handful of cases run the real
bin/ scripts (tests/commands.py: forked from a process that has imported TensorFlow).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags

from retina_tf.errors import ConfigError, DatasetError, ModelFileError, OutputError
from retina_tf.flags import new_flag_values, report_errors
from tests import commands

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.cfg"
DRIVE_UNET = REPO / "configs" / "drive_unet.cfg"


def parse_flags(argv: list[str]):
    """Every retina_tf flag parsed from ``argv`` (validators included)."""
    fv = new_flag_values()
    fv(["retina_tf", *argv])
    return fv


def _run(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return commands.script(script, *args, cwd=cwd, env=env)


def _error_lines(stderr: str, script: str) -> list[str]:
    """retina_tf's own lines (TensorFlow's C++ start-up log may precede them)."""
    return [line for line in stderr.splitlines() if line.startswith(f"{script}: ")]


# --- flag values, at parse time ----------------------------------------------------------------

@pytest.mark.parametrize("arg, shown", [
    ("--threshold=1.5", "--threshold=1.5"),
    ("--threshold=1", "--threshold=1.0"),
    ("--threshold=0", "--threshold=0.0"),
    ("--epochs=0", "--epochs=0"),
    ("--batch_size=0", "--batch_size=0"),
    ("--patch_size=0", "--patch_size=0"),
    ("--patches_per_epoch=0", "--patches_per_epoch=0"),
    ("--steps_per_epoch=-1", "--steps_per_epoch=-1"),
    ("--val_images=-1", "--val_images=-1"),
    ("--learning_rate=0", "--learning_rate=0.0"),
    ("--learning_rate=-0.1", "--learning_rate=-0.1"),
    ("--stride=0", "--stride=0"),
    ("--window=-1", "--window=-1"),
    ("--validate_every=0", "--validate_every=0"),
    ("--vessel_probability=1.5", "--vessel_probability=1.5"),
    ("--preprocess=grayscale,sharpen", "--preprocess=['grayscale', 'sharpen']"),
    ("--brightness=inf", "--brightness=inf"),  # NaN images, a crash blaming the model
    ("--gamma_jitter=inf", "--gamma_jitter=inf"),
    ("--rotate_degrees=inf", "--rotate_degrees=inf"),
    ("--contrast=1.5", "--contrast=1.5"),  # a factor below 0 inverts the image
])
def test_a_bad_flag_value_is_rejected_at_parse_time_naming_flag_and_value(arg, shown):
    with pytest.raises(flags.IllegalFlagValueError, match="must be") as err:
        parse_flags([arg])
    assert shown in str(err.value)


def test_the_edge_values_that_make_sense_still_parse():
    cfg = parse_flags(["--threshold=0.01", "--epochs=1", "--batch_size=1", "--patch_size=1",
                       "--patches_per_epoch=1", "--steps_per_epoch=0", "--val_images=0",
                       "--learning_rate=1e-6", "--stride=1", "--window=0", "--validate_every=1",
                       "--vessel_probability=0"])
    assert cfg.threshold == 0.01 and cfg.epochs == 1 and cfg.window == 0
    assert parse_flags(["--threshold=0.99"]).threshold == 0.99
    cfg = parse_flags(["--rotate_degrees=180", "--contrast=1", "--brightness=0.5"])
    assert (cfg.rotate_degrees, cfg.contrast, cfg.brightness) == (180, 1, 0.5)


def test_several_bad_values_are_all_named():
    with pytest.raises(flags.IllegalFlagValueError) as err:
        parse_flags(["--epochs=0", "--batch_size=0"])
    assert "--epochs=0" in str(err.value) and "--batch_size=0" in str(err.value)


# --- conflicting data sources ------------------------------------------------------------------

def test_a_flagfile_label_file_and_a_command_line_dataset_conflict(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(flags.IllegalFlagValueError) as err:
        parse_flags([f"--flagfile={DEMO}", "--dataset=drive", "--data_dir=data/DRIVE"])
    message = str(err.value)
    assert "label_file_path=data/synthetic_labels/training.txt" in message
    assert "dataset=drive" in message
    assert "--label_file_path=" in message and "--dataset= --data_dir=" in message
    with pytest.raises(flags.IllegalFlagValueError, match="data_dir=data/DRIVE"):
        parse_flags([f"--flagfile={DEMO}", "--data_dir=data/DRIVE"])


def test_an_empty_label_file_drops_the_flagfiles_one(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = parse_flags([f"--flagfile={DEMO}", "--label_file_path=", "--dataset=drive",
                       "--data_dir=data/DRIVE"])
    assert cfg.label_file_path == "" and cfg.dataset == "drive"
    assert cfg.run_name == "demo"  # the rest of the flagfile still applies


def test_an_empty_dataset_drops_the_flagfiles_one(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(flags.IllegalFlagValueError, match="test_label_file_path=t.txt"):
        parse_flags([f"--flagfile={DRIVE_UNET}", "--test_label_file_path=t.txt"])
    cfg = parse_flags([f"--flagfile={DRIVE_UNET}", "--dataset=", "--data_dir=",
                       "--label_file_path=l.txt"])
    assert cfg.dataset is None and cfg.data_dir == "" and cfg.label_file_path == "l.txt"
    with pytest.raises(flags.IllegalFlagValueError, match="--dataset=nowhere"):
        parse_flags(["--dataset=nowhere"])
    # the names as the datasets' folders have them (the README's table) are taken too
    assert [parse_flags([f"--dataset={name}"]).dataset for name in ("CHASE_DB1", "LES-AV")
            ] == ["chase_db1", "les_av"]


def test_empty_data_flags_count_as_not_given():
    from retina_tf.data.pipeline import resolve_samples
    cfg = parse_flags(["--dataset=", "--data_dir=", "--label_file_path="])
    with pytest.raises(ConfigError, match="--label_file_path.*--dataset and --data_dir"):
        resolve_samples(cfg.dataset, cfg.data_dir, "training", cfg.label_file_path)


# --- library errors a user can act on ----------------------------------------------------------

def test_user_input_errors_of_the_library_are_retina_tf_errors(tmp_path):
    from retina_tf.models import build_model
    from retina_tf.pretraining import pretraining_images
    from retina_tf.run_folder import find_run

    with pytest.raises(ConfigError, match=r"'segnet' \(--model\)"):
        build_model("segnet")
    with pytest.raises(ConfigError, match="--pretrain_dirs"):
        pretraining_images([], set())
    with pytest.raises(ModelFileError, match=f"--pretrained={tmp_path / 'nowhere'}"):
        find_run(tmp_path / "nowhere", str(tmp_path), flag="--pretrained")


# --- report_errors: status and lines, in-process -----------------------------------------------

def _report(exc: BaseException, capsys, verbose: bool = False) -> tuple[int, list[str]]:
    fv = parse_flags(["--verbose"] if verbose else [])
    with pytest.raises(SystemExit) as exit_info:
        with report_errors(fv):
            raise exc
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def test_report_errors_sorts_errors_into_exit_statuses(tmp_path, capsys):
    status, lines = _report(ConfigError("--foo=1: must be 2"), capsys)
    assert status == 2 and len(lines) == 1 and lines[0].endswith("error: --foo=1: must be 2")
    status, lines = _report(DatasetError(f"{tmp_path}/x.txt: label file not found"), capsys)
    assert status == 1 and len(lines) == 1 and f"{tmp_path}/x.txt" in lines[0]
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out.png"))
    status, lines = _report(full, capsys)
    assert status == 1 and len(lines) == 2
    assert f"{tmp_path / 'out.png'}: No space left on device" in lines[0]
    assert "disk is full" in lines[1]
    status, lines = _report(OutputError(errno.ENOSPC, "No space left on device",
                                        str(tmp_path / "a.png")), capsys)
    assert status == 1 and lines[0].endswith(f"cannot write {tmp_path / 'a.png'}: "
                                              "No space left on device")
    assert len(lines) == 2 and "disk is full" in lines[1]
    status, lines = _report(ValueError("something odd"), capsys)
    assert status == 1 and len(lines) == 2 and "--verbose" in lines[1]
    status, lines = _report(KeyboardInterrupt(), capsys)
    assert status == 130 and len(lines) == 1 and "interrupted" in lines[0]
    status, lines = _report(flags.IllegalFlagValueError("flag --x=0: must be >= 1"), capsys)
    assert status == 2 and len(lines) == 2


def test_out_of_memory_is_one_line_with_the_flags_that_need_less(capsys):
    """A tensor too large for the device (on a GPU mostly; here a real one of 1 TB on the CPU):
    the device, the tensor and what to lower, not TensorFlow's page of graph and traceback."""
    import tensorflow as tf
    with pytest.raises(tf.errors.ResourceExhaustedError) as oom:
        tf.random.normal((2 ** 19, 2 ** 19))
    for script, knobs in (("train", "--batch_size or --patch_size"),
                          ("predict", "--tile_size (say 512")):
        fv = new_flag_values(script)
        fv([script])
        with pytest.raises(SystemExit) as exit_info:
            with report_errors(fv):
                raise oom.value
        lines = capsys.readouterr().err.splitlines()
        assert exit_info.value.code == 1 and len(lines) == 2, lines
        assert lines[0].endswith("error: out of memory on CPU:0: a float tensor of shape "
                                 "[524288,524288] did not fit")
        assert f"a smaller {knobs}" in lines[1] and "--verbose" in lines[1]


def test_report_errors_shows_the_traceback_only_with_verbose(capsys):
    _, lines = _report(ConfigError("bad"), capsys)
    assert not any("Traceback" in line for line in lines)
    status, lines = _report(ConfigError("bad"), capsys, verbose=True)
    assert status == 2 and lines[0].startswith("Traceback") and lines[-1].endswith("error: bad")


def test_report_errors_lets_a_bug_through():
    with pytest.raises(ZeroDivisionError):
        with report_errors(parse_flags([])):
            _ = 1 / 0


# --- the real scripts --------------------------------------------------------------------------

def test_a_bad_flag_value_exits_2_in_two_lines_without_traceback():
    proc = _run("evaluate.py", "--threshold=1.5")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()  # rejected before TensorFlow is imported
    assert len(lines) <= 2, proc.stderr
    assert "--threshold=1.5" in lines[0] and "Traceback" not in proc.stderr


def test_verbose_adds_the_traceback():
    proc = _run("evaluate.py", "--threshold=1.5", "--verbose")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "--threshold=1.5" in proc.stderr.splitlines()[-2]


def test_conflicting_data_sources_from_a_flagfile_exit_2_naming_both():
    # The reproduction; it fails on the flags, before any data is read.
    proc = _run("train.py", "--flagfile=configs/demo.cfg", "--dataset=drive",
                "--data_dir=data/DRIVE")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) <= 2 and "Traceback" not in proc.stderr
    assert "label_file_path=data/synthetic_labels/training.txt" in lines[0]
    assert "dataset=drive" in lines[0] and "--label_file_path=" in lines[0]


def test_other_scripts_report_usage_errors_the_same_way(tmp_path):
    proc = _run("make_synthetic.py", f"--out_dir={tmp_path / 'syn'}", "--num_images=0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr, "make_synthetic.py")[0].startswith(
        "make_synthetic.py: error: num_images must be >= 1")
    proc = _run("make_synthetic.py", "--out_dir=")  # not the current folder
    assert proc.returncode == 2 and _error_lines(proc.stderr, "make_synthetic.py")[0] == \
        "make_synthetic.py: error: --out_dir is empty: give the folder to write the set to"
    proc = _run("preprocess.py", "--dataset=drive")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--data_dir is required" in proc.stderr


def test_predict_names_a_missing_input_and_exits_1(tmp_path):
    proc = _run("predict.py", "--model=unet_drive", "--input=/nonexistent.png",
                f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr, "predict.py")
    assert 1 <= len(lines) <= 2 and "/nonexistent.png" in lines[0]


def _predict_fails_naming(shared_data, out: Path) -> list[str]:
    """Runs predict on a DRIVE image into ``out``; asserts exit 1 with one or two lines naming
    ``out``, and returns those lines."""
    proc = _run("predict.py", "--model=unet_drive",
                f"--input={shared_data / 'DRIVE' / 'test' / 'images' / '01_test.tif'}",
                f"--output_dir={out}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr, "predict.py")
    assert 1 <= len(lines) <= 2 and str(out) in lines[0], proc.stderr[-2000:]
    return lines


def test_predict_names_an_output_folder_it_cannot_create(shared_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _predict_fails_naming(shared_data, blocker / "out")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs filled to the last byte (needs root, as in CI; skipped otherwise)."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mount / "out").mkdir()
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_predict_names_the_file_it_cannot_write_on_a_full_disk(shared_data, full_disk):
    lines = _predict_fails_naming(shared_data, full_disk / "out")
    assert "No space left on device" in lines[0] and "disk is full" in lines[1]
    # room for the list of outputs, not for a picture: the picture is named, not the staging
    # copy it was written as first (removed by then)
    filler = full_disk / "filler"
    os.truncate(filler, filler.stat().st_size - 16384)
    lines = _predict_fails_naming(shared_data, full_disk / "out")
    assert ".retina_tf_staging" not in lines[0] and str(full_disk / "out" / "01_test_") in \
        lines[0], lines


# --- per-script flags ----------------------------------------------------------------------------

def test_each_script_lists_only_its_own_flags_in_help():
    train = _run("train.py", "--help")
    assert train.returncode == 0, train.stderr[-2000:]
    for flag in ("--epochs", "--learning_rate", "--patch_size", "--model_config", "--depth"):
        assert flag in train.stdout, flag
    predict = _run("predict.py", "--help")
    assert predict.returncode == 0 and "--input" in predict.stdout
    for flag in ("--epochs", "--mask_ratio", "--learning_rate", "--rip_sizes", "--depth"):
        assert flag not in predict.stdout, flag


def test_a_flagfile_serves_several_scripts_but_the_command_line_is_checked(monkeypatch):
    from retina_tf.flags import parse_config

    monkeypatch.chdir(REPO)
    cfg = parse_config("evaluate", [f"--flagfile={DRIVE_UNET}", "--tta"])
    assert cfg.model == "unet" and cfg.run_name == "unet_drive" and cfg.tta
    assert not hasattr(cfg, "epochs")
    # on the command line another script's flag is ignored with a notice, an unknown one fails
    proc = _run("evaluate.py", f"--flagfile={DRIVE_UNET}", "--epochs", "3", "--model=nowhere")
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == ("evaluate.py: note: --epochs is a flag of bin/train.py, "
                        "bin/pretrain_mae.py, bin/pretrain_rip.py, not of evaluate.py; ignored")
    assert "--model=nowhere" in lines[1] and len(lines) == 2
    proc = _run("evaluate.py", "--epochz=3")
    assert proc.returncode == 2 and "epochz" in proc.stderr



def test_a_flagfiles_unknown_flag_is_named_with_the_flagfile(tmp_path):
    from retina_tf.flags import parse_config
    flagfile = tmp_path / "mine.cfg"
    flagfile.write_text("--dataset=drive\n--modle=unet\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(flagfile))}: unknown flag --modle "
                                          r"\(did you mean --model\?\)$"):
        parse_config("evaluate", [f"--flagfile={flagfile}"])
    flagfile.write_text("--dataset=drive\n--noflip\n--verbose\n")  # train's, and every one's
    assert parse_config("evaluate", [f"--flagfile={flagfile}"]).dataset == "drive"


def test_the_configs_read_from_any_folder_and_a_missing_nested_flagfile_is_named(
        tmp_path, monkeypatch):
    """From another folder, configs/drive_unet_fast.cfg's --flagfile=configs/drive_unet.cfg
    failed with absl's 'error: ERROR:: Unable to open flagfile', naming neither file."""
    from retina_tf.config import TrainConfig, from_flagfile
    from retina_tf.flags import parse_config
    fast = REPO / "configs" / "drive_unet_fast.cfg"
    assert "--flagfile=configs/drive_unet.cfg" in fast.read_text()
    here = parse_config("train", [f"--flagfile={fast}"])
    monkeypatch.chdir(tmp_path)
    assert parse_config("train", [f"--flagfile={fast}"]) == here
    assert from_flagfile(TrainConfig, fast) == here
    mine = tmp_path / "mine.cfg"
    mine.write_text("# mine\n--flagfile=configs/nothere.cfg\n--epochs=3\n")
    for read in (lambda: parse_config("train", [f"--flagfile={mine}"]),
                 lambda: from_flagfile(TrainConfig, mine)):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(mine))}: its --flagfile="
                                              r"configs/nothere.cfg is neither in the current "):
            read()
    with pytest.raises(ConfigError, match=r"^--flagfile=missing.cfg: No such file"):
        parse_config("train", ["--flagfile=missing.cfg"])


def test_the_library_reads_a_flagfile_as_the_command_line_does(tmp_path):
    """from_flagfile had a reader of its own: it passed over a single-dash flag that absl sets
    and refused a flagfile that names itself (absl skips the repeat)."""
    from retina_tf.config import TrainConfig, from_flagfile
    from retina_tf.flags import parse_config
    base = tmp_path / "base.cfg"
    mine = tmp_path / "mine.cfg"
    base.write_text(f"// base\n--flagfile={mine}\n--epochs=7\n--batch_size=4\n")
    mine.write_text(f"# mine\n--flagfile={base}\n\n-epochs=3\n  --noflip\n")
    given = parse_config("train", [f"--flagfile={mine}"])
    assert (given.epochs, given.batch_size, given.flip) == (3, 4, False)
    assert from_flagfile(TrainConfig, mine) == given


def test_unet_flags_reach_only_models_that_take_them(monkeypatch):
    from retina_tf.flags import parse_config

    monkeypatch.chdir(REPO)
    unet = parse_config("train", [f"--flagfile={REPO / 'configs' / 'drive_unet_fast.cfg'}"])
    assert unet.model_config == {"depth": 4, "base_filters": 16, "transpose_conv": False,
                                 "batch_norm": True, "dropout": 0.0}
    ddrnet = parse_config("train", [f"--flagfile={REPO / 'configs' / 'drive_ddrnet.cfg'}"])
    assert "base_filters" not in ddrnet.model_config and ddrnet.model_config["planes"] == 16
    with pytest.raises(ConfigError, match="--base_filters=16: --model=ddrnet does not take it"):
        parse_config("train", [f"--flagfile={REPO / 'configs' / 'drive_ddrnet.cfg'}",
                               "--base_filters=16"])


def test_console_scripts_and_python_m_run_the_same_commands():
    script = Path(sys.executable).parent / "retina-evaluate"
    assert script.is_file(), "pip install -e . installs the retina-* console scripts"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--threshold" in proc.stdout and "--epochs" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "retina_tf", "train", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--epochs" in proc.stdout and "--input" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "retina_tf", "predict", "--model=nowhere",
                           "--input=README.md", "--output_dir=out"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        proc.stderr.splitlines()[0]]  # one line: TensorFlow's start-up held back
    assert proc.stderr.startswith("retina_tf predict: error: --model=nowhere")
    proc = subprocess.run([sys.executable, "-m", "retina_tf"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "pretrain-mae" in proc.stderr


def test_every_command_tells_its_version():
    import retina_tf
    for args in (["-m", "retina_tf", "--version"], [REPO / "bin" / "predict.py", "--version"]):
        proc = commands.run([sys.executable, *args], cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == f"retina_tf {retina_tf.__version__}\n"


def test_an_unknown_command_is_named_with_the_nearest_one(capsys):
    from retina_tf.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["retina_tf", "comapre"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[0] == (
        "unknown command 'comapre'; did you mean 'compare'?") and "pretrain-mae" in err


def test_a_forked_command_reads_as_a_fresh_interpreter_does(tmp_path):
    """tests/commands.py, which runs most tests' commands, against a real ``python bin/...``."""
    args = ["predict.py", "--model=unet_drive", f"--input={tmp_path / 'none.png'}",
            f"--output_dir={tmp_path / 'out'}"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user
    fresh = subprocess.run([sys.executable, str(REPO / "bin" / args[0]), *args[1:]], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    forked = commands.script(*args, cwd=REPO, env=env)
    assert fresh.returncode == forked.returncode == 1
    assert (fresh.stdout, fresh.stderr) == (forked.stdout, forked.stderr)
    assert fresh.stderr.startswith("predict.py: error: ") and str(tmp_path) in fresh.stderr
    help_text = commands.script("predict.py", "--help")
    assert help_text.returncode == 0 and "--threshold" in help_text.stdout


@pytest.mark.parametrize("argv, prog", [
    ([sys.executable, str(REPO / "bin" / "predict.py")], "predict.py"),
    ([str(Path(sys.executable).parent / "retina-predict")], "retina-predict"),
    ([sys.executable, "-m", "retina_tf", "predict"], "retina_tf")])
def test_ctrl_c_while_tensorflow_loads_is_one_line(argv, prog):
    # a fresh interpreter: the import of TensorFlow takes seconds, the interrupt comes within it
    # as from a terminal: SIGINT not ignored (a pytest-xdist worker ignores it, and so would
    # its children)
    proc = subprocess.Popen([*argv, "--help"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # once TensorFlow's library is mapped the import is under way (seconds of it left): a fixed
    # sleep would, on a loaded machine, interrupt the interpreter's start instead
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "TensorFlow never loaded"
        if "tensorflow" in maps.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == f"{prog}: interrupted", err[-2000:]

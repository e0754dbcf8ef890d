"""The ``--datasets`` flag of the benchmarks that read labelled catalog datasets:
``DATASET:FOLDER[:SPLIT],...``, each read as ``--extra_data`` entries are
(:func:`retina_tf.training.parse_extra_data`)."""

from absl import flags

flags.disclaim_key_flags()  # the flag defined here is the calling script's: its --help lists it


def define_datasets_flag(which: str = "catalog datasets") -> None:
    """Defines the required ``--datasets`` flag; ``which`` says what it takes."""
    flags.DEFINE_list("datasets", None, f"DATASET:FOLDER[:SPLIT] of {which} "
                      "(stare:data/STARE:all; the training split unless given).")
    flags.mark_flag_as_required("datasets")


def dataset_specs() -> list[tuple[str, str, str]]:
    """``--datasets`` as (dataset, folder, split), each entry checked."""
    from retina_tf.training import parse_extra_data
    return [parse_extra_data(spec, "--datasets") for spec in flags.FLAGS.datasets]

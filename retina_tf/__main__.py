"""``python -m retina_tf <command> [flags]``: see :mod:`retina_tf.cli`."""

from retina_tf.cli import main

main()

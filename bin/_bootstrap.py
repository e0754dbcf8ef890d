"""Lets `python bin/<script>.py` run from a clone without installing the package; importing
retina_tf from here also keeps TensorFlow's start-up chatter off the terminal and makes Ctrl-C
while it loads one line (retina_tf/_startup.py)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import retina_tf  # noqa: E402, F401  (after the path is set)

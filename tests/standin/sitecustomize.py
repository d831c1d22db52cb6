"""TEMPORARY (until branch `data` merges): provide scale_zero.data from data_standin.py
when the real module is missing. On PYTHONPATH only in the trainer's tests."""
import importlib.util
import sys

if importlib.util.find_spec("scale_zero") and not importlib.util.find_spec("scale_zero.data"):
    import data_standin

    sys.modules["scale_zero.data"] = data_standin

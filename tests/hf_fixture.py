"""An offline stand-in for the Hugging Face hub files some families fetch (tokenizers, text-tower configs),
in the hub's cache layout, so open_clip and transformers find them with HF_HUB_OFFLINE=1.

Its one copy lives in benchmarks/common.py, because benchmarks/families.py needs it too and no benchmark
may import a file from tests/; the tests import it from here.
"""
import importlib.util
import sys
from pathlib import Path

_NAME = "mmsearch_benchmarks_common"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).parents[1] / "benchmarks" / "common.py")
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])

build_hf_cache = sys.modules[_NAME].build_hf_cache

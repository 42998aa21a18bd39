"""The fuzz target of bench/fuzz keeps working: its seeds and a short random run pass.

The protocol core itself is fuzzed in ``test_frames.py``, ``test_messages.py`` (arbitrary
bytes) and ``test_sessions_stateful.py`` (random interleavings); this only keeps the long,
coverage-guided target (``bench/fuzz/fuzz_core.py``) from rotting between runs by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

TARGET = Path(__file__).resolve().parents[2] / "bench" / "fuzz" / "fuzz_core.py"


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_core", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_core", module)
    spec.loader.exec_module(module)
    return module


fuzz = load_target()


@pytest.mark.parametrize("seed", fuzz.seeds(), ids=lambda seed: f"{len(seed)}b")
def test_every_seed_passes_the_target(seed: bytes) -> None:
    fuzz.check(seed)


def test_the_seed_files_are_the_seeds_of_the_target() -> None:
    files = sorted((TARGET.parent / "seeds").iterdir())
    assert [f.read_bytes() for f in files] == fuzz.seeds()


def test_a_valid_stream_decodes_every_frame() -> None:
    assert fuzz.check_decoders(fuzz.chunks(fuzz.seeds()[0])) == 9


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_arbitrary_inputs_pass_the_target(data: bytes) -> None:
    fuzz.check(data)

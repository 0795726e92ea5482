"""Renamed public names: the new ones are the classes; the old ones still work for one release, with a
DeprecationWarning naming the new name."""

import importlib

import pytest

import lstainnorm
from lstainnorm.layers.model import NormalizedNetwork
from lstainnorm.layers.stain import StainConcentrationNorm


CASES = [(module, old, new) for module in ("lstainnorm", "lstainnorm.layers") for old, new in
         (("StainOD", StainConcentrationNorm), ("StainNormalized", NormalizedNetwork))]
CASES += [("lstainnorm.layers.stain", "StainOD", StainConcentrationNorm), ("lstainnorm.layers.model", "StainNormalized", NormalizedNetwork)]


@pytest.mark.parametrize("module,old,new", CASES)
def test_old_names_warn_and_give_the_new_class(module, old, new):
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new.__name__}"):
        assert getattr(mod, old) is new


def test_new_names_are_public_and_unknown_names_still_fail():
    assert lstainnorm.StainConcentrationNorm is StainConcentrationNorm and lstainnorm.NormalizedNetwork is NormalizedNetwork
    assert "StainOD" not in lstainnorm.__all__ and "StainNormalized" not in lstainnorm.__all__
    with pytest.raises(AttributeError):
        lstainnorm.NoSuchLayer  # noqa: B018
    with pytest.raises(AttributeError):
        importlib.import_module("lstainnorm.layers.stain").NoSuchLayer  # noqa: B018

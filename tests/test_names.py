"""Renamed public names: the new ones are the classes; the old ones still work for one release, with a
DeprecationWarning naming the new name."""

import importlib

import pytest

import lstainnorm
from lstainnorm.layers.model import NormalizedNetwork
from lstainnorm.layers.stain import StainConcentrationNorm


@pytest.mark.parametrize("module", ["lstainnorm", "lstainnorm.layers", "lstainnorm.layers.stain", "lstainnorm.layers.model"])
@pytest.mark.parametrize("old,new", [("StainOD", StainConcentrationNorm), ("StainNormalized", NormalizedNetwork)])
def test_old_names_warn_and_give_the_new_class(module, old, new):
    mod = importlib.import_module(module)
    if module.endswith(("stain", "model")) and new.__module__ != module:
        pytest.skip("defined in the other module")
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new.__name__}"):
        assert getattr(mod, old) is new


def test_new_names_are_public_and_unknown_names_still_fail():
    assert lstainnorm.StainConcentrationNorm is StainConcentrationNorm and lstainnorm.NormalizedNetwork is NormalizedNetwork
    assert "StainOD" not in lstainnorm.__all__ and "StainNormalized" not in lstainnorm.__all__
    with pytest.raises(AttributeError):
        lstainnorm.NoSuchLayer  # noqa: B018
    with pytest.raises(AttributeError):
        importlib.import_module("lstainnorm.layers.stain").NoSuchLayer  # noqa: B018

"""Protocols of a comparison: which tiles train and which test, from the data's own centres.

- ``split``: the data's own split, as the config reads it (``data.train_split`` / ``test_split``, or a
  segmentation split file);
- ``leave-one-centre-out``: each centre held out in turn (every one of its tiles tests), the others'
  training rows train; one protocol per centre, named ``loco:<centre>``;
- ``A,B->C``: centres A and B train (their training rows), every tile of C tests.

Centres come from the manifest's centre column (``data.columns`` maps it), so a protocol names the
user's own hospitals or scanners.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["PROTOCOL_HELP", "expand_protocols", "protocol_overrides", "manifest_centres"]

PROTOCOL_HELP = ("split (the data's own split), leave-one-centre-out (each centre held out in turn), "
                 "or TRAIN->TEST with comma-separated centres (e.g. 'A,B->C')")


def manifest_centres(cfg: Any) -> list[str]:
    """The centres of a classification config's manifest (sorted); [] without a centre column."""
    from ..data.tiles import read_manifest

    d = cfg.data
    if not d.manifest:
        return []
    rows = read_manifest(d.manifest, dict(d.columns) if d.columns else None)
    return sorted({r.get("centre", "") for r in rows} - {""})


def _list(names: Sequence[str]) -> str:
    return "[" + ",".join(names) + "]"


def expand_protocols(protocols: Sequence[str], cfg: Any) -> dict[str, list[str]]:
    """``{protocol name: config overrides}`` for the requested protocols (``leave-one-centre-out``
    expands to one per centre). Raises ValueError naming an unknown protocol or centre."""
    out: dict[str, list[str]] = {}
    centres: list[str] | None = None

    def known() -> list[str]:
        nonlocal centres
        if centres is None:
            if cfg.task != "classification":
                raise ValueError(f"centre protocols are for classification manifests; task={cfg.task} compares on its split ('split')")
            centres = manifest_centres(cfg)
            if len(centres) < 2:
                raise ValueError(f"the manifest {cfg.data.manifest} names {len(centres)} centre(s) in its centre column; "
                                 "a centre protocol needs at least two (map the column with data.columns.centre)")
        return centres

    for p in protocols:
        if p == "split":
            out["split"] = []
        elif p in ("leave-one-centre-out", "loco"):
            for c in known():
                out[f"loco:{c}"] = protocol_overrides([x for x in known() if x != c], [c])
        elif "->" in p:
            train_c, test_c = ([x.strip() for x in side.split(",") if x.strip()] for side in p.split("->", 1))
            bad = [c for c in train_c + test_c if c not in known()]
            if bad or not train_c or not test_c:
                raise ValueError(f"protocol {p!r}: " + (f"unknown centre(s) {bad}; the manifest has {known()}" if bad
                                                         else "name training and test centres, e.g. 'A,B->C'"))
            if set(train_c) & set(test_c):
                raise ValueError(f"protocol {p!r}: centres {sorted(set(train_c) & set(test_c))} both train and test")
            out[f"{','.join(train_c)}->{','.join(test_c)}"] = protocol_overrides(train_c, test_c)
        else:
            raise ValueError(f"unknown protocol {p!r}; use {PROTOCOL_HELP}")
    return out


def protocol_overrides(train_centres: Sequence[str], test_centres: Sequence[str]) -> list[str]:
    """Overrides that train on ``train_centres``' training rows and test every tile of ``test_centres``."""
    return [f"data.train_centres={_list(train_centres)}", f"data.test_centres={_list(test_centres)}", "data.test_split=null"]

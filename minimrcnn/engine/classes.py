"""The classes of a run come from its training data.

A COCO file lists its categories; the model needs ``num_classes`` = categories + 1 (the
background). A named preset (``shapes-cpu`` ...) was sized for the shapes set, so on
another dataset it adapts and says so in one line; a user's config that fixes a
different ``num_classes`` is an error that names both numbers and the field. Training and
validation must list the same categories, or labels would mean different things.
"""

from __future__ import annotations

import dataclasses

from minimrcnn.config import Config

MAX_IDS_SHOWN = 10


def categories_of(dataset) -> dict[int, str]:
    """``{category id: name}`` of a ``CocoInstances``-like dataset (``category_ids`` and
    ``class_names`` with the background at index 0)."""
    return dict(zip((int(c) for c in dataset.category_ids[1:]), dataset.class_names[1:]))


def _shown(ids) -> str:
    ids = sorted(ids)
    return str(ids[:MAX_IDS_SHOWN])[:-1] + (", ...]" if len(ids) > MAX_IDS_SHOWN else "]")


def check_same_categories(reference: dict, other: dict, reference_name: str, other_name: str) -> None:
    """Raise ValueError naming the category ids on which two ``{id: name}`` maps disagree."""
    if reference == other:
        return
    problems = []
    only_reference = set(reference) - set(other)
    only_other = set(other) - set(reference)
    renamed = sorted(c for c in set(reference) & set(other) if reference[c] != other[c])
    if only_reference:
        problems.append(f"ids only in {reference_name}: {_shown(only_reference)}")
    if only_other:
        problems.append(f"ids only in {other_name}: {_shown(only_other)}")
    if renamed:
        problems.append("ids named differently: " + ", ".join(
            f"{c} ({reference[c]!r} vs {other[c]!r})" for c in renamed[:MAX_IDS_SHOWN]))
    raise ValueError(f"{reference_name} and {other_name} must list the same categories; "
                     + "; ".join(problems))


def config_for_dataset(config: Config, dataset, fixed: bool = False, source: str = "config",
                       announce=print) -> Config:
    """``config`` with ``num_classes`` taken from ``dataset`` (categories + background).

    fixed: the user's config set ``num_classes`` itself (a JSON file naming the field);
        then a mismatch is a ValueError naming both numbers and the field to change,
        else the config adapts and ``announce`` gets one line saying so.
    source: how the error names the config (its file).
    """
    wanted = int(dataset.num_classes)
    if config.num_classes == wanted:
        return config
    where = getattr(dataset, "annotation_file", "the train annotations")
    if fixed:
        raise ValueError(
            f"{source}: num_classes is {config.num_classes} but {where} lists {wanted - 1} categories, "
            f"i.e. num_classes {wanted} with the background; set \"num_classes\": {wanted} in {source} "
            "(or leave the field out to take it from the data)")
    announce(f"{wanted} classes from train annotations ({wanted - 1} categories + background)")
    return dataclasses.replace(config, num_classes=wanted)


__all__ = ["categories_of", "check_same_categories", "config_for_dataset"]

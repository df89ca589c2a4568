"""The one loader for configurations read back from files (checkpoints, run folders).

A checkpoint is data. Its `model_config` (and its `data_config`, and whatever configs a
later format adds) is plain containers, numbers and strings, written resolved at save time.
Reading one back must never run code that the file chooses, so nothing here hands such a
tree to Hydra's `instantiate` or to OmegaConf:

- `check_stored_config(node, source)` walks the whole tree *before anything is imported or
  called* and returns a plain copy (dicts, lists, str, int, float, bool, None). It refuses,
  with a one-line `CheckpointError` naming the key path and the offending value:
  a `_target_` that is not a name of detkit's registry of config targets
  (`detkit.config.registry.targets()`: model, backbone, data and schedule builders; at any
  depth: nested nodes, lists, `_args_`); any other Hydra option key (`_partial_`, `_recursive_`,
  `_convert_`, and any `_name_` key a later Hydra may add); `_args_` that is not a list or
  sits on a node without `_target_`; an argument its builder no longer takes
  (`detkit.config.registry.REMOVED_ARGUMENTS`: the message says what configures that part
  now); a string holding `${` (an interpolation: `${oc.env:..}`, `${now:..}`, any resolver;
  stored configs are resolved when written, so nothing is resolved when reading); a builder
  argument that names a file to read (`detkit.config.registry.FILE_ARGUMENTS`, unless
  `allow_files`); any other type (tensors, bytes, sets ...); nesting deeper than `MAX_DEPTH`.
- `check_node(node, source)`: the same check, its result held as a `CheckedConfig` (the plain
  tree, where it came from), which `CheckedConfig.build()` builds without checking it again:
  every `_target_` is looked up in the registry by its exact name (a dict lookup: no import by
  name, no Hydra), children first in key order, `_args_` as positional arguments, dicts and
  lists passed as plain dicts and lists. That is what `hydra.utils.instantiate(node,
  _convert_="all")` does for the configs detkit ships (tests/engine/test_checkpoint_safety.py
  compares the two), without a second parser of the tree whose reading could differ from
  this check's. A training run checks its config's nodes once this way
  (`detkit.config.schemas.check_train_config`) and builds from what it got.
- `check_partial_node(node, source)`: the same for a `_partial_: true` node of a run's own
  config (never a stored one: those refuse `_partial_`), whose `build(*args)` calls it with
  `args` first, as `hydra.utils.instantiate(node)(*args)` would (the optimizer with the model,
  the LR schedule with the optimizer).
- `build_stored(node, source)` and `build_partial(node, source, *args)`: check, then build.
- `without_files(tree)`: a checked tree as a checkpoint stores it, every argument naming a
  file set to null (the checkpoint holds the weights).
- `check_label_map` / `check_class_names`: the class mappings (int -> int, int -> str).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detkit.config.registry import FILE_ARGUMENTS, REMOVED_ARGUMENTS, targets

__all__ = ["CheckpointError", "MAX_DEPTH", "CheckedConfig", "check_stored_config", "check_node",
           "check_partial_node", "build_stored", "build_partial", "without_files", "check_label_map",
           "check_class_names"]

MAX_DEPTH = 32
_HYDRA_KEY = re.compile(r"^_.+_$")      # _target_, _args_, _partial_, _recursive_, _convert_, ...
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
_SCALARS = (str, int, float, bool, type(None))


def _registry() -> tuple[Mapping[str, Any], Mapping[str, tuple[str, ...]]]:
    # The registry imports the builders it names when first asked for, so that readers of
    # plain files (the ablation report) do not pay for torch.
    return targets(), FILE_ARGUMENTS


class CheckpointError(ValueError):
    """A checkpoint (or other stored file) that is missing, unreadable, does not fit the model,
    or holds something refused on loading. The message is one line."""


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)  # repr: quoted, newlines escaped (the message stays one line)
    return text if len(text) <= limit else text[:limit] + "..."


def _join(path: str, key: Any) -> str:
    """The key path of `key` under `path`: a.b, a[3], a['odd key']."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_short(key, 60)}]"


def _refuse(source: str, path: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{source}: refused {path or '<root>'}: {reason}")


def check_stored_config(node: Any, source: str, *, root: str = "", allow_files: bool = False) -> Any:
    """A plain copy of the stored config `node` after refusing everything the module docstring
    lists; `source` (the file) and `root` (the node's key path in it, e.g. "model_config")
    name it in the one-line CheckpointError. Nothing is imported or called."""
    return _check(node, str(source), root, allow_files, 0)


def _check(node: Any, source: str, path: str, allow_files: bool, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _refuse(source, path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, str):
        if "${" in node:
            raise _refuse(source, path, f"interpolation {_short(node)}: stored configs are written resolved "
                                        f"and nothing in one is resolved on loading")
        return node
    if isinstance(node, _SCALARS):
        return node
    if isinstance(node, (list, tuple)):
        return [_check(item, source, _join(path, i), allow_files, depth + 1) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        raise _refuse(source, path, f"a {type(node).__name__} is not plain config data (dicts, lists, strings, "
                                    f"numbers, booleans, null)")
    # Keys first, the target before anything else: nothing below a refused node is looked at.
    for key in node:
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise _refuse(source, _join(path, key), f"a {type(key).__name__} key is not plain config data")
        if isinstance(key, str) and "${" in key:
            raise _refuse(source, _join(path, key), "interpolation in a key")
    target = node.get("_target_")
    if "_target_" in node:
        builders, _ = _registry()
        if not isinstance(target, str) or target not in builders:
            close = difflib.get_close_matches(target, list(builders), n=1) if isinstance(target, str) else []
            hint = f"; did you mean {close[0]}?" if close else ""
            raise _refuse(source, _join(path, "_target_"),
                          f"_target_ {_short(target)} is not a detkit builder{hint} (the {len(builders)} "
                          f"allowed ones: targets() in detkit/config/registry.py, docs/checkpoints.md)")
        bad_key = next((k for k in node if not isinstance(k, str) or not k.isidentifier()), None)
        if bad_key is not None:
            raise _refuse(source, _join(path, bad_key), f"{_short(bad_key)} cannot be an argument of {target}")
        removed = REMOVED_ARGUMENTS.get(target, {})
        gone = next((k for k in node if k in removed), None)
        if gone is not None:
            raise _refuse(source, _join(path, gone),
                          f"{target} has no {gone!r} option any more: {removed[gone]}")
    for key in node:
        if isinstance(key, str) and _HYDRA_KEY.match(key) and key != "_target_":
            if key != "_args_":
                raise _refuse(source, _join(path, key), f"Hydra option {_short(key, 60)} is not allowed in a stored config "
                                                        f"(only _target_ naming a detkit builder, and _args_)")
            if target is None:
                raise _refuse(source, _join(path, key), "_args_ without _target_")
            if not isinstance(node[key], (list, tuple)):
                raise _refuse(source, _join(path, key), f"_args_ must be a list, got {type(node[key]).__name__}")
    if target is not None and not allow_files:
        for argument in _registry()[1].get(target, ()):
            if node.get(argument) is not None:
                raise _refuse(source, _join(path, argument),
                              f"{target} argument {argument}={_short(node[argument])} names a file to read; a "
                              f"stored config leaves it null (the checkpoint holds the weights)")
    return {key: _check(value, source, _join(path, key), allow_files, depth + 1) for key, value in node.items()}


@dataclass(frozen=True)
class CheckedConfig:
    """A config node that passed `check_stored_config`: its plain copy (`tree`: dicts, lists,
    strings, numbers, booleans, null; every `_target_` a name of the registry), the file or
    config it came from (`source`) and its key path there (`root`), which name it in errors,
    and whether it is a `_partial_` node (`partial`: built called with arguments first; the
    tree without `_partial_`). Made by `check_node` / `check_partial_node`; `build` builds it
    without a second check."""

    tree: Any
    source: str
    root: str = ""
    partial: bool = False

    def build(self, *first_args: Any) -> Any:
        """The object the tree describes, built with the registry's builders (module
        docstring); a partial node is called with `first_args` before its own arguments. A
        builder that rejects its arguments (TypeError, ValueError) gives a one-line
        CheckpointError naming the node."""
        if first_args and not self.partial:
            raise TypeError(f"{self.root or '<root>'} of {self.source} is not a _partial_ node: it is built "
                            f"without arguments, got {len(first_args)}")
        return _build(self.tree, self.source, self.root, first_args)


def check_node(node: Any, source: str, *, root: str = "", allow_files: bool = False) -> CheckedConfig:
    """`check_stored_config(node, source, root=root, allow_files=allow_files)`, as a
    `CheckedConfig` to build."""
    return CheckedConfig(check_stored_config(node, source, root=root, allow_files=allow_files), str(source), root)


def check_partial_node(node: Any, source: str, *, root: str = "", arguments: int = 1) -> CheckedConfig:
    """A `_partial_: true` node of a run's own config, resolved plain data, checked as a stored
    config is (files allowed) without its `_partial_` key: a `CheckedConfig` whose `build` is
    called with the `arguments` objects it is made for (the model, the optimizer)."""
    if not isinstance(node, dict) or node.get("_partial_") is not True or "_target_" not in node:
        raise _refuse(str(source), root, f"{_short(node)} is not a node with a _target_ and _partial_: true "
                                         f"(it is called with {arguments} more argument(s))")
    plain = check_stored_config({k: v for k, v in node.items() if k != "_partial_"}, source, root=root,
                                allow_files=True)
    return CheckedConfig(plain, str(source), root, partial=True)


def build_stored(node: Any, source: str, *, root: str = "", allow_files: bool = False) -> Any:
    """`check_node`, then build the tree (`CheckedConfig.build`)."""
    return check_node(node, source, root=root, allow_files=allow_files).build()


def build_partial(node: Any, source: str, *args: Any, root: str = "") -> Any:
    """Build a `_partial_: true` node of a run's own config, called with `args` before its
    keyword arguments: `hydra.utils.instantiate(node)(*args)` through the registry
    (`check_partial_node`, then `CheckedConfig.build`)."""
    return check_partial_node(node, source, root=root, arguments=len(args)).build(*args)


def without_files(tree: Any) -> Any:
    """A copy of the checked plain `tree` with every argument that names a file to read
    (`detkit.config.registry.FILE_ARGUMENTS` of its node's `_target_`, at any depth) set to
    null: what a checkpoint stores (it holds the weights), which passes `check_stored_config`
    without `allow_files`."""
    if isinstance(tree, list):
        return [without_files(item) for item in tree]
    if not isinstance(tree, dict):
        return tree
    copy = {key: without_files(value) for key, value in tree.items()}
    for argument in FILE_ARGUMENTS.get(copy.get("_target_"), ()):
        if argument in copy:
            copy[argument] = None
    return copy


def _build(node: Any, source: str, path: str, first_args: tuple = ()) -> Any:
    if isinstance(node, list):
        return [_build(item, source, _join(path, i)) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {key: _build(value, source, _join(path, key)) for key, value in node.items()}
    target = node["_target_"]
    builder = _registry()[0][target]  # checked: a key of the allowlist
    args = [_build(item, source, _join(_join(path, "_args_"), i)) for i, item in enumerate(node.get("_args_", ()))]
    kwargs = {key: _build(value, source, _join(path, key)) for key, value in node.items()
              if key not in ("_target_", "_args_")}
    try:
        return builder(*first_args, *args, **kwargs)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{source}: cannot build {path or '<root>'} with {target}: {message}") from exc


def check_label_map(node: Any, source: str, root: str) -> dict[int, int]:
    """A class mapping model label -> dataset category id: a dict of ints to ints."""
    if not isinstance(node, dict):
        raise _refuse(source, root, f"a {type(node).__name__}, not a mapping of ints to ints")
    for key, value in node.items():
        if not _is_int(key) or not _is_int(value):
            raise _refuse(source, _join(root, key), f"{_short(key)}: {_short(value)} is not an int -> int entry")
    return {int(k): int(v) for k, v in node.items()}


def check_class_names(node: Any, source: str, root: str) -> dict[int, str] | list[str]:
    """Class names: a dict of ints (model labels) to strings, or a list of strings."""
    if isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            if not isinstance(value, str):
                raise _refuse(source, _join(root, i), f"{_short(value)} is not a string")
        return [str(v) for v in node]
    if not isinstance(node, dict):
        raise _refuse(source, root, f"a {type(node).__name__}, not a mapping of ints to names")
    for key, value in node.items():
        if not _is_int(key) or not isinstance(value, str):
            raise _refuse(source, _join(root, key), f"{_short(key)}: {_short(value)} is not an int -> name entry")
    return {int(k): str(v) for k, v in node.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


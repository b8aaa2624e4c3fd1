"""Reward names -> callables: the built-in registry, ``package.module:function``, ``path/to/file.py:function``.

A config names each reward with one string. Resolution returns a :class:`RewardRef`, a
small picklable description (the target and its kwargs), and :func:`prepare` turns a ref
into the callable to run. The two steps are separate so that process-pool workers rebuild
the callable from the ref themselves: closures, file-loaded modules and factory products
never have to be pickled.

Kwargs: a *reward function* (TRL's ``f(prompts, completions, **columns)``) gets the config's
``kwargs`` as extra keyword arguments on every call; a *factory* (a class, a built-in marked
as such, or a function taking none of ``prompts``/``completions``/``completion_ids`` and no
``**kwargs``, e.g. ``trl.rewards:get_soft_overlong_punishment``) is called once with them and
must return the reward function. The reserved kwarg ``completions_as`` (``text`` or
``messages``) picks the completion format handed over; functions from the ``trl`` package
default to ``messages`` (TRL's conversational ``[{"role": "assistant", "content": ...}]``),
everything else to plain strings.

Plugins: a package can add names under the ``placerl.rewards`` entry-point group.
Left out: reloading a file whose source changed during the run (it is loaded once).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# name -> (target "module:attr", is_factory). Strings, so that nothing is imported until used.
_BUILTINS: dict[str, tuple[str, bool]] = {
    "gsm8k_strict": ("rewards.gsm8k:gsm8k_strict", False),
    "gsm8k_flexible": ("rewards.gsm8k:gsm8k_flexible", False),
    "format_hash": ("rewards.shaping:format_hash", False),
    "answer_tag": ("rewards.shaping:answer_tag", False),
    "think_format": ("rewards.shaping:think_format", False),
    "length_penalty": ("rewards.shaping:length_penalty", True),
    "overlong_penalty": ("rewards.shaping:overlong_penalty", True),
}
_USER: dict[str, tuple[str, bool]] = {}
_FORMATS = ("text", "messages")
_REWARD_PARAMS = {"prompts", "completions", "completion_ids"}


class RewardError(ValueError):
    """A reward configuration or a reward function's return value is wrong; one line says which."""


@dataclass(frozen=True)
class RewardRef:
    """What to run: a target (``module:attr`` or ``/abs/file.py:attr``) or an object, and its kwargs."""
    label: str
    target: str | Callable
    kwargs: dict = field(default_factory=dict)
    factory: bool | None = None  # None: decide from the signature


@dataclass
class PreparedReward:
    """A ready-to-call reward: the function, its bound kwargs and how to hand it completions."""
    label: str
    fn: Callable
    call_kwargs: dict
    as_messages: bool
    accepts: frozenset | None  # parameter names, or None when it takes **kwargs


def register(name: str, factory: bool = False):
    """Decorator adding a function to the registry under ``name`` (process workers re-import it by module)."""
    def add(fn):
        _USER[name] = (f"{fn.__module__}:{fn.__qualname__}", factory)
        return fn
    return add


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group="placerl.rewards")}


def registry_names() -> list[str]:
    return sorted({**_BUILTINS, **_USER, **_plugins()})


def resolve(name: str | Callable, kwargs: dict | None = None, where: str = "reward.functions[0].name") -> RewardRef:
    """A checked reference to a reward: raises RewardError (one line, naming ``where``) if it cannot load."""
    kwargs = dict(kwargs or {})
    fmt = kwargs.get("completions_as")
    if fmt is not None and fmt not in _FORMATS:
        raise RewardError(f"{where}: kwargs.completions_as={fmt!r} is not allowed; choose text or messages")
    if callable(name):
        ref = RewardRef(getattr(name, "__name__", type(name).__name__), name, kwargs)
    elif not isinstance(name, str) or not name:
        raise RewardError(f"{where}={name!r} is not a reward; give a registry name, package.module:function "
                          "or path/to/file.py:function")
    elif ":" in name:
        path, _, attr = name.rpartition(":")
        if path.endswith(".py"):
            file = Path(path).expanduser().resolve()
            if not file.is_file():
                raise RewardError(f"{where}={name!r}: file {path} not found; give a path relative to the "
                                  "working directory or an absolute one")
            path = str(file)
        ref = RewardRef(attr.rsplit(".", 1)[-1], f"{path}:{attr}", kwargs)
    else:
        known = {**_BUILTINS, **_USER}
        if name in known:
            target, factory = known[name]
            ref = RewardRef(name, target, kwargs, factory)
        elif name in (plugins := _plugins()):
            ref = RewardRef(name, plugins[name], kwargs)
        else:
            close = difflib.get_close_matches(name, registry_names(), n=3, cutoff=0.5)
            hint = f"close names: {', '.join(close)}" if close else f"registered: {', '.join(registry_names())}"
            raise RewardError(f"{where}={name!r} is not a registered reward; {hint} "
                              "(or give package.module:function / path/to/file.py:function)")
    _load_target(ref.target, f"{where}={name!r}" if isinstance(name, str) else where)  # a typo fails now
    return ref


_FILE_MODULES: dict[str, Any] = {}


def _load_file(path: str):
    if path not in _FILE_MODULES:
        # A stable, unique module name per file: two files named rewards.py must not collide.
        modname = f"placerl_user_rewards.{Path(path).stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        spec.loader.exec_module(module)
        _FILE_MODULES[path] = module
    return _FILE_MODULES[path]


def _load_target(target: str | Callable, where: str = "reward") -> Callable:
    if callable(target):
        return target
    path, _, attr = target.rpartition(":")
    try:
        obj = _load_file(path) if path.endswith(".py") else importlib.import_module(path)
    except Exception as e:  # any import-time failure is a config problem for the user
        raise RewardError(f"{where}: cannot load {path!r} ({type(e).__name__}: {e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"{where}: {path!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{where}: {target!r} is a {type(obj).__name__}, not a function")
    return obj


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return None


def _accepts(fn: Callable) -> frozenset | None:
    sig = _signature(fn)
    if sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return frozenset(sig.parameters)


def _is_factory(obj: Callable) -> bool:
    if inspect.isclass(obj):
        return True
    accepts = _accepts(obj)
    return accepts is not None and not (accepts & _REWARD_PARAMS)


def prepare(ref: RewardRef) -> PreparedReward:
    """Load the target and build the callable (calling a factory with the kwargs). A callable
    with a ``warm_up`` attribute has it run here, once per process that prepares it: a heavy
    import or a parser's first use is paid when the run starts, not inside a training step."""
    prepared = _prepare(ref)
    warm_up = getattr(prepared.fn, "warm_up", None)
    if callable(warm_up):
        warm_up()
    return prepared


def _prepare(ref: RewardRef) -> PreparedReward:
    obj = _load_target(ref.target, ref.label)
    kwargs = dict(ref.kwargs)
    fmt = kwargs.pop("completions_as", None)
    module = getattr(obj, "__module__", "") or ""
    as_messages = (fmt == "messages") if fmt else module.split(".")[0] == "trl"
    factory = _is_factory(obj) if ref.factory is None else ref.factory
    if factory:
        try:
            fn = obj(**kwargs)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {ref.label!r}: bad kwargs {kwargs} ({e})") from e
        if not callable(fn):
            raise RewardError(f"reward {ref.label!r}: the factory returned a {type(fn).__name__}, not a function")
        return PreparedReward(ref.label, fn, {}, as_messages, _accepts(fn))
    accepts = _accepts(obj)
    unknown = sorted(set(kwargs) - accepts) if accepts is not None else []
    if unknown:
        raise RewardError(f"reward {ref.label!r} takes no parameter {unknown[0]!r}; its parameters are "
                          f"{', '.join(sorted(accepts))}")
    return PreparedReward(ref.label, obj, kwargs, as_messages, accepts)

"""Which parameters an attribution pass differentiates: by name pattern, by module type, or all trainable ones."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["select_parameters", "last_linear", "resolve_module_types"]


def resolve_module_types(types: Sequence[str | type] | None) -> tuple[type, ...]:
    """Module classes from classes or names (``"Linear"``, ``"torch.nn.Conv2d"``)."""
    out = []
    for t in types or ():
        if isinstance(t, type):
            out.append(t)
            continue
        name = t.rsplit(".", 1)[-1]
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"`module_types` entry {t!r} is not a torch.nn module class (e.g. 'Linear', 'Conv2d').")
        out.append(cls)
    return tuple(out)


def select_parameters(
    module: nn.Module,
    patterns: Sequence[str] | None = None,
    module_types: Sequence[str | type] | None = None,
) -> dict[str, nn.Parameter]:
    """Parameters of ``module`` by name, in registration order.

    Args:
        patterns: ``fnmatch`` patterns on parameter names (``"model.fc.*"``, ``"*conv*.weight"``); a parameter is kept
            when any pattern matches. None: every parameter that requires grad.
        module_types: keep only parameters owned directly by modules of these types (``["Linear", "Conv2d"]``).

    Raises ``ValueError`` naming the patterns / types and a few available names when nothing matches.
    """
    types = resolve_module_types(module_types)
    owners = {f"{m_name}.{p_name}" if m_name else p_name: m for m_name, m in module.named_modules()
              for p_name, _ in m.named_parameters(recurse=False)}
    chosen = {}
    for name, p in module.named_parameters():
        if patterns is None and not p.requires_grad:
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            continue
        if types and not isinstance(owners[name], types):
            continue
        chosen[name] = p
    if not chosen:
        names = [n for n, _ in module.named_parameters()]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"`parameters`={list(patterns) if patterns is not None else 'all trainable'} with `module_types`="
            f"{[t.__name__ for t in types] or None} matches no parameter of {type(module).__name__}; "
            f"its parameters are: {shown or 'none'}."
        )
    return chosen


def last_linear(module: nn.Module, example: Tensor | None = None) -> str:
    """Name of the classifier layer.

    With an ``example`` input (B, ...): the last ``nn.Linear`` called in ``module(example)`` whose output the module's
    output depends on (read from the forward graph, so an unused or auxiliary Linear registered after the classifier is
    never picked). Without: timm's ``get_classifier()`` when it is a Linear, else the last registered ``nn.Linear``.
    """
    named = dict(module.named_modules())
    linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"`last_layer=True` needs an nn.Linear output layer; {type(module).__name__} has none.")
    if example is not None:
        return _last_called_linear(module, linears, example)
    for m in named.values():
        get = getattr(m, "get_classifier", None)
        if callable(get):
            head = get()
            if isinstance(head, nn.Linear):
                return next(n for n, mm in named.items() if mm is head)
    return linears[-1]


def _last_called_linear(module: nn.Module, linears: list[str], example: Tensor) -> str:
    named = dict(module.named_modules())
    calls: list[tuple[str, Tensor]] = []
    handles = [named[n].register_forward_hook(lambda m, i, o, n=n: calls.append((n, o))) for n in linears]
    flags = {p: p.requires_grad for n in linears for p in named[n].parameters()}
    try:
        for p in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = module(example)
        if not isinstance(out, Tensor):
            raise ValueError(f"{type(module).__name__}(x) returned {type(out).__name__}, not a logits tensor (B, K).")
        used = [(n, o) for n, o in calls if o.requires_grad]
        grads = torch.autograd.grad(out.float().sum(), [o for _, o in used], allow_unused=True) if used else ()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    feeding = [n for (n, _), g in zip(used, grads) if g is not None]
    if not feeding:
        raise ValueError(f"the output of {type(module).__name__} depends on none of its nn.Linear layers {linears[:5]}; "
                         "`last_layer=True` needs a Linear classifier layer (or pass `parameters=`).")
    return feeding[-1]

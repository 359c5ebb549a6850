"""Stages: the units of freezing of a backbone, from input to output, named as in the model (`layer4`, `blocks.6`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Stage:
    """One unit of freezing: a name (`layer4`, `blocks.6`) and the names of its parameters."""

    name: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class CamLayer:
    """Where a class activation map looks: the module (a path in the backbone's body) whose output is the last
    spatial feature map, and that output's layout: `nchw` (convolutions), `nhwc` (Swin, MambaOut) or `tokens`
    (a vision transformer's (batch, prefix + height * width, channels), its first `prefix_tokens` not spatial)."""

    module: str
    layout: Literal["nchw", "nhwc", "tokens"] = "nchw"
    prefix_tokens: int = 0


def stages_from_blocks(model: nn.Module, blocks: Sequence[str | Sequence[str]]) -> list[Stage]:
    """One stage per block (a module path, or a list of paths named by the first). Other parameters before the
    first block form the `stem`; later ones one stage per top-level module (a VGG `classifier`, a ViT `encoder.ln`)."""
    prefixes = [[b] if isinstance(b, str) else list(b) for b in blocks]
    groups: list[tuple[int | str, list[str]]] = []
    seen_block = False
    for pname, _ in model.named_parameters():
        idx = next((i for i, ps in enumerate(prefixes) if any(pname.startswith(p + ".") for p in ps)), None)
        seen_block = seen_block or idx is not None
        key: int | str = idx if idx is not None else _top(pname) if seen_block else "stem"
        if groups and groups[-1][0] == key:
            groups[-1][1].append(pname)
        else:
            groups.append((key, [pname]))
    return [
        Stage(prefixes[key][0], tuple(params)) if isinstance(key, int) else name_groups([params], first=not i)[0]
        for i, (key, params) in enumerate(groups)
    ]


def name_groups(groups: Sequence[Sequence[str]], first: bool = True) -> list[Stage]:
    """Name each group of parameter names by the module prefix its members share (`layer4`, `blocks.6`)."""
    stages: list[Stage] = []
    for i, params in enumerate(groups):
        modules = [p.rpartition(".")[0] or p for p in params]
        name = _short(_common_prefix(modules))
        if not name:
            first_top = _top(modules[0])
            name = "stem" if i == 0 and first else _short(_common_prefix([m for m in modules if _top(m) == first_top]))
        if name in {s.name for s in stages}:
            name = modules[0]
        stages.append(Stage(name, tuple(params)))
    return stages


def _short(prefix: str) -> str:
    """Cut a module path after its first numbered part: `blocks.6.0` -> `blocks.6`, `layer4.1` -> `layer4`."""
    parts = prefix.split(".")
    for i, part in enumerate(parts):
        if part and part[-1].isdigit():
            return ".".join(parts[: i + 1])
    return prefix


def has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _top(name: str) -> str:
    return name.split(".")[0]


def check_stages_cover(body: nn.Module, stages: Sequence[Stage], name: str) -> None:
    params = [n for n, _ in body.named_parameters()]
    assigned = [p for s in stages for p in s.params]
    if sorted(params) != sorted(assigned):
        raise RuntimeError(f"stage rules for {name} do not cover every parameter exactly once")

"""PlacementPlan: which modules get LoRA adapters, at what rank and alpha, with which B entries.

A plan is the single artefact a scorer produces and every consumer reads: placerl's
trainer (through ``apply_plan``), the vLLM rollout side (``max_rank``), and any PEFT
user (``to_peft_config``). Modules are named in full (``model.layers.6.mlp.down_proj``);
in the PEFT config they appear verbatim in ``target_modules`` and ``re.escape``-d in
``rank_pattern``/``alpha_pattern`` (PEFT reads pattern keys as regexes).

A B mask (``AdapterSpec.mask``, shape ``(d_out, rank)``, True = trainable) means: A is
frozen and only the True entries of B train. Masks are stored in JSON as base64 of
packed bits so that a plan with a million-entry mask stays a few hundred kilobytes.

Left out: building the PEFT model (``placement/apply.py``) and scoring (``scorers/``).
"""
from __future__ import annotations

import base64
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from core.lora import lora_scale
from placement.settings import ALPHA_POLICIES

FORMAT_VERSION = 1
ADAPTER_NAME = "default"


@dataclass
class AdapterSpec:
    module_name: str
    rank: int
    alpha: float
    mask: torch.Tensor | None = None  # bool (d_out, rank); None = dense LoRA, A and B train
    shape: tuple[int, int] | None = None  # the base weight's (d_out, d_in), when known

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter {self.module_name}: rank={self.rank} must be >= 1")
        if self.mask is not None:
            self.mask = torch.as_tensor(self.mask, dtype=torch.bool).cpu()
            if self.mask.dim() != 2 or self.mask.shape[1] != self.rank:
                raise ValueError(f"adapter {self.module_name}: mask shape {tuple(self.mask.shape)} "
                                 f"must be (d_out, rank={self.rank})")
            if self.shape is not None and self.mask.shape[0] != self.shape[0]:
                raise ValueError(f"adapter {self.module_name}: mask has {self.mask.shape[0]} rows "
                                 f"but the weight has d_out={self.shape[0]}")
        if self.shape is not None:
            self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def train_a(self) -> bool:
        return self.mask is None

    def trainable_parameters(self, shape: tuple[int, int] | None = None) -> int:
        d_out, d_in = shape or self.shape or (None, None)
        if self.mask is not None:
            return int(self.mask.sum())
        if d_out is None:
            raise ValueError(f"adapter {self.module_name}: shape unknown; pass the model or its shapes")
        return self.rank * (d_in + d_out)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"module": self.module_name, "rank": self.rank, "alpha": self.alpha}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.mask is not None:
            bits = np.packbits(self.mask.numpy().reshape(-1))
            out["mask"] = {"rows": int(self.mask.shape[0]), "count": int(self.mask.sum()),
                           "bits": base64.b64encode(bits.tobytes()).decode("ascii")}
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "AdapterSpec":
        mask = None
        if d.get("mask"):
            rows, rank = int(d["mask"]["rows"]), int(d["rank"])
            raw = np.frombuffer(base64.b64decode(d["mask"]["bits"]), dtype=np.uint8)
            flat = np.unpackbits(raw)[: rows * rank].astype(bool)
            mask = torch.from_numpy(flat.reshape(rows, rank).copy())
            if int(mask.sum()) != int(d["mask"]["count"]):
                raise ValueError(f"adapter {d['module']}: mask bits hold {int(mask.sum())} entries, "
                                 f"the plan says {d['mask']['count']}; the plan file is corrupt")
        shape = tuple(d["shape"]) if d.get("shape") else None
        return cls(d["module"], int(d["rank"]), float(d["alpha"]), mask=mask, shape=shape)


@dataclass
class PlacementPlan:
    adapters: list[AdapterSpec]
    scorer: str
    budget: str = ""
    alpha_policy: str = "fixed"
    dropout: float = 0.0
    seed: int = 0  # seeds the per-module initialisation of A (see placement.apply)
    scores: dict[str, float] = field(default_factory=dict)  # per candidate module
    details: dict[str, Any] = field(default_factory=dict)  # scorer-specific summary, JSON-able
    seconds: float = 0.0  # wall time the scorer took, probe included
    baseline_params: int = 0  # trainable parameters of the uniform baseline on the same candidates
    model: str = ""

    def __post_init__(self) -> None:
        if self.alpha_policy not in ALPHA_POLICIES:
            raise ValueError(f"plan alpha_policy={self.alpha_policy!r} is not one of {', '.join(ALPHA_POLICIES)}")
        if not self.adapters:
            raise ValueError(f"plan from scorer {self.scorer!r} places no adapter; raise the budget")
        names = [a.module_name for a in self.adapters]
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise ValueError(f"plan lists module {dup[0]!r} twice; each module gets one adapter")

    # ------------------------------------------------------------------ queries
    def module_names(self) -> list[str]:
        return [a.module_name for a in self.adapters]

    def spec(self, module_name: str) -> AdapterSpec:
        for a in self.adapters:
            if a.module_name == module_name:
                return a
        raise KeyError(module_name)

    def max_rank(self) -> int:
        """The largest adapter rank: what vLLM's max_lora_rank must admit."""
        return max(a.rank for a in self.adapters)

    @property
    def use_rslora(self) -> bool:
        return self.alpha_policy == "rslora"

    def scale(self, spec: AdapterSpec) -> float:
        return lora_scale(spec.rank, spec.alpha, self.use_rslora)

    def trainable_parameters(self, model_or_shapes: Any = None) -> int:
        """Trainable adapter parameters: r (d_in + d_out) per dense adapter, mask entries otherwise.

        ``model_or_shapes``: None (use the shapes recorded in the plan), a module whose
        Linear layers carry the planned names, or a dict name -> (d_out, d_in).
        """
        shapes: dict[str, tuple[int, int]] = {}
        if isinstance(model_or_shapes, torch.nn.Module):
            mods = dict(model_or_shapes.named_modules())
            for a in self.adapters:
                # A PEFT model names its base modules under base_model.model.
                mod = mods.get(a.module_name) or mods.get(f"base_model.model.{a.module_name}")
                if mod is None:
                    raise ValueError(f"plan module {a.module_name!r} is not in the model")
                w = mod.weight
                shapes[a.module_name] = (w.shape[0], w.shape[1])
        elif model_or_shapes is not None:
            shapes = {k: tuple(v) for k, v in dict(model_or_shapes).items()}
        return sum(a.trainable_parameters(shapes.get(a.module_name)) for a in self.adapters)

    def b_masks(self, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
        """PEFT parameter name of each masked lora_B weight -> its bool mask (True = trains)."""
        return {f"base_model.model.{a.module_name}.lora_B.{adapter_name}.weight": a.mask
                for a in self.adapters if a.mask is not None}

    # ------------------------------------------------------------------ PEFT
    def to_peft_config(self, **overrides: Any):
        """A ``peft.LoraConfig`` that builds exactly this plan (masks aside: see apply_plan)."""
        from peft import LoraConfig

        r0 = Counter(a.rank for a in self.adapters).most_common(1)[0][0]
        alpha0 = Counter(a.alpha for a in self.adapters).most_common(1)[0][0]
        kwargs: dict[str, Any] = dict(
            r=r0, lora_alpha=alpha0,
            target_modules=self.module_names(),
            rank_pattern={re.escape(a.module_name): a.rank for a in self.adapters if a.rank != r0},
            alpha_pattern={re.escape(a.module_name): a.alpha for a in self.adapters if a.alpha != alpha0},
            lora_dropout=self.dropout, use_rslora=self.use_rslora, bias="none", task_type="CAUSAL_LM")
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "scorer": self.scorer, "budget": self.budget,
                "alpha_policy": self.alpha_policy, "dropout": self.dropout, "seed": self.seed,
                "model": self.model, "seconds": self.seconds, "baseline_params": self.baseline_params,
                "trainable_params": self.trainable_parameters() if self._shapes_known() else None,
                "adapters": [a.to_dict() for a in self.adapters],
                "scores": self.scores, "details": self.details}

    def _shapes_known(self) -> bool:
        return all(a.shape is not None or a.mask is not None for a in self.adapters)

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> "PlacementPlan":
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"plan format={d.get('format')!r} is not {FORMAT_VERSION}; "
                             "re-run `placerl score` to write a current plan")
        return cls(adapters=[AdapterSpec.from_dict(a) for a in d["adapters"]], scorer=d["scorer"],
                   budget=d.get("budget", ""), alpha_policy=d.get("alpha_policy", "fixed"),
                   dropout=float(d.get("dropout", 0.0)), seed=int(d.get("seed", 0)),
                   scores={k: float(v) for k, v in d.get("scores", {}).items()},
                   details=d.get("details", {}), seconds=float(d.get("seconds", 0.0)),
                   baseline_params=int(d.get("baseline_params", 0)), model=d.get("model", ""))

    @classmethod
    def from_json(cls, text: str) -> "PlacementPlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # a reader never sees half a plan
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PlacementPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"placement.plan={str(path)!r} does not exist; write one with `placerl score`")
        return cls.from_json(path.read_text())

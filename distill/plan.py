"""Stage I of FastLightGen: which blocks go, and the student that results.

    plan = make_plan(teacher, result["importance"], budget=0.30, source={"bundle": str(path)})
    plan.to_json("plan.json")                       # a file users may edit (drop / keep)
    student = apply_plan(teacher, PruningPlan.from_json("plan.json"))

Rule (docs/distillation.md): drop the least important blocks, one at a time, until the
removed parameter count reaches `budget` x (all DiT parameters); the first and the last
block are never dropped. Blocks differ in size when heads or FFN widths are pruned, so
the budget counts parameters, not blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from flgengine.config import ConfigError, JsonConfig
from flgengine.model import DiT

__all__ = ["DEFAULT_BUDGET", "PruningPlan", "block_params", "plan_from_drop", "make_plan", "apply_plan"]

DEFAULT_BUDGET = 0.30


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class PruningPlan(JsonConfig):
    """`plan.json`: the teacher blocks a student keeps and drops.

    Indices are teacher block indices. `keep` and `drop` are stored sorted; together they
    list every block exactly once, and `drop` never holds the first or the last block.
    `removed_params`, `total_params` and `removed_fraction` are the counts of `drop` on
    the teacher when the plan was made (`plan_from_drop` recounts an edited plan);
    `importance` holds the Stage I value of each teacher block (list index = block) and
    `source` names the teacher (bundle path, weights hash).
    """

    num_blocks: int
    keep: list[int]
    drop: list[int]
    budget: float = DEFAULT_BUDGET
    removed_params: int = 0
    total_params: int = 0
    removed_fraction: float = 0.0
    importance: list[float] = field(default_factory=list)
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.num_blocks
        _check(_is_int(n) and n > 0, f"num_blocks must be a positive integer, got {n!r}")
        # 1. keep and drop: lists of in-range block indices, each listed once
        seen: dict[int, str] = {}
        for key in ("keep", "drop"):
            ids = getattr(self, key)
            _check(isinstance(ids, list), f"{key} must be a list of teacher block indices, got {ids!r}")
            for b in ids:
                _check(_is_int(b) and 0 <= b < n, f"{key}: block {b!r} is not a teacher block index in [0, {n})")
                _check(b not in seen, f"{key}: block {b} is already listed in {seen.get(b)}")
                seen[b] = key
            setattr(self, key, sorted(ids))
        missing = [b for b in range(n) if b not in seen]
        if missing:
            raise ConfigError(f"keep/drop: block {missing[0]} is in neither keep nor drop (together they list every teacher block)")
        # 2. the first and the last block stay
        for b, which in ((0, "first"), (n - 1, "last")):
            _check(b not in self.drop, f"drop: block {b} is the {which} block, which is never dropped")
        # 3. the numbers
        _check(_is_number(self.budget) and 0 <= self.budget < 1, f"budget must be a fraction in [0, 1), got {self.budget!r}")
        for key in ("removed_params", "total_params"):
            v = getattr(self, key)
            _check(_is_int(v) and v >= 0, f"{key} must be a non-negative integer, got {v!r}")
        _check(_is_number(self.removed_fraction) and 0 <= self.removed_fraction <= 1,
               f"removed_fraction must be in [0, 1], got {self.removed_fraction!r}")
        _check(isinstance(self.importance, list) and len(self.importance) == n and all(map(_is_number, self.importance)),
               f"importance must list one finite number per teacher block ({n}), got {self.importance!r}")
        _check(isinstance(self.source, dict), f"source must be a JSON object, got {self.source!r}")


def _check_full_model(model: DiT) -> None:
    c = model.config
    if c.kept_blocks != list(range(c.num_blocks)):
        raise ValueError(f"a pruning plan is made on and applied to a model with all {c.num_blocks} teacher blocks; "
                         f"this one keeps {c.kept_blocks}")


def _check_importance(importance: dict[int, float], n: int) -> None:
    missing = [b for b in range(n) if b not in importance]
    if missing:
        raise ValueError(f"importance has no value for block {missing[0]} (it must cover all {n} blocks)")


def block_params(model: DiT) -> list[int]:
    """Parameter count of each block of `model`, in order."""
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks]


def plan_from_drop(model: DiT, drop: list[int], importance: dict[int, float], budget: float = DEFAULT_BUDGET,
                   source: dict | None = None) -> PruningPlan:
    """The plan that drops exactly `drop` (teacher indices) from `model`, with its
    parameter counts measured on the model. Also recounts a hand-edited plan."""
    _check_full_model(model)
    n = model.config.num_blocks
    bad = [b for b in drop if not (_is_int(b) and 0 <= b < n)]
    if bad:
        raise ValueError(f"drop: {bad[0]!r} is not a teacher block index in [0, {n})")
    _check_importance(importance, n)
    sizes = block_params(model)
    removed, total = sum(sizes[b] for b in drop), model.num_params()
    return PruningPlan(num_blocks=n, keep=[b for b in range(n) if b not in drop], drop=sorted(drop), budget=budget,
                       removed_params=removed, total_params=total, removed_fraction=removed / total,
                       importance=[float(importance[b]) for b in range(n)], source=dict(source or {}))


def make_plan(model: DiT, importance: dict[int, float], budget: float = DEFAULT_BUDGET,
              source: dict | None = None) -> PruningPlan:
    """Drops the least important blocks of `model` until `budget` of its parameters are gone.

    `importance`: {teacher block index: I_b} for every block (`block_importance`'s
    "importance"). Candidates are all blocks but the first and the last (of each kind, for a
    model of two block kinds: `config.protected_blocks`), taken in order of rising importance (ties: lower index first). A budget that falls between two
    counts stops at the first removed fraction >= budget, so the plan removes at
    least the budget and overshoots it by less than one block. A budget out of reach
    (more than all candidates hold) is a ValueError.
    """
    _check_full_model(model)
    if not (_is_number(budget) and 0 <= budget < 1):
        raise ValueError(f"budget must be a fraction in [0, 1), got {budget!r}")
    n = model.config.num_blocks
    _check_importance(importance, n)
    sizes, total = block_params(model), model.num_params()
    protected = set(model.config.protected_blocks)
    candidates = sorted((b for b in range(n) if b not in protected), key=lambda b: (importance[b], b))
    drop, removed = [], 0
    for b in candidates:
        if removed / total >= budget:
            break
        drop.append(b)
        removed += sizes[b]
    if removed / total < budget:
        raise ValueError(f"budget {budget:.0%} is out of reach: dropping every block but {sorted(protected)} "
                         f"removes {removed / total:.1%} of the {total} parameters")
    return plan_from_drop(model, drop, importance, budget, source)


@torch.no_grad()
def apply_plan(model: DiT, plan: PruningPlan) -> DiT:
    """A new student DiT (same class) holding the teacher's kept blocks and every non-block weight.

    Its config is the teacher's with `block_ids = plan.keep` (per-block head counts and
    FFN widths carried over); block `plan.keep[i]` becomes student block i. Weights are
    copies on the teacher's device and dtypes, so training the student leaves the
    teacher alone; they require grad and the mode (train / eval) is the teacher's.
    The student computes what the teacher computes with the dropped blocks bypassed.
    """
    _check_full_model(model)
    c = model.config
    if plan.num_blocks != c.num_blocks or plan.total_params != model.num_params():
        raise ValueError(f"the plan is for a teacher of {plan.num_blocks} blocks and {plan.total_params} parameters, "
                         f"this model has {c.num_blocks} blocks and {model.num_params()}")
    # 1. the student's config: kept blocks, with their widths
    config = c.with_blocks(plan.keep)
    # 2. weights: kept blocks renumbered, everything else as is
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, b, rest = key.split(".", 2)
            if int(b) not in plan.keep:
                continue
            key = f"blocks.{plan.keep.index(int(b))}.{rest}"
        state[key] = value.clone()
    # 3. build without allocating random weights, then take the copies
    with torch.device("meta"):
        student = type(model)(config)
    student.load_state_dict(state, assign=True)
    student.backend = model.backend
    return student.train(model.training)

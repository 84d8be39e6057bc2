"""Training by the clock (`train --minutes M`): plan the schedule from measured speed so that the run ends
within M minutes of training time, with its learning rate reaching zero at its last step.

A budget-aware schedule that decays to zero exactly at the budget beats a fixed one cut short (Li, Yumer,
Ramanan, "Budgeted Training", ICLR 2020). The pure part (``Plan``, ``plan_budget``) takes measured costs and
returns a schedule; ``BudgetClock`` measures them during the run and re-plans when the speed changes.

An epoch stays the data unit (the stored split, or the synthetic stream's images of one epoch) at whose end
the run validates and checkpoints; the last epoch is cut at the planned step. Progressive resizing switches
crop for the last PROGRESSIVE_FINAL_SHARE of the planned steps: an epoch's images are made at one size, so
the epoch under way is cut at the switch (validated and checkpointed there) and whole epochs at the final
crop follow. At the epoch boundary nearest the share instead, a budget of a few
epochs (the demo's: ~3 for ResNet26) put half of its steps, or none, at the final crop.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from cnnbench.common.errors import InputError
from cnnbench.train.recipe import PROGRESSIVE_FINAL_SHARE

# The linear warm-up: one epoch, as the fixed-epoch schedule (train.optim.warmup_cosine), but never more
# than this share of the planned steps (one epoch of the recipe's five).
WARMUP_SHARE = 0.2
# Steps trained before the first plan (or before the final crop's speed replaces its estimate); the first
# step of a process is left out of every speed (allocations, thread pools start).
MEASURE_STEPS = 8
# Speeds are re-measured and the plan checked this often (and at every epoch end).
REPLAN_EVERY_STEPS = 25
# Recent steps at one crop that a speed is measured over: long enough to average the data pipeline's jitter,
# short enough to follow a neighbour job starting or a sibling's cores being taken over.
SPEED_WINDOW_STEPS = 50
# A checked plan is adopted when its total differs from the current one by more than this share of the
# steps left (at least one step): small noise does not rewrite the schedule, a real speed change does.
REPLAN_TOLERANCE = 0.02
# Epoch ends (validation, checkpoint) a cost is averaged over.
EPOCH_END_WINDOW = 3
# Until the first epoch end measures it: one validation batch (twice the training batch, forward only, about
# a third of a training step's arithmetic per image) costs about this many training steps.
VALIDATION_BATCH_IN_STEPS = 2 / 3


@dataclass(frozen=True)
class Plan:
    """A schedule in optimizer steps (over all ranks: one step is one global batch)."""
    minutes: float
    total_steps: int
    warmup_steps: int
    switch_step: int              # first step at the final crop (the epoch under way is cut there); 0: one crop throughout
    steps_per_epoch: int
    anchor_step: int              # the LR curve continues from here (the step it was planned at)...
    anchor_factor: float          # ...at this share of the peak, so a re-plan never makes it jump
    step_seconds: dict            # crop side (str) -> seconds per step the plan assumed
    epoch_end_seconds: float      # one validation pass and checkpoint
    planned_at_step: int
    planned_at_seconds: float     # training seconds spent when it was planned
    predicted_seconds: float      # training seconds at its last step, as planned
    reason: str

    def lr_factor(self, step: int) -> float:
        """Share of the peak learning rate at ``step``: linear warm-up to 1, then a cosine to 0 at the last step."""
        if step >= self.total_steps:
            return 0.0
        if step < self.warmup_steps:  # the anchor lies in the warm-up: a straight line from it to 1
            span = max(1, self.warmup_steps - self.anchor_step)
            return self.anchor_factor + (1.0 - self.anchor_factor) * (step - self.anchor_step) / span
        if self.anchor_step <= self.warmup_steps:
            start_progress, start_step = 0.0, self.warmup_steps
        else:  # the cosine's progress goes on from where the anchor's factor lies on it, stretched to the new end
            start_progress = math.acos(min(1.0, max(-1.0, 2 * self.anchor_factor - 1))) / math.pi
            start_step = self.anchor_step
        progress = start_progress + (1 - start_progress) * (step - start_step) / max(1, self.total_steps - start_step)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def at_final_crop(self, step: int) -> bool:
        """Whether step ``step`` (0-based) trains at the final crop."""
        return self.switch_step == 0 or step >= self.switch_step

    def epoch_ends_after(self, done: int, total: int, switch: int) -> int:
        """Epoch ends (validation + checkpoint) after step ``done`` up to ``total``: whole epochs from step 0,
        the one under way cut at ``switch``, whole epochs from there, the last one cut at ``total``."""
        E = self.steps_per_epoch
        if not done < switch < total:  # no switch ahead: epochs counted from step 0, or from a switch passed
            origin = switch if 0 < switch <= done else 0
            return -(-(total - origin) // E) - (done - origin) // E
        return -(-switch // E) - done // E + -(-(total - switch) // E)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Plan":
        return cls(**values)


def first_plan(minutes: float, steps_per_epoch: int, progressive: bool) -> Plan:
    """The schedule of the steps before anything is measured: the warm-up's start (one epoch long), at the
    start crop when resizing progressively. The first measured plan continues its LR curve."""
    if not minutes > 0:
        raise InputError(f"--minutes must be above 0, got {minutes}")
    warmup = max(1, steps_per_epoch)
    return Plan(minutes=minutes, total_steps=warmup * 1000, warmup_steps=warmup,
                switch_step=steps_per_epoch if progressive else 0, steps_per_epoch=steps_per_epoch, anchor_step=0,
                anchor_factor=1 / (warmup + 1), step_seconds={}, epoch_end_seconds=0.0, planned_at_step=0,
                planned_at_seconds=0.0, predicted_seconds=0.0, reason="before measuring")


def plan_budget(previous: Plan, done_steps: int, spent_seconds: float, step_seconds: dict[int, float],
                epoch_end_seconds: Optional[float], start_crop: int, final_crop: int, reason: str,
                validation_batches: int = 0) -> Plan:
    """The schedule from ``done_steps`` on that ends within ``previous.minutes`` of training time.

    ``step_seconds``: seconds per step at each crop side it trains at (``start_crop``, 0 without progressive
    resizing, and ``final_crop``, estimated from the start crop's by the pixels until it is measured); ``epoch_end_seconds``: one validation pass and checkpoint (None before one is measured: estimated from
    ``validation_batches`` and the final crop's step). The LR curve goes
    on from its value at ``done_steps`` (no jump), decaying to zero at the new last step.
    """
    if final_crop not in step_seconds:
        # Not trained at the final crop yet: the start crop's speed scaled by the pixels, until measured.
        step_seconds = {**step_seconds, final_crop: step_seconds[start_crop] * (final_crop / start_crop) ** 2}
    if epoch_end_seconds is None:
        epoch_end_seconds = validation_batches * VALIDATION_BATCH_IN_STEPS * step_seconds[final_crop]
    E = previous.steps_per_epoch
    remaining = previous.minutes * 60 - spent_seconds
    progressive = bool(start_crop) and start_crop != final_crop
    already_final = not progressive or (0 < previous.switch_step <= done_steps)

    def switch(total: int) -> int:
        if not progressive:
            return 0
        if already_final:
            return previous.switch_step
        return max(done_steps, total - round(total * PROGRESSIVE_FINAL_SHARE))

    def seconds(total: int) -> float:
        s = switch(total)
        at_start = max(0, min(total, s) - done_steps) if s else 0
        at_final = total - done_steps - at_start
        return (at_start * step_seconds.get(start_crop, 0.0) + at_final * step_seconds[final_crop]
                + previous.epoch_ends_after(done_steps, total, s) * epoch_end_seconds)

    total = _largest_fitting(done_steps, remaining, seconds, min(step_seconds.values()))
    warmup = previous.warmup_steps
    if done_steps < previous.warmup_steps:  # still warming up: shorter with a smaller budget, never done already
        warmup = max(done_steps + 1, min(E, round(WARMUP_SHARE * total)))
    warmup = min(warmup, max(total - 1, done_steps))
    return Plan(minutes=previous.minutes, total_steps=total, warmup_steps=warmup, switch_step=switch(total),
                steps_per_epoch=E, anchor_step=done_steps, anchor_factor=previous.lr_factor(done_steps),
                step_seconds={str(crop): round(s, 6) for crop, s in sorted(step_seconds.items())},
                epoch_end_seconds=round(epoch_end_seconds, 4), planned_at_step=done_steps,
                planned_at_seconds=round(spent_seconds, 2),
                predicted_seconds=round(spent_seconds + seconds(total), 2), reason=reason)


def _largest_fitting(done: int, remaining: float, seconds, cheapest_step: float) -> int:
    """The most steps whose predicted seconds fit ``remaining`` (``done`` when none does). The prediction
    grows with the steps except where the switch jumps a boundary (up to an epoch at the cheaper crop):
    the binary search finds a fitting total next to the largest, then the last check keeps it fitting."""
    if remaining <= 0 or seconds(done + 1) > remaining:
        return done
    low, high = done + 1, done + 2 + int(remaining / max(cheapest_step, 1e-9))
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if seconds(middle) <= remaining else (low, middle)
    while low > done and seconds(low) > remaining:
        low -= 1
    return low


def _now() -> float:
    """The clock a budget is measured on (tests replace it with a made-up one)."""
    return time.perf_counter()


class BudgetClock:
    """Measures a --minutes run's speed as it trains and keeps its plan: the LR factor of every step, the crop
    of every epoch, when to stop. Under torchrun every rank measures and the slowest decides (all_reduce MAX),
    so all ranks hold the same plan; its checks fall on the same steps everywhere."""

    def __init__(self, minutes: float, steps_per_epoch: int, start_crop: int, final_crop: int,
                 validation_batches: int, spent_seconds: float = 0.0, step: int = 0, state: Optional[dict] = None):
        self.start_crop, self.final_crop = start_crop, final_crop
        progressive = bool(start_crop) and start_crop != final_crop
        self.plan = Plan.from_dict(state["plan"]) if state else first_plan(minutes, steps_per_epoch, progressive)
        self.plans: list[dict] = list(state["plans"]) if state else []  # a resumed run's minutes: its identity's
        self.step = step
        self.validation_batches = validation_batches
        self._spent_before = spent_seconds
        self._started = self._last = _now()
        self._first_step = True
        # Each process measures its own speeds (a resumed run: another machine, other neighbours) and keeps
        # the plan unless they differ from the plan's beyond REPLAN_TOLERANCE.
        self._speeds: dict[int, deque] = {}
        self._epoch_ends: list[float] = []
        self._epoch_end_began = self._started

    def lr_factor(self, step: int) -> float:
        return self.plan.lr_factor(step)

    def crop(self) -> int:
        """The crop side the next step trains at."""
        return self.final_crop if self.plan.at_final_crop(self.step) or not self.start_crop else self.start_crop

    def finished(self) -> bool:
        return self.step >= self.plan.total_steps

    def spent_seconds(self) -> float:
        """Training seconds of every part so far, this one up to now."""
        return self._spent_before + _now() - self._started

    def part_seconds(self) -> float:
        return _now() - self._started

    def step_done(self, crop: int) -> bool:
        """Record one optimizer step at ``crop``; re-plan when due. False where the epoch under way is cut: the
        plan's last step is done, or the next step trains at another crop."""
        now = _now()
        if not self._first_step:
            self._speeds.setdefault(crop, deque(maxlen=SPEED_WINDOW_STEPS)).append(now - self._last)
        self._first_step = False
        self._last = now
        self.step += 1
        measured_here = len(self._speeds.get(crop, ()))
        if measured_here == MEASURE_STEPS - 1:
            # The first plan; else this process's first speed at this crop (the final crop's replaces its
            # estimate; a resumed run's may differ from the last process's).
            self._replan("measured" if not self.plans else f"measured at {crop} px", always=not self.plans)
        elif measured_here >= MEASURE_STEPS - 1 and self.step % REPLAN_EVERY_STEPS == 0:
            self._replan("speed check")
        return not self.finished() and self.crop() == crop

    def epoch_started(self) -> None:
        """The next step's time starts here (an epoch's end, validation and checkpoint, is not a step)."""
        self._last = _now()

    def epoch_end_begins(self) -> None:
        """The epoch's steps are done; its validation and checkpoint begin."""
        self._epoch_end_began = _now()

    def epoch_ended(self) -> None:
        """The epoch-end work (validation, checkpoint) is done: its cost measured, and the plan checked."""
        self._epoch_ends.append(_now() - self._epoch_end_began)
        if self.finished():
            return
        self._replan("epoch end", always=not self.plans)

    def state(self) -> dict:
        """What last.pt keeps for --resume and train.json records."""
        return {"plan": self.plan.to_dict(), "plans": list(self.plans), "step": self.step}

    def _replan(self, reason: str, always: bool = False) -> None:
        speeds = {crop: sum(times) / len(times) for crop, times in self._speeds.items() if times}
        if not speeds:
            return
        # Unmeasured in this process: the last plan's (a resumed run's), else estimated by plan_budget (-1 here).
        epoch_end = self._epoch_end_seconds()
        if epoch_end is None:
            epoch_end = self.plan.epoch_end_seconds if self.plans else -1.0
        crops = sorted(speeds)
        measured = torch.tensor([self.spent_seconds(), epoch_end] + [speeds[c] for c in crops], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)  # the slowest rank decides
        spent, epoch_end, *seconds = measured.tolist()
        plan = plan_budget(self.plan, self.step, spent, dict(zip(crops, seconds)), None if epoch_end < 0 else epoch_end,
                           self.start_crop, self.final_crop, reason, self.validation_batches)
        left = self.plan.total_steps - self.step
        if always or abs(plan.total_steps - self.plan.total_steps) > max(1, REPLAN_TOLERANCE * left):
            self.plan = plan
            self.plans.append(plan.to_dict())

    def _epoch_end_seconds(self) -> Optional[float]:
        """The recent epoch ends' mean; the process's first one (plotting's and validation's imports, their
        first allocations) only until another is measured."""
        ends = self._epoch_ends[1:] or self._epoch_ends
        recent = ends[-EPOCH_END_WINDOW:]
        return sum(recent) / len(recent) if recent else None

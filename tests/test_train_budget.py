"""Training by the clock (`train --minutes`): the planner on made-up speeds, the clock on a fake timer, and
tiny real runs checked on their steps (never on how long they took)."""
import json
import math
from pathlib import Path

import pytest
import torch

from cnnbench.common.errors import InputError
from cnnbench.train import TrainConfig, train_model
from cnnbench.train import budget
from cnnbench.train.budget import BudgetClock, first_plan, plan_budget
from cnnbench.train.loop import RunMismatchError
from train_testlib import Interrupted, stop_after

E = 160  # steps per epoch, as the full embedded set's stream at batch 32


def predicted(plan, done, spent, speeds, epoch_end, start, final):
    """Seconds a plan's remaining steps and validations cost at these speeds (the planner's model, spelled out)."""
    at_start = max(0, min(plan.total_steps, plan.switch_step) - done) if plan.switch_step else 0
    at_final = plan.total_steps - done - at_start
    switch, total = plan.switch_step, plan.total_steps
    if done < switch < total:  # whole epochs to the switch, which cuts the one under way; whole epochs from there
        validations = math.ceil(switch / E) - done // E + math.ceil((total - switch) / E)
    else:
        origin = switch if 0 < switch <= done else 0
        validations = math.ceil((total - origin) / E) - (done - origin) // E
    return spent + at_start * speeds.get(start, 0) + at_final * speeds[final] + validations * epoch_end


def test_first_plan_fills_the_budget_with_warmup_switch_and_decay_to_zero():
    speeds = {64: 0.5, 96: 1.2}
    plan = plan_budget(first_plan(10, E, progressive=True), 8, 4.0, speeds, 5.0, 64, 96, "measured")
    seconds = predicted(plan, 8, 4.0, speeds, 5.0, 64, 96)
    assert seconds == pytest.approx(plan.predicted_seconds, abs=0.01) and seconds <= 600
    assert 600 - seconds < 1.2 + 5.0  # one more step (and its validation) would not fit
    # By hand: 698 steps at 64 px (0.5 s) to the switch at 706, then 176 at 96 px (1.2 s), seven validations
    # (5 s; six epoch ends and the cut at the switch): 4 + 349 + 211.2 + 35 = 599.2 s; with an 883rd step the
    # final crop's share is 177 steps (switch at 706): 600.4 s.
    assert plan.total_steps == 882 and plan.warmup_steps == E  # one epoch, under a fifth of the steps
    # The switch: the last PROGRESSIVE_FINAL_SHARE (20 %) of the steps, the epoch under way cut there.
    assert plan.switch_step == 706 and plan.total_steps - plan.switch_step == round(0.2 * plan.total_steps)
    # The LR: the warm-up begun before the plan goes on without a jump, peaks at the warm-up's end, is 0 at the end.
    before = first_plan(10, E, progressive=True)
    assert plan.lr_factor(8) == pytest.approx(before.lr_factor(8)) == pytest.approx(9 / (E + 1))
    assert plan.lr_factor(E) == pytest.approx(1.0)
    assert plan.lr_factor(plan.total_steps - 1) > 0 and plan.lr_factor(plan.total_steps) == 0.0
    factors = [plan.lr_factor(k) for k in range(E, plan.total_steps + 1)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # decays monotonically after the warm-up
    assert not plan.at_final_crop(705) and plan.at_final_crop(706)


def test_replan_after_a_slowdown_keeps_the_lr_continuous_and_the_end_at_the_budget():
    fast = {64: 0.5}
    plan = plan_budget(first_plan(10, E, progressive=True), 8, 4.0, fast, None, 64, 96, "measured",
                       validation_batches=10)
    # Mid-run (step 400, an epoch ends at 480) another job starts: every step now takes 1.5x as long.
    slow = {64: 0.75, 96: 0.75 * 2.25}
    spent = 4.0 + 392 * 0.5 + 2 * 5.0
    again = plan_budget(plan, 400, spent, slow, 5.0, 64, 96, "speed check")
    assert again.total_steps < plan.total_steps
    seconds = predicted(again, 400, spent, slow, 5.0, 64, 96)
    assert seconds <= 600 and 600 - seconds < slow[96] + 5.0
    assert again.lr_factor(400) == pytest.approx(plan.lr_factor(400))  # no jump
    assert again.lr_factor(again.total_steps) == 0.0 and again.lr_factor(again.total_steps - 1) > 0
    assert again.switch_step == again.total_steps - round(0.2 * again.total_steps) > 400
    assert again.warmup_steps == plan.warmup_steps and again.anchor_step == 400
    # A sibling finishes and its cores are taken over: faster, so more steps, still ending at the budget.
    faster = plan_budget(again, 500, spent + 100 * 0.75 + 5.0, {64: 0.3, 96: 0.7}, 5.0, 64, 96, "speed check")
    assert faster.total_steps > again.total_steps
    assert faster.lr_factor(500) == pytest.approx(again.lr_factor(500))
    assert predicted(faster, 500, spent + 80.0, {64: 0.3, 96: 0.7}, 5.0, 64, 96) <= 600


def test_switch_stays_once_passed_and_a_spent_budget_stops_at_once():
    plan = plan_budget(first_plan(10, E, progressive=True), 8, 4.0, {64: 0.5}, 5.0, 64, 96, "measured")
    later = plan_budget(plan, 820, 500.0, {64: 0.5, 96: 2.0}, 5.0, 64, 96, "speed check")
    assert plan.switch_step < 820 and later.switch_step == plan.switch_step and later.total_steps > 820
    spent = plan_budget(plan, 820, 600.5, {64: 0.5, 96: 2.0}, 5.0, 64, 96, "speed check")
    assert spent.total_steps == 820 and spent.lr_factor(820) == 0.0
    flat = plan_budget(first_plan(1, 20, progressive=False), 8, 1.0, {48: 0.1}, 0.5, 0, 48, "measured")
    assert flat.switch_step == 0 and flat.at_final_crop(0)
    assert flat.total_steps == 8 + math.floor((60 - 1.0 - math.ceil(flat.total_steps / 20) * 0.5) / 0.1)


def fake_run(monkeypatch, clock_args: dict, step_seconds, epoch_end: float = 1.0) -> tuple[BudgetClock, list]:
    """Drive a BudgetClock as train_model does, on a made-up timer: ``step_seconds(step, crop)`` per step;
    returns the clock and each epoch's (first step, steps, crop)."""
    now = [0.0]
    monkeypatch.setattr(budget, "_now", lambda: now[0])
    clock = BudgetClock(**clock_args)
    epochs = []
    while not clock.finished():
        crop, first = clock.crop(), clock.step
        clock.epoch_started()
        for _ in range(clock.plan.steps_per_epoch):
            now[0] += step_seconds(clock.step, crop)
            if not clock.step_done(crop):
                break
        epochs.append((first, clock.step - first, crop))
        clock.epoch_end_begins()
        now[0] += epoch_end
        clock.epoch_ended()
    return clock, epochs


def test_clock_on_a_fake_timer_plans_replans_and_stops_at_the_plan(monkeypatch):
    """The clock's own decisions, with time made up: 0.1 s a step, 1 s an epoch end; from step 200 on, 0.2 s."""
    clock, _ = fake_run(monkeypatch, dict(minutes=1.0, steps_per_epoch=50, start_crop=0, final_crop=48,
                                          validation_batches=5), lambda step, crop: 0.1 if step < 200 else 0.2)
    plans = clock.plans
    assert plans[0]["reason"] == "measured" and plans[0]["total_steps"] > 450
    assert any(p["reason"] == "speed check" and p["total_steps"] < plans[0]["total_steps"] for p in plans)
    assert clock.plan.total_steps < 400 and clock.plan.lr_factor(clock.step) == 0.0
    assert clock.step == clock.plan.total_steps
    assert 60 - 1.0 <= clock.spent_seconds() <= 60 + 0.2  # ended at the minute, give or take its last step


def test_clock_measures_the_final_crop_once_it_trains_there(monkeypatch):
    """Progressive resizing on a made-up timer: the 48 px step costs 3x the 32 px one, not the 2.25x of the
    pixels that the plan assumes until it gets there; the re-plan then shortens the run to fit."""
    clock, epochs = fake_run(monkeypatch, dict(minutes=1.0, steps_per_epoch=40, start_crop=32, final_crop=48,
                                               validation_batches=5), lambda step, crop: 0.1 if crop == 32 else 0.3)
    reasons = [p["reason"] for p in clock.plans]
    assert reasons[0] == "measured" and "measured at 48 px" in reasons
    first = clock.plans[0]
    assert first["step_seconds"] == {"32": 0.1, "48": pytest.approx(0.225)}
    switch = clock.plan.switch_step
    assert switch % 40 and 0 < switch < clock.step  # mid-epoch: the epoch under way is cut there
    assert [crop for _, _, crop in epochs] == [48 if first >= switch else 32 for first, _, _ in epochs]
    ends = [first + steps for first, steps, _ in epochs]
    assert switch in ends and all((end if end < switch else end - switch) % 40 == 0 for end in ends[:-1])
    assert clock.plan.total_steps < first["total_steps"] and clock.step == clock.plan.total_steps
    assert 60 - 1.0 <= clock.spent_seconds() <= 60 + 0.3


@pytest.fixture
def ticking_clock(monkeypatch):
    """The budget's clock for the real runs below: every reading moves it on by 0.05 s. The plan then depends on
    the steps alone, not on how fast this machine (busy or quiet) runs them: the tests check steps, not time."""
    now = [0.0]

    def tick():
        now[0] += 0.05
        return now[0]

    monkeypatch.setattr(budget, "_now", tick)


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    """tests/test_train.py's fast settings, at 32 px, for a budget of about 50 steps of the ticking clock."""
    base = dict(arch="resnet18", quick_data=True, minutes=0.04, batch_size=16, width_mult=0.25, image_size=32,
                workers=0, out=str(tmp_path / "runs"), progress=False, seed=3)
    base.update(overrides)
    return TrainConfig(**base)


def test_minutes_and_epochs_together_or_no_minutes_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="--minutes and --epochs"):
        train_model(tiny_config(tmp_path, epochs=2))
    with pytest.raises(InputError, match="above 0"):
        train_model(tiny_config(tmp_path, minutes=0.0))


def test_a_budget_run_does_the_planned_steps_and_ends_at_lr_zero(tmp_path, ticking_clock):
    summary = train_model(tiny_config(tmp_path))
    record = json.loads((Path(summary["run_dir"]) / "train.json").read_text())["budget"]
    assert record["minutes"] == 0.04 and record["plans"] and record["plans"][0]["reason"] == "measured"
    assert record["done_steps"] == record["planned_steps"] == record["plan"]["total_steps"]
    assert record["final_lr"] <= 1e-9 and record["images"] == 16 * record["done_steps"]
    history = torch.load(summary["last"], weights_only=True)["record"]["history"]
    assert history[-1]["step"] == record["done_steps"] and history[-1]["lr"] <= 1e-9
    assert summary["epochs"] == len(history) == math.ceil(record["done_steps"] / record["plan"]["steps_per_epoch"])
    assert [row["step"] for row in history[:-1]] == [  # one crop throughout: only whole epochs end early
        (k + 1) * record["plan"]["steps_per_epoch"] for k in range(len(history) - 1)]
    assert "0.04 minutes of training" in summary["recipe"] and summary["identity"]["minutes"] == 0.04


def test_resume_keeps_the_plan_and_refuses_another_budget(tmp_path, ticking_clock):
    with pytest.raises(Interrupted):
        train_model(tiny_config(tmp_path, minutes=0.05), on_epoch_end=stop_after(1))
    saved = torch.load(tmp_path / "runs" / "resnet18" / "last.pt", weights_only=True)
    before = saved["extra"]["budget"]
    with pytest.raises(RunMismatchError, match="minutes 0.05 → 0.2"):
        train_model(tiny_config(tmp_path, minutes=0.2, resume=True))
    resumed = train_model(tiny_config(tmp_path, minutes=0.05, resume=True))
    after = resumed["budget"]
    assert after["plans"][:len(before["plans"])] == before["plans"]  # the plan so far is kept...
    assert all(p["planned_at_step"] >= before["step"] for p in after["plans"][len(before["plans"]):])  # ...and goes on
    assert after["done_steps"] == after["planned_steps"] and after["final_lr"] <= 1e-9
    # The budget left to the resumed part is what the first part did not spend.
    assert resumed["seconds"] == pytest.approx(sum(p["seconds"] for p in resumed["parts"]), abs=0.2)
    if before["step"] < before["plan"]["total_steps"]:
        assert len(resumed["parts"]) == 2


def test_progressive_resizing_switches_crop_at_the_planned_step(tmp_path, ticking_clock):
    summary = train_model(tiny_config(tmp_path, image_size=48, resize=80, progressive_from=32))
    plan = summary["budget"]["plan"]
    history = torch.load(summary["last"], weights_only=True)["record"]["history"]
    firsts = [0] + [row["step"] for row in history[:-1]]  # each epoch's first step
    assert [row["crop"] for row in history] == [48 if first >= plan["switch_step"] else 32 for first in firsts]
    assert summary["budget"]["done_steps"] == plan["total_steps"] and summary["spec"]["crop"] == 48
    assert {row["crop"] for row in history} == {32, 48}  # the budget holds more than two epochs: both sizes train


def test_demo_splits_its_budget_and_the_report_states_it(tmp_path, monkeypatch, ticking_clock):
    import os

    from cnnbench.demo import pipeline
    from cnnbench.demo.pipeline import DemoSettings
    from cnnbench.demo.report import _budget_note

    with pytest.raises(InputError, match="share"):
        DemoSettings(minutes=1.0, resnet_share=0.0)
    settings = DemoSettings(archs=("resnet18", "xception_small"), width_mult=0.125, batch_size=16, minutes=0.04,
                            resnet_share=0.5)
    assert settings.budget()["minutes_per_model"] == {"resnet18": 0.02, "xception_small": 0.04}
    assert "--minutes 0.02" in pipeline._train_command("resnet18", settings, True, tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one after the other: quicker here
    trained = pipeline._train_all([], settings, quick=True, out=tmp_path, progress=False)
    for arch, minutes in settings.budget()["minutes_per_model"].items():
        done = trained[arch]["budget"]
        assert done["minutes"] == minutes and done["done_steps"] == done["planned_steps"], arch
    note = _budget_note(settings.budget(), trained)
    assert "0.04-minute training budget" in note and "the ResNet trains 50% of it" in note
    for arch, run in trained.items():
        assert f"{arch} {run['budget']['minutes']:g} min: {run['budget']['done_steps']} steps, " in note

"""benchmarks/continual.py: its arms, its plan and its comparison at equal new-task loss, without training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def continual():
    spec = importlib.util.spec_from_file_location("continual_benchmark", REPO / "benchmarks" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_with_lora_plans_the_given_arms(continual, capsys):
    args = continual.parse_args(["--quick", "--arms", "sft,osft0.5,lora"])
    plan = {arm["name"]: (arm, lrs) for arm, lrs in args.plan_runs}
    assert list(plan) == ["sft", "osft0.5", "lora"]  # --quick no longer replaces the arms asked for
    assert plan["lora"][0]["algorithm"] == "lora_sft"
    assert plan["lora"][0]["kwargs"] == {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "merge": True}
    assert plan["lora"][1] == [float(x) for x in continual.QUICK["lora_lrs"].split(",")]
    assert plan["sft"][1] == plan["osft0.5"][1] == [float(x) for x in continual.QUICK["lrs"].split(",")]
    assert (args.steps, args.seeds, args.tag, args.pretrain_epochs) == (60, "0", "continual-quick", 2)

    assert continual.main(["--quick", "--arms", "sft,osft0.5,lora", "--plan"]) == 0
    out = capsys.readouterr().out
    n_runs = 2 * len(continual.QUICK["lrs"].split(",")) + len(continual.QUICK["lora_lrs"].split(","))
    assert "lora_sft(lora_r=16, lora_alpha=32.0" in out and f"{n_runs} runs of 60 steps" in out


def test_arms_and_defaults(continual):
    assert continual.parse_arm("lora64")["kwargs"]["lora_r"] == 64
    assert continual.parse_arm("lora64")["kwargs"]["lora_alpha"] == 128.0
    assert continual.parse_arm("osft0.25-frozen")["kwargs"] == {"unfreeze_rank_ratio": 0.25,
                                                                "freeze_non_targets": True}
    args = continual.parse_args(["--hidden-size", "256", "--layers", "4", "--lrs", "1e-3"])
    assert args.tag == "continual-h256x4" and args.steps == 150 and args.seeds == "0,1,2"
    assert {arm["name"]: lrs for arm, lrs in args.plan_runs}["sft"] == [1e-3]
    for bad in (["--arms", "sft,lora32"], ["--arms", "osftx"], ["--lrs", "1e-3,fast"], ["--arms", "sft,sft"]):
        with pytest.raises(SystemExit):
            continual.parse_args(bad)


def test_comparison_at_equal_new_task_loss(continual):
    def row(arm, lr, task, rise):
        return {"arm": arm, "lr": lr, "task_loss": task, "general_rise": rise}

    summary = [row("sft", 1, 3.0, 0.1), row("sft", 2, 2.0, 1.1),
               row("osft0.5", 1, 3.5, 0.0), row("osft0.5", 2, 2.5, 0.2), row("osft0.5", 3, 1.5, 0.4),
               row("lora", 1, 4.0, 0.0), row("lora", 2, 2.5, 0.5), row("lora", 3, 2.6, 0.9)]  # lr 3: dominated
    rows = continual.compare_at_equal_task_loss(summary)
    assert {(r["arm"], r["reference"]) for r in rows} == {("osft0.5", "sft"), ("lora", "sft"), ("osft0.5", "lora")}
    at = {(r["arm"], r["reference"], r["task_loss"]): (r["reference_rise"], r["arm_rise"]) for r in rows}
    assert at[("osft0.5", "sft", 2.5)] == pytest.approx((0.6, 0.2), abs=1e-5)
    assert at[("osft0.5", "lora", 2.5)] == pytest.approx((0.5, 0.2), abs=1e-5)
    assert at[("osft0.5", "lora", 3.0)] == pytest.approx((1 / 3, 0.1), abs=1e-5)
    assert at[("lora", "sft", 3.0)] == pytest.approx((0.1, 1 / 3), abs=1e-5)

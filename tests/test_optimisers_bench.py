"""``bench/optimisers.py`` without models: its resume, its refusals and its verdict at each KL, on runs it is handed."""

import json
import math

import pytest

from tests.conftest import load_bench_script

GOLD_SLOPE = {"ppo": 0.10, "rloo": 0.05, "grpo": 0.04, "dpo": 0.02}  # gold gained per nat of KL in the handed runs


def handed_child(calls: list):
    """A stand-in for the benchmark's subprocess: records each job and returns a run shaped like a real one."""

    def child(job: dict) -> dict:
        calls.append((job["algorithm"], job.get("seed")))
        if job["algorithm"] == "best_of_n":
            return {"algorithm": "best_of_n", "points": [
                {"n": n, "kl": math.log(n) - (n - 1) / n, "gold": 0.5 + 0.01 * n, "gold_proxy": 0.1 * n} for n in (1, 2, 4)
            ]}  # fmt: skip
        algorithm, seed = job["algorithm"], job["seed"]
        slope = GOLD_SLOPE[algorithm] + 0.001 * seed
        points = [{"update": u, "kl": float(u), "gold": 0.5 + slope * u, "gold_proxy": 0.2 * u} for u in (0, 2, 4)]
        return {"algorithm": algorithm, "seed": seed, "points": points, "train_seconds": 10.0 + seed,
                "episodes": 0 if algorithm == "dpo" else 64, "seconds_per_1000_episodes": None if algorithm == "dpo" else 150.0,
                "peak_rss_gib": 1.0}  # fmt: skip

    return child


def test_resume_runs_only_what_the_file_lacks_and_keeps_the_rest(tmp_path, monkeypatch):
    script = load_bench_script("optimisers")
    calls: list = []
    monkeypatch.setattr(script, "_child", handed_child(calls))
    out = tmp_path / "result.json"
    argv = ["--updates", "4", "--seeds", "0", "1", "--out", str(out)]

    assert script.main(argv) == 0
    first = json.loads(out.read_text())
    assert first["complete"] and len(first["runs"]) == 8 and out.with_suffix(".png").exists()
    assert calls[0] == ("best_of_n", None) and calls[-2:] == [("dpo", 0), ("dpo", 1)]  # DPO last

    # a benchmark stopped after its third run: the file holds three runs and is not complete
    first["runs"], first["complete"] = first["runs"][:3], False
    out.write_text(json.dumps(first))
    calls.clear()
    assert script.main([*argv, "--resume"]) == 0
    resumed = json.loads(out.read_text())
    assert calls == [("rloo", 1), ("grpo", 0), ("grpo", 1), ("dpo", 0), ("dpo", 1)]  # no best-of-n, nothing twice
    assert resumed["complete"] and resumed["runs"][:3] == first["runs"]
    assert resumed["best_of_n"] == first["best_of_n"]
    assert sorted((r["algorithm"], r["seed"]) for r in resumed["runs"]) == sorted(
        (a, s) for a in GOLD_SLOPE for s in (0, 1)
    )
    assert resumed["wall_seconds"] >= first["wall_seconds"]
    assert len(resumed["load_averages"]) == len(first["load_averages"]) + 1 + 5  # the start's, then one per run


@pytest.mark.parametrize("damage", ["another budget", "not json", "no runs"])
def test_resume_refuses_a_file_it_did_not_write_with_one_line(tmp_path, monkeypatch, damage):
    script = load_bench_script("optimisers")
    calls: list = []
    monkeypatch.setattr(script, "_child", handed_child(calls))
    out = tmp_path / "result.json"
    assert script.main(["--updates", "4", "--seeds", "0", "--algorithms", "ppo", "--out", str(out)]) == 0
    if damage == "not json":
        out.write_text('{"runs": [')
    elif damage == "no runs":
        out.write_text("[]")
    before, calls[:] = out.read_text(), []

    updates = "8" if damage == "another budget" else "4"
    with pytest.raises(SystemExit) as stopped:
        script.main(["--updates", updates, "--seeds", "0", "--algorithms", "ppo", "--out", str(out), "--resume"])
    message = str(stopped.value)
    assert message.startswith("--resume: ") and "\n" not in message and str(out) in message
    assert calls == [] and out.read_text() == before  # nothing ran, nothing overwritten


def test_the_winner_at_each_kl_and_whether_its_interval_separates():
    script = load_bench_script("optimisers")
    calls: list = []
    child = handed_child(calls)
    runs = [child({"algorithm": a, "seed": s}) for a in GOLD_SLOPE for s in (0, 1, 2)]
    summary = script.summarise(runs, child({"algorithm": "best_of_n"}))

    at_two = summary["gold_at_kl"]["2.0"]
    assert at_two["ppo"]["gold"][0] == pytest.approx(0.5 + 2 * 0.101)  # mean over seeds 0.100, 0.101, 0.102
    assert at_two["winner"]["algorithm"] == "ppo" and at_two["winner"]["intervals_separate"]
    assert at_two["winner"]["by"] == pytest.approx(2 * (0.10 - 0.05))
    assert "best_of_n" not in at_two  # KL 2 is past best-of-4's log 4 - 3/4
    at_quarter = summary["gold_at_kl"]["0.25"]  # best-of-n is beside the optimisers, not one of them
    assert at_quarter["winner"]["algorithm"] == "ppo"
    assert at_quarter["winner"]["best_of_n_ahead_by"] == pytest.approx(
        at_quarter["best_of_n"]["gold"][0] - at_quarter["ppo"]["gold"][0]
    )
    assert summary["cost"]["dpo"]["seconds_per_1000_episodes"] is None
    assert summary["cost"]["ppo"]["train_seconds"][0] == pytest.approx(11.0)

    table = script.markdown(summary)
    assert "| 2.0 |" in table and "ppo by 0.100 |" in table and "; best-of-n " in table


def test_report_tabulates_a_partial_file(tmp_path, monkeypatch, capsys):
    script = load_bench_script("optimisers")
    monkeypatch.setattr(script, "_child", handed_child([]))
    out = tmp_path / "result.json"
    assert script.main(["--updates", "4", "--seeds", "0", "--algorithms", "ppo", "rloo", "--out", str(out)]) == 0
    out.with_suffix(".png").unlink()
    capsys.readouterr()
    assert script.main(["--report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| ppo |" in table and "| rloo |" in table and "dpo" not in table and out.with_suffix(".png").exists()

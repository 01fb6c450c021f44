"""Pieces of the PPO benchmark (bench/ppo_vs_trl.py): the shared workload, each side's runner, FLOP counts, summary."""

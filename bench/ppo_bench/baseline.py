"""The baseline side: trl 1.12.0's ``trl.experimental.ppo.PPOTrainer`` (the last TRL release with PPO).

TRL 1.12.0 lives in its own folder (``pip install --no-deps --target``) that
only this subprocess puts first on ``sys.path``, so the project's trl 1.16 is
untouched.  Policy, reference, value and reward model are four separate
135M models, as in TRL's own PPO example; everything runs in fp32, TRL's CPU
default.  Its ``train()`` is one loop, so an update is timed between
``on_step_end`` callbacks and generation by wrapping the module's
``batch_generation``.
"""

from __future__ import annotations

import sys
import tempfile
import time

from ppo_bench.workload import Workload, limit_threads, peak_rss_bytes

TRL_VERSION = "1.12.0"


def import_trl(trl_dir: str):
    """trl 1.12.0 from ``trl_dir``, ahead of the project's own trl."""
    sys.path.insert(0, trl_dir)
    import trl

    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"{trl_dir}: expected trl {TRL_VERSION}, imported {trl.__version__} from {trl.__file__}")
    return trl


def generated_tokens(responses, eos_token_id: int) -> int:
    """Sampled tokens up to and including each row's first stop token (the rest is padding)."""
    import torch

    is_eos = responses == eos_token_id
    width = responses.shape[1]
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], width, dtype=torch.long))
    return int(lengths.sum())


class GenerationClock:
    """Stands in for ``ppo_trainer.batch_generation``: times each call and counts the tokens it sampled."""

    def __init__(self, generate, eos_token_id: int):
        self.generate, self.eos_token_id = generate, eos_token_id
        self.calls: list[dict] = []

    def __call__(self, model, queries, *args, **kwargs):
        start = time.perf_counter()
        query_responses, logits = self.generate(model, queries, *args, **kwargs)
        seconds = time.perf_counter() - start
        tokens = generated_tokens(query_responses[:, queries.shape[1] :], self.eos_token_id)
        self.calls.append({"seconds": seconds, "tokens": tokens})
        return query_responses, logits


def update_clock():
    """A ``TrainerCallback`` recording the time at the start of training and at the end of every update, and the logs."""
    from transformers import TrainerCallback

    class UpdateClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/kl" in logs:
                self.logs.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    return UpdateClock()


def trl_config(workload: Workload, output_dir: str):
    """TRL's PPOConfig with the workload's PPO settings (params.yaml ``ppo:``), fp32 on the CPU, nothing saved."""
    from trl.experimental.ppo import PPOConfig

    ppo = workload.ppo
    return PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=ppo["batch_size"],
        gradient_accumulation_steps=ppo["gradient_accumulation"],
        num_mini_batches=ppo["minibatches"],
        num_ppo_epochs=ppo["ppo_epochs"],
        local_rollout_forward_batch_size=ppo["batch_size"],
        total_episodes=ppo["batch_size"] * workload.updates,
        response_length=ppo["max_new_tokens"],
        temperature=ppo["temperature"],
        stop_token="eos",
        # TRL subtracts its penalty from the score; ours is the score that replaces it.  Same sign of push.
        missing_eos_penalty=None if ppo["missing_eos_penalty"] is None else abs(ppo["missing_eos_penalty"]),
        learning_rate=ppo["learning_rate"],
        adam_epsilon=ppo["adam_eps"],
        kl_coef=ppo["kl"]["beta"],
        kl_estimator=ppo["kl"]["estimator"],
        cliprange=ppo["cliprange"],
        cliprange_value=ppo["cliprange_value"],
        vf_coef=ppo["vf_coef"],
        gamma=ppo["gamma"],
        lam=ppo["lam"],
        whiten_rewards=ppo["whiten_rewards"],
        seed=ppo["seed"],
        num_sample_generations=0,  # its debugging generations are not part of an update
        bf16=ppo["dtype"] == "bfloat16",  # mixed precision (fp32 weights), as ours with ppo.dtype bfloat16
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
    )


def run(workload: Workload) -> dict:
    """``workload.updates`` updates of TRL's PPO; per update its wall time, generation time and tokens, TRL's logs."""
    limit_threads(workload.threads)
    trl = import_trl(workload.trl_dir)
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from rlhf_core.base_model import load_tokenizer
    from rlhf_core.generation import chat_prompt

    tokenizer = load_tokenizer(workload.model)  # left padding, pad = eos, as TRL's example sets it
    queries = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in workload.prompts]
    dataset = Dataset.from_dict({"input_ids": queries})

    def lm():
        return AutoModelForCausalLM.from_pretrained(workload.model, use_safetensors=True, dtype=torch.float32)

    def scalar_model():
        return AutoModelForSequenceClassification.from_pretrained(
            workload.reward_model, num_labels=1, use_safetensors=True, dtype=torch.float32
        )

    clock, generation = update_clock(), GenerationClock(trl_ppo.batch_generation, tokenizer.eos_token_id)
    trl_ppo.batch_generation = generation
    with tempfile.TemporaryDirectory(prefix="trl-ppo-bench-") as output_dir:
        trainer = PPOTrainer(
            args=trl_config(workload, output_dir),
            processing_class=tokenizer,
            model=lm(),
            ref_model=lm(),
            reward_model=scalar_model(),
            value_model=scalar_model(),
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[clock],
        )
        trainer.train()
        gradient_checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))

    updates = [
        {
            "seconds": end - begin,
            "generation_seconds": gen["seconds"],
            "generated_tokens": gen["tokens"],
            "metrics": logs,
        }
        for begin, end, gen, logs in zip(clock.marks, clock.marks[1:], generation.calls, clock.logs)
    ]
    return {
        "side": workload.side,
        "updates": updates,
        "peak_rss_bytes": peak_rss_bytes(),
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "gradient_checkpointing": gradient_checkpointing,
        "models": "policy, reference, value, reward: four fp32 copies",
    }

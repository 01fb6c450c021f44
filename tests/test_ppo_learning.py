"""PPO learns: a reward that prefers one token goes up within a set number of updates, KL stays under target."""

import shutil

import pytest
import torch

from rlhf_core.config import KLConfig, PPOConfig

FAVOURITE = "!"
NEW_TOKENS = 8
UPDATES = 12


@pytest.fixture(scope="module")
def favourite_token_model(tiny_base_model, tmp_path_factory):
    """The tiny random model, nudged so that one token has a fair chance (about 40%) in every context.

    A random model spreads its mass almost evenly over 49k tokens, so no single
    token would ever be sampled.  Every embedding gets a shared direction d (so
    final hidden states lean along d) and the favourite token's row gets more of
    it (so its logit is raised everywhere, through the tied LM head).
    """
    from rlhf_core.base_model import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("favourite") / "base"
    shutil.copytree(tiny_base_model, out)
    model, tokenizer = load_causal_lm(out), load_tokenizer(out)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings += 0.5 * direction
        embeddings[tokenizer.convert_tokens_to_ids(FAVOURITE)] += 1.5 * direction
    model.save_pretrained(out)
    return out


def favourite_share(prompts, responses, finished):
    """Share of the response's tokens that are the favourite one."""
    return torch.tensor([r.count(FAVOURITE) / NEW_TOKENS for r in responses])


def run_ppo(model_path, kl: KLConfig, dtype: str = "float32") -> list[dict]:
    from rlhf_core.ppo.trainer import build_trainer

    cfg = PPOConfig(
        batch_size=8, minibatches=1, max_new_tokens=NEW_TOKENS, mode="freeze", freeze_layers=1, learning_rate=3e-3,
        missing_eos_penalty=None, dtype=dtype, kl=kl,
    )  # fmt: skip
    trainer = build_trainer(cfg, model_path, favourite_share, [f"Tell me about topic {i}" for i in range(32)])
    return [trainer.step() for _ in range(UPDATES)]


def _assert_learned(history: list[dict], target: float) -> None:
    scores = [m["ppo/score"] for m in history]
    assert sum(scores[-3:]) / 3 > scores[0] + 0.25, scores
    assert max(m["ppo/kl"] for m in history) < target
    assert history[-1]["ppo/kl"] > 0.3  # it got there by moving away from the reference


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # both numeric paths, whatever the host CPU
def test_ppo_raises_the_reward_with_a_fixed_beta(favourite_token_model, dtype):
    history = run_ppo(favourite_token_model, KLConfig(controller="fixed", beta=0.05, target=4.0), dtype)
    _assert_learned(history, target=4.0)
    assert {m["ppo/beta"] for m in history} == {0.05}


def test_ppo_raises_the_reward_with_an_adaptive_beta(favourite_token_model):
    history = run_ppo(favourite_token_model, KLConfig(controller="adaptive", beta=0.05, target=4.0, horizon=100))
    _assert_learned(history, target=4.0)
    betas = [m["ppo/beta"] for m in history]
    # KL stayed below target, so the controller eased the penalty at every update
    assert all(b2 < b1 for b1, b2 in zip(betas, betas[1:]))


def test_minibatches_and_gradient_accumulation_take_several_steps_per_epoch(favourite_token_model):
    from rlhf_core.ppo.trainer import build_trainer

    cfg = PPOConfig(batch_size=8, max_new_tokens=4, freeze_layers=1, minibatches=2, gradient_accumulation=2, ppo_epochs=2,
                    missing_eos_penalty=None, dtype="float32")  # fmt: skip
    trainer = build_trainer(cfg, favourite_token_model, favourite_share, ["a", "b", "c", "d", "e", "f", "g", "h"])
    before = {k: v.clone() for k, v in trainer.policy.trainable_state().items()}
    metrics = trainer.step()
    assert all(v == v for v in metrics.values())  # no NaN
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 4  # 2 epochs x 2 minibatches
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.trainable_state().items())

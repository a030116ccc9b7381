"""Empirical privacy audit (simulation.audit): the canary lower bound stays below the claimed
epsilon under DP-SGD, and the same audit catches the leakage of training without DP."""

from __future__ import annotations

from simulation.audit import canary_audit, epsilon_lower_bound
from shared.config import PrivacyConfig, compose

CLAIMED = 2.0


def test_the_bound_is_a_binomial_tail() -> None:
    assert epsilon_lower_bound(50, 100) == 0.0  # chance level proves nothing
    assert 3.0 < epsilon_lower_bound(100, 100) < 3.6  # all 100 right: p^100 <= 0.05 -> p >= 0.970
    assert epsilon_lower_bound(70, 100) < epsilon_lower_bound(90, 100)


def test_canary_audit_bounds_dp_sgd_and_catches_training_without_dp(tmp_path) -> None:
    cfg = compose(["model=logreg", "model.aux_loss=none", "federation.batch_size=32", "federation.lr=0.05",
                   "federation.optimizer=sgd"])
    plain = canary_audit(cfg, tmp_path / "plain", policy=None, seed=1)
    assert plain.correct == plain.guesses and plain.epsilon_lower_bound > CLAIMED  # the audit can fail
    policy = PrivacyConfig(enabled=True, target_epsilon=CLAIMED, delta=1e-5, max_grad_norm=1.0, accountant="rdp")
    private = canary_audit(cfg, tmp_path / "dp", policy=policy, seed=1)
    assert 0.97 * CLAIMED < private.epsilon_claimed <= CLAIMED * 1.001
    assert private.epsilon_lower_bound < CLAIMED

"""PPO's math as pure tensor functions, against values worked out by hand (shown in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from align.rl.gae import gae
from align.rl.kl import AdaptiveKLController, FixedKLController, kl_controller, kl_per_token
from align.rl.losses import explained_variance, policy_loss, value_loss
from align.rl.masked import masked_mean, masked_var, whiten
from align.rl.shaping import last_index, response_mask, shape_scores, token_rewards

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               rtol=0, atol=tol)


def test_gae_undiscounted_is_reward_to_go():
    # gamma = lam = 1: A_1 = 2 - 1 = 1; A_0 = (1 + 1.0 - 0.5) + 1 = 2.5; returns = A + V = [3, 2]
    adv, ret = gae(T([[1.0, 2.0]]), T([[0.5, 1.0]]), T([[1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[2.5, 1.0]])
    close(ret, [[3.0, 2.0]])


def test_gae_discounted_with_padding_is_terminal_at_the_last_real_token():
    # masked: r = [1, 2, 0], V = [0.5, 1, 0]. t=1: delta = 2 + 0.9*0 - 1 = 1 -> A1 = 1
    # t=0: delta = 1 + 0.9*1 - 0.5 = 1.4 -> A0 = 1.4 + 0.9*0.5*1 = 1.85. Padding: A = 0, R = 0.
    adv, ret = gae(T([[1.0, 2.0, 5.0]]), T([[0.5, 1.0, 7.0]]), T([[1, 1, 0]]), gamma=0.9, lam=0.5)
    close(adv, [[1.85, 1.0, 0.0]])
    close(ret, [[2.35, 2.0, 0.0]])


def test_kl_estimators():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    close(kl_per_token(logp, ref, "k1"), [math.log(2)])  # log p - log q
    close(kl_per_token(logp, ref, "k3"), [-0.5 + math.log(2)])  # (q/p - 1) - log(q/p) = -0.5 + ln 2
    assert kl_per_token(T([-3.0, 0.0]), T([0.0, -3.0]), "k3").min() >= 0  # k3 is never negative
    close(kl_per_token(T([-1.0]), T([-1.0]), "k3"), [0.0])
    close(kl_per_token(logp, ref, "k2"), [0.5 * math.log(2) ** 2])  # (log p - log q)^2 / 2
    with pytest.raises(ValueError, match="kl_estimator must be one of k1, k2, k3"):
        kl_per_token(logp, ref, "k4")


def test_adaptive_kl_controller():
    # error = clip(9/6 - 1, -0.2, 0.2) = 0.2; coef *= 1 + 0.2 * 64 / 10000
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    up.update(9.0, n_steps=64)
    assert up.value == pytest.approx(0.1 * 1.00128)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(3.0, n_steps=64)  # error = clip(-0.5) = -0.2
    assert down.value == pytest.approx(0.1 * 0.99872)
    on_target = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    on_target.update(6.0, n_steps=64)
    assert on_target.value == pytest.approx(0.1)
    fixed = kl_controller(0.05, None, 10000)
    fixed.update(100.0, 64)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    assert isinstance(kl_controller(0.05, 6.0, 10000), AdaptiveKLController)


def test_clipped_policy_loss():
    # token 1: ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped). token 2: ratio 0.5, A = 1: max(-0.5, -0.8) = -0.5
    # token 3 is padding (huge values ignored). loss = (-1.2 - 0.5) / 2 = -0.85, clipfrac 1/2
    logp = T([[math.log(1.5), math.log(0.5), 50.0]])
    loss, stats = policy_loss(logp, T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 1e6]]), T([[1, 1, 0]]), clip_range=0.2)
    close(loss, -0.85)
    close(stats["policy/clipfrac"], 0.5)
    close(stats["policy/approx_kl"], 0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    # negative advantage, ratio 0.5: max(0.5, 0.8) = 0.8, the clipped side
    loss, stats = policy_loss(T([[math.log(0.5)]]), T([[0.0]]), T([[-1.0]]), T([[1]]), clip_range=0.2)
    close(loss, 0.8)
    close(stats["policy/clipfrac"], 1.0)


def test_clipped_value_loss():
    # token 1: V = 0.5 (clipped to 0.2): max(0.25, 0.64) = 0.64; token 2: V = -0.1: 1.21 both ways
    # loss = 0.5 * (0.64 + 1.21) / 2 = 0.4625
    loss, stats = value_loss(T([[0.5, -0.1]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), T([[1, 1]]), clip_range_value=0.2)
    close(loss, 0.4625)
    close(stats["value/clipfrac"], 0.5)


def test_whitening_and_masked_moments():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]])
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)  # unbiased: ((1)^2 + 0 + 1) / 2
    close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-6)
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-6)


def test_response_mask_cuts_at_the_first_stop_token():
    responses = T([[5, 7, 9, 0, 9], [5, 5, 5, 5, 5], [9, 9, 9, 9, 9]])
    mask, ended = response_mask(responses, stop_ids=[9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]
    assert last_index(mask).tolist() == [2, 4, 0]
    mask, _ = response_mask(T([[5, 8, 9]]), stop_ids=[9, 8])  # any of several stop ids
    assert mask.tolist() == [[1, 1, 0]]


def test_score_shaping():
    # normalise (mean 1, std 2): [1, -1]; clip 0.75: [0.75, -0.75]; no EOS on the second: -1 more
    out = shape_scores(T([3.0, -1.0]), T([True, False]), mean=1.0, std=2.0, clip=0.75, missing_eos_penalty=1.0)
    close(out, [0.75, -1.75])
    close(shape_scores(T([3.0]), T([False])), [3.0])  # nothing asked, nothing changed


def test_token_rewards_put_the_score_on_the_last_token():
    # k1 KL = [0.5, -0.5]; rewards = -0.1 * KL, + score 2 on the last real token
    rewards, kl = token_rewards(T([2.0]), T([[-1.0, -1.0]]), T([[-1.5, -0.5]]), T([[1, 1]]), kl_coef=0.1)
    close(rewards, [[-0.05, 2.05]])
    close(kl, [[0.5, -0.5]])
    rewards, kl = token_rewards(T([2.0]), T([[-1.0, -1.0]]), T([[-1.5, -0.5]]), T([[1, 0]]), kl_coef=0.1)
    close(rewards, [[1.95, 0.0]])
    close(kl, [[0.5, 0.0]])


def test_explained_variance_and_entropy():
    mask = T([[1, 1, 1]])
    close(explained_variance(T([[1.0, 2.0, 3.0]]), T([[1.0, 2.0, 3.0]]), mask), 1.0)
    close(explained_variance(T([[2.0, 2.0, 2.0]]), T([[1.0, 2.0, 3.0]]), mask), 0.0)  # a constant critic
    from align.rl.logprobs import token_logprobs

    head = torch.nn.Linear(2, 4, bias=False)
    torch.nn.init.zeros_(head.weight)  # uniform over 4 tokens
    _, entropy = token_logprobs(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), head, with_entropy=True)
    close(entropy, [[math.log(4)] * 3])


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_logprobs_equal_full_log_softmax_with_gradients(cap):
    """Chunks of 2 positions (vocab 50): the chosen token's log-prob, the entropy and the gradients into the
    hidden states and the output layer equal those of the full [B, T, V] log-softmax."""
    from align.rl.logprobs import token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 5))
    transform = (lambda x: torch.tanh(x / cap) * cap) if cap else (lambda x: x)

    logp_all = torch.log_softmax(transform(head(hidden)).float() / 0.7, dim=-1)
    full = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    full_entropy = -(logp_all.exp() * logp_all).sum(-1)
    (full.sum() + full_entropy.sum()).backward()
    want = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    logp, entropy = token_logprobs(hidden, targets, head, transform, temperature=0.7, with_entropy=True,
                                   chunk_elements=100)
    torch.testing.assert_close(logp, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=1e-5)
    (logp.sum() + entropy.sum()).backward()
    torch.testing.assert_close(hidden.grad, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, want[1], rtol=0, atol=1e-5)
    with torch.no_grad():
        assert token_logprobs(hidden, targets, head, transform, 0.7)[1] is None

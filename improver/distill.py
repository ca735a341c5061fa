"""Fit any ``nn.Module`` policy to target actions on given states (behaviour cloning)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def fit_policy(
    policy: nn.Module,
    observations: torch.Tensor,
    actions: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> nn.Module:
    """Regress ``policy(observations)`` onto ``actions`` with Adam and mean-squared error, in place.

    Args:
        policy: The module to train (on its own device and dtype).
        observations: ``[N, obs_dim]`` states.
        actions: ``[N, act_dim]`` target actions.
        epochs: Passes over the data.
        batch_size: Minibatch size.
        lr: Adam learning rate.
        generator: Shuffling randomness (CPU generator).
        progress: Show a progress bar.

    Returns:
        ``policy``, trained.
    """
    if observations.ndim != 2 or actions.ndim != 2 or len(observations) != len(actions):
        raise ValueError(
            f"fit_policy needs [N, obs_dim] observations and [N, act_dim] actions; got {tuple(observations.shape)} and {tuple(actions.shape)}"
        )
    if len(observations) == 0:
        raise ValueError("fit_policy got no data")
    parameter = next(policy.parameters())
    observations = observations.to(parameter)
    actions = actions.to(parameter)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    policy.train()
    for _ in tqdm(range(epochs), desc="fit", disable=not progress, leave=False):
        order = torch.randperm(len(observations), generator=generator).to(parameter.device)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.mse_loss(policy(observations[batch]), actions[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return policy.eval()

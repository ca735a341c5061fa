import pytest
import torch

from improver.network import GoalLocator, ImprovementNet, NetworkConfig
from improver.types import TaskInfo, Trajectory


def episodes(goals, steps=30):
    """Random visited points around each goal and the reward ``-|p - g|`` the toy suite gives."""
    points = torch.rand(len(goals), steps, 2) * 2 - 1
    rewards = -(points - goals[:, None]).norm(dim=-1)
    return points, rewards


def test_goal_locator_learns_to_trilaterate_goals_it_never_saw():
    torch.manual_seed(0)
    locator = GoalLocator(obs_dim=2, task_dim=2)
    optimizer = torch.optim.Adam(locator.parameters(), lr=1e-2)
    valid = torch.ones(30, dtype=torch.bool)
    train_goals = torch.rand(20, 2) * 2 - 1
    for _ in range(300):
        points, rewards = episodes(train_goals)
        estimates = torch.stack([locator(p, r, torch.zeros_like(r), valid) for p, r in zip(points, rewards)])
        loss = (estimates - train_goals.repeat(1, 2)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_goals = torch.rand(50, 2) * 2 - 1
    points, rewards = episodes(test_goals)
    with torch.no_grad():
        estimates = torch.stack([locator(p, r, torch.zeros_like(r), valid) for p, r in zip(points, rewards)])
    error = (estimates[:, :2] - test_goals).norm(dim=-1).mean().item()
    best_visited = points[torch.arange(50), rewards.argmax(dim=1)]
    heuristic = (best_visited - test_goals).norm(dim=-1).mean().item()
    print(f"held-out goal error: locator {error:.3f}, best visited point {heuristic:.3f}")
    assert error < 0.5 * heuristic  # measured: 0.045 against 0.19


def test_goal_locator_ignores_padding():
    torch.manual_seed(0)
    locator = GoalLocator(obs_dim=2, task_dim=2)
    points, rewards = episodes(torch.zeros(1, 2))
    valid = torch.arange(30) < 20
    garbage = points[0].clone()
    garbage[20:] = 1e3
    with torch.no_grad():
        a = locator(points[0], rewards[0], torch.zeros(30), valid)
        b = locator(garbage, rewards[0], torch.zeros(30), valid)
    torch.testing.assert_close(a, b)


def experience_padded_with(fill: float) -> Trajectory:
    """Three episodes of 6, 3 and 1 real steps (of 8), ``fill`` on every padding step, successes on all."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(8)[None, :] < torch.tensor([6, 3, 1])[:, None]
    pad = ~mask
    return Trajectory(
        observations=torch.randn(3, 8, 4, generator=generator).masked_fill(pad[..., None], fill),
        actions=torch.randn(3, 8, 2, generator=generator).masked_fill(pad[..., None], fill),
        rewards=torch.randn(3, 8, generator=generator).masked_fill(pad, fill),
        successes=torch.ones(3, 8, dtype=torch.bool),
        mask=mask,
        tasks=(TaskInfo("toy:reach2d", "reach2d", "test", 0, 0, 0, (0.5, 0.5), "toy"),) * 3,
    )


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_padding_never_reaches_the_network(fill):
    torch.manual_seed(0)
    net = ImprovementNet(NetworkConfig(4, 2, width=16, token_stride=2, task_dim=2)).eval()
    zeros, garbage = experience_padded_with(0.0), experience_padded_with(fill)
    probes, actions = torch.randn(16, 4), torch.randn(16, 2)
    with torch.no_grad():
        assert torch.equal(net.encode(garbage, actions, probes), net.encode(zeros, actions, probes))
        assert torch.equal(net.locate(garbage), net.locate(zeros))
        assert torch.equal(net.success_points(garbage), net.success_points(zeros))
    assert torch.isfinite(net.encode(garbage, actions, probes)).all()


def test_encoder_attends_within_chunks_of_whole_episodes_and_one_chunk_is_one_sequence():
    torch.manual_seed(0)
    net = ImprovementNet(NetworkConfig(4, 2, width=16, token_stride=1)).eval()
    tokens, valid = torch.randn(5, 6, 16), torch.arange(6)[None, :] < torch.tensor([6, 3, 6, 1, 4])[:, None]
    with torch.no_grad():
        single = net.encoder(tokens.flatten(0, 1)[None], src_key_padding_mask=~valid.flatten()[None])[0]
        assert torch.equal(net.pool(tokens, valid), (single * valid.flatten()[:, None]).sum(dim=0) / valid.sum())
        parts = [net.pool(tokens[i : i + 2], valid[i : i + 2]) * valid[i : i + 2].sum() for i in (0, 2, 4)]
        net.chunk_tokens = 13  # room for two whole episodes of 6 tokens, not three
        torch.testing.assert_close(net.pool(tokens, valid), sum(parts) / valid.sum())
        assert not torch.allclose(net.pool(tokens, valid), (single * valid.flatten()[:, None]).sum(dim=0) / valid.sum())

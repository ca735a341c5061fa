import pytest
import torch

from improver.task_inference import GoalLocator, LearnedTaskEncoder, TaskInference, make_task_inference, task_parameters
from improver.types import TaskInfo

IMPLEMENTATIONS = ["goal-locator", "learned"]


def episodes(goals, steps=30):
    """Random visited points around each goal and the reward ``-|p - g|`` the toy suite gives."""
    points = torch.rand(len(goals), steps, 2) * 2 - 1
    rewards = -(points - goals[:, None]).norm(dim=-1)
    return points, rewards


def fitted(name: str) -> TaskInference:
    """An untrained task inference over 2-d states and 2 task parameters, normalised to mean (1, -1) and std 0.5."""
    torch.manual_seed(0)
    inference = make_task_inference(name, obs_dim=2, task_dim=2, width=16)
    inference.fit_normalization(torch.tensor([[1.5, -0.5], [0.5, -1.5], [1.0, -1.0]]))
    return inference


def held_out_error(inference: TaskInference, steps: int) -> tuple[float, float, float]:
    """Train ``inference`` on 20 goals, then its mean held-out goal error, the training goals' mean's and the best visited point's."""
    optimizer = torch.optim.Adam(inference.parameters(), lr=1e-2)
    valid = torch.ones(30, dtype=torch.bool)
    train_goals = torch.rand(20, 2) * 2 - 1
    for _ in range(steps):
        points, rewards = episodes(train_goals)
        beliefs = torch.stack([inference(p, r, torch.zeros_like(r), valid) for p, r in zip(points, rewards)])
        loss = inference.loss(beliefs, train_goals)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_goals = torch.rand(50, 2) * 2 - 1
    points, rewards = episodes(test_goals)
    with torch.no_grad():
        beliefs = torch.stack([inference(p, r, torch.zeros_like(r), valid) for p, r in zip(points, rewards)])
    error = (inference.estimate(beliefs) - test_goals).norm(dim=-1).mean().item()
    mean = (train_goals.mean(dim=0) - test_goals).norm(dim=-1).mean().item()
    best_visited = (points[torch.arange(50), rewards.argmax(dim=1)] - test_goals).norm(dim=-1).mean().item()
    return error, mean, best_visited


def test_goal_locator_learns_to_trilaterate_goals_it_never_saw():
    torch.manual_seed(0)
    error, _, heuristic = held_out_error(GoalLocator(obs_dim=2, task_dim=2), 300)
    print(f"held-out goal error: locator {error:.3f}, best visited point {heuristic:.3f}")
    assert error < 0.5 * heuristic  # measured: 0.045 against 0.19


def test_the_learned_encoder_infers_goals_it_never_saw_without_knowing_they_are_goals():
    torch.manual_seed(0)
    error, mean, heuristic = held_out_error(LearnedTaskEncoder(obs_dim=2, task_dim=2, width=32), 300)
    print(f"held-out goal error: learned encoder {error:.3f}, training goals' mean {mean:.3f}, best visited point {heuristic:.3f}")
    assert error < 0.3 * mean and error < heuristic  # measured: 0.11 against 0.74 and 0.19


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_beliefs_are_finite_sized_and_ignore_padding(name):
    inference = fitted(name)
    points, rewards = episodes(torch.zeros(1, 2))
    valid = torch.arange(30) < 20
    garbage, garbage_rewards = points[0].clone(), rewards[0].clone()
    garbage[20:], garbage_rewards[20:] = 1e3, -1e3
    successes = (torch.arange(30) % 7 == 0).float()
    with torch.no_grad():
        belief = inference.infer(points[0], rewards[0], successes, valid)
        assert belief.shape == (inference.belief_dim,) and belief.isfinite().all()
        torch.testing.assert_close(inference.infer(garbage, garbage_rewards, successes, valid), belief)
        torch.testing.assert_close(inference(points[0], rewards[0], successes, valid), belief)  # calling it is infer


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_forced_beliefs_hold_their_target_and_shifts_move_the_estimate_in_task_units(name):
    inference = fitted(name)
    parameters = torch.tensor([[1.2, -0.7], [0.4, -1.9]])
    forced = inference.forced(inference.normalize(parameters))
    assert forced.shape == (2, inference.belief_dim)
    torch.testing.assert_close(inference.estimate(forced), parameters)
    assert inference.loss(forced, inference.normalize(parameters)) == 0
    noisy = inference.forced(inference.normalize(parameters), 0.1 * torch.randn(2, inference.belief_dim))
    assert inference.loss(noisy, inference.normalize(parameters)) > 0
    offset = torch.tensor([0.1, -0.3])
    points, rewards = episodes(torch.zeros(1, 2))
    with torch.no_grad():
        belief = inference.infer(points[0], rewards[0], torch.zeros(30), torch.ones(30, dtype=torch.bool))
    torch.testing.assert_close(inference.estimate(inference.shifted(belief, offset)) - inference.estimate(belief), offset)
    torch.testing.assert_close(inference.estimate(inference.shifted(forced, offset)), parameters + offset)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_the_experience_loss_is_the_loss_of_the_inferred_belief_plus_the_implementations_own_term(name):
    inference = fitted(name)
    points, rewards = episodes(torch.tensor([[0.3, -0.2]]))
    valid = torch.ones(30, dtype=torch.bool)
    target = inference.normalize(torch.tensor([1.2, -0.9]))
    failing, succeeding = torch.zeros(30), (torch.arange(30) < 4).float()
    plain = inference.loss(inference.infer(points[0], rewards[0], failing, valid), target)
    torch.testing.assert_close(inference.experience_loss(points[0], rewards[0], failing, valid, target, 2.0), plain)
    with_successes = inference.experience_loss(points[0], rewards[0], succeeding, valid, target, 2.0)
    base = inference.loss(inference.infer(points[0], rewards[0], succeeding, valid), target)
    if name == "goal-locator":  # where the success flag is set the point of the step should be the goal
        expected = ((inference.point(points[0][:4]) - target) ** 2).sum(dim=-1).mean()
        torch.testing.assert_close(with_successes, base + 2.0 * expected)
    else:
        torch.testing.assert_close(with_successes, base)


def test_normalization_uses_one_scale_for_every_axis():
    inference = fitted("learned")
    torch.testing.assert_close(inference.task_mean, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(inference.task_std, torch.full((2,), 0.5))
    torch.testing.assert_close(inference.normalize(torch.tensor([1.5, -1.0])), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="task inference of 2 task parameters; the tasks have parameters of shape \\(3,\\)"):
        inference.fit_normalization(torch.zeros(4, 3))


def test_task_parameters_and_the_factory():
    info = TaskInfo("toy:reach2d", "reach2d", "train", 0, 0, 0, (0.25, -0.5), "toy")
    assert torch.equal(task_parameters(info), torch.tensor([0.25, -0.5]))
    assert isinstance(make_task_inference("goal-locator", 4, 2), GoalLocator)
    assert isinstance(make_task_inference("learned", 4, 2, width=8, heads=2), LearnedTaskEncoder)
    with pytest.raises(ValueError, match="unknown task inference 'oracle'; choose one of \\['goal-locator', 'learned'\\]"):
        make_task_inference("oracle", 4, 2)
    with pytest.raises(ValueError, match="at least one task parameter"):
        make_task_inference("learned", 4, 0)

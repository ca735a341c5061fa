"""DAgger distillation of a behaviour policy into the user's own policy class."""

import pytest
import torch

from improver.dagger import dagger
from improver.policies import MLPPolicy
from improver.tasks import rollout
from improver.tasks.toy import SPEED


def seeker(task):
    """A teacher that heads for the task's hidden goal (the toy suite's scripted expert, bound to it)."""
    goal = torch.as_tensor(task.make_env().reset(seed=0)[1]["task_parameters"])
    return lambda obs: ((goal - obs[:, :2]) / SPEED).clamp(-1.0, 1.0)


def test_dagger_teaches_a_student_what_the_teacher_does_on_its_own_states(toy):
    task = toy.tasks("test")[0]
    teacher = seeker(task)
    assert rollout(teacher, task, 4, seed=50, progress=False).success.all()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        student = MLPPolicy(4, 2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert not rollout(student, task, 4, seed=50, progress=False).success.any()

    fitted, rows = dagger(teacher, student, task, rounds=3, episodes=4, epochs=150, seed=1)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # the input is never modified
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["env_steps"] for r in rows] == [160, 320, 480] and [r["labels"] for r in rows] == [160, 320, 480]
    assert rollout(fitted, task, 4, seed=50, progress=False).success.float().mean() >= 0.75
    again, _ = dagger(teacher, student, task, rounds=3, episodes=4, epochs=150, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(fitted.parameters(), again.parameters()))  # seeded


def test_dagger_starts_from_given_states_and_rejects_bad_input(toy):
    task = toy.tasks("test")[1]
    teacher, student = seeker(task), MLPPolicy(4, 2)
    visited = rollout(teacher, task, 2, seed=3, progress=False)
    states = visited.observations[visited.mask]
    fitted, rows = dagger(teacher, student, task, rounds=1, episodes=2, states=states, epochs=150)
    assert rows[0]["labels"] == len(states) + rows[0]["env_steps"]
    assert rows[0]["success"] > 0  # fitted on the teacher's states before its first round
    with pytest.raises(ValueError, match="rounds and episodes"):
        dagger(teacher, student, task, rounds=0)
    with pytest.raises(ValueError, match="exploration"):
        dagger(teacher, student, task, exploration=float("nan"))
    with pytest.raises(ValueError, match=r"\[N, obs_dim\]"):
        dagger(teacher, student, task, states=states[0])

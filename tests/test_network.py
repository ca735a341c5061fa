import pytest
import torch

from improver.network import ImprovementNet, NetworkConfig
from improver.types import TaskInfo, Trajectory


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


@pytest.mark.parametrize("inference", ["goal-locator", "learned"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
def test_padding_never_reaches_the_network(fill, inference):
    torch.manual_seed(0)
    net = ImprovementNet(NetworkConfig(4, 2, width=16, token_stride=2, task_dim=2, task_inference=inference)).eval()
    zeros, garbage = experience_padded_with(0.0), experience_padded_with(fill)
    probes, actions = torch.randn(16, 4), torch.randn(16, 2)
    with torch.no_grad():
        assert torch.equal(net.encode(garbage, actions, probes), net.encode(zeros, actions, probes))
        assert torch.equal(net.infer_task(garbage), net.infer_task(zeros))
        target = torch.tensor([0.5, -0.5])  # every step succeeds: the goal locator's success-point term counts too
        assert torch.equal(net.task_inference.experience_loss(*net.task_inputs(garbage), target),
                           net.task_inference.experience_loss(*net.task_inputs(zeros), target))
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


def test_the_task_inference_is_chosen_by_name_and_sizes_z():
    for name, belief_dim in (("goal-locator", 4), ("learned", 2)):
        net = ImprovementNet(NetworkConfig(4, 2, width=16, task_dim=2, task_inference=name))
        assert net.task_inference.belief_dim == belief_dim and net.context_dim == 16 + belief_dim
    bare = ImprovementNet(NetworkConfig(4, 2, width=16, task_inference="learned"))
    assert bare.task_inference is None and bare.context_dim == 16
    with pytest.raises(ValueError, match="infers no task"):
        bare.shifted(torch.zeros(16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"task_inference must be one of \['goal-locator', 'learned'\]; got 'oracle'"):
        NetworkConfig(4, 2, task_inference="oracle")


@pytest.mark.parametrize("task_dim", [0, 2])
def test_state_dicts_of_the_old_layout_load_under_the_new_keys(task_dim):
    torch.manual_seed(0)
    net = ImprovementNet(NetworkConfig(4, 2, width=16, task_dim=task_dim))
    for name, buffer in net.named_buffers():
        buffer.copy_(torch.rand_like(buffer))  # normalisation not at its defaults, so a lost buffer shows
    # The old layout: the normalisation of the task parameters on the network (empty without them), the goal locator as `locator`.
    old = {k.replace("task_inference.", "locator.", 1): v for k, v in net.state_dict().items() if not k.startswith("task_inference.task_")}
    old |= {"task_mean": net.task_inference.task_mean, "task_std": net.task_inference.task_std} if task_dim else {"task_mean": torch.zeros(0), "task_std": torch.ones(0)}
    fresh = ImprovementNet(NetworkConfig(4, 2, width=16, task_dim=task_dim))
    fresh.load_state_dict(old)
    assert fresh.state_dict().keys() == net.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))

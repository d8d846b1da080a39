"""MSLR and MSES (docs/methods.md, section 1.7): the 5-epoch accuracy memory, early stopping and best-state restore."""

import pytest
import torch
from torch import nn

import agm_fast


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.visual = nn.Linear(5, 3)
        self.text = nn.Linear(2, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, a, v, t):
        return self.head(self.audio(a) + self.visual(v) + self.text(t))


def backward(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    net.zero_grad()
    out = net(torch.randn(6, 4, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g))
    out.square().sum().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def test_mses_stops_at_the_right_epoch_and_restores_the_best_state():
    torch.manual_seed(0)
    net = Net()
    mses = agm_fast.MSES({"a": "audio", "v": "visual"}, patience=2, model=net)
    # Raw losses; smoothed Ls(e) = 0.6 L(e-1) + 0.4 L(e), Ls(0) = L(0).
    audio = [1.0, 0.8, 0.9, 0.95, 0.97, 0.99, 0.5]
    visual = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    smoothed = [audio[0]] + [0.6 * audio[e - 1] + 0.4 * audio[e] for e in range(1, len(audio))]
    # 0.6 * 0.8 + 0.4 * 0.9 = 0.84 at epoch 2 beats 1.0, 0.92, and then 0.92, 0.958, 0.978: patience 2 runs out at
    # epoch 5, before the late improvement of epoch 6 (0.794) is seen.
    best, stop_at = 2, 5
    assert min(range(stop_at + 1), key=lambda e: (smoothed[e], e)) == best and smoothed[6] < smoothed[best]
    snapshots = {}
    for e in range(len(audio)):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
            net.audio[1].running_mean.add_(1.0)
        snapshots[e] = {k: v.clone() for k, v in net.audio.state_dict().items()}
        stopped = mses.epoch_end([audio[e], visual[e]])
        assert stopped == (["a"] if e == stop_at else [])
        assert mses.stopped == [e >= stop_at, False]
        assert mses.smoothed[0][e] == pytest.approx(smoothed[e], abs=1e-15)
        if e == stop_at:
            for k, v in net.audio.state_dict().items():
                assert torch.equal(v, snapshots[best][k]), k
    assert mses.best_epoch[0] == best and mses.stop_epoch[0] == stop_at
    restored = [p.detach().clone() for p in net.audio.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    for step in range(2):
        backward(net, step)
        mses.scale_gradients_()
        assert all(p.grad is None for p in net.audio.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.visual.parameters())
        opt.step()
    # The optimizer skips the stopped modality: its parameters stay at the restored best state.
    for p, r in zip(net.audio.parameters(), restored):
        assert torch.equal(p.detach(), r)


def test_mses_zero_mode_state_dict_and_errors():
    net = Net()
    mses = agm_fast.MSES([net.audio, net.visual], patience=0, skip_optimizer=False)
    mses.epoch_end([1.0, 1.0])
    assert mses.epoch_end([2.0, 0.5]) == ["0"]
    backward(net)
    mses.scale_gradients_()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.audio.parameters())
    state = mses.state_dict()
    other = agm_fast.MSES([net.audio, net.visual], patience=0, skip_optimizer=False)
    other.load_state_dict(state)
    assert other.stopped == [True, False] and other.best_epoch == mses.best_epoch
    for a, b in zip(other._best_state[0], mses._best_state[0]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="patience"):
        agm_fast.MSES([net.audio], patience=-1)
    with pytest.raises(ValueError, match="smoothing"):
        agm_fast.MSES([net.audio], patience=1, smoothing=1.5)
    with pytest.raises(ValueError, match="val_losses: expected a value for every modality"):
        agm_fast.MSES({"a": net.audio}, patience=1).epoch_end({"b": 1.0})


def test_mslr_and_mses_say_what_they_are_and_take_end_epoch():
    net = Net()
    mslr = agm_fast.MSLR([net.audio, net.visual], history=1)
    mses = agm_fast.MSES([net.audio, net.visual], patience=1)
    assert repr(mslr).startswith("MSLR(modalities=[") and "history=1" in repr(mslr)
    assert repr(mses).startswith("MSES(modalities=[") and "patience=1" in repr(mses)
    mslr.end_epoch([0.5, 0.5])
    mses.end_epoch([1.0, 1.0])
    assert mslr.epochs == 1 and mses.epochs == 1

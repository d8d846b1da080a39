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


def test_mslr_ratio_follows_the_window_memory_exactly():
    net = Net()
    init = [1.0, 0.5, 2.0]
    mslr = agm_fast.MSLR({"a": net.audio, "v": "visual", "t": net.text.parameters()}, init_lr_scales=init, model=net)
    accs = [
        [0.50, 0.40, 0.30],
        [0.55, 0.42, 0.31],
        [0.60, 0.41, 0.35],
        [0.58, 0.45, 0.36],
        [0.62, 0.47, 0.40],
        [0.70, 0.46, 0.41],
        [0.66, 0.50, 0.45],
        [0.64, 0.52, 0.00],
    ]
    for e, acc in enumerate(accs):
        ratios = mslr.epoch_end({"a": acc[0], "v": acc[1], "t": acc[2]})
        for m in range(3):
            if e < 5:
                want = 1.0
            else:
                past = [accs[j][m] for j in range(e - 5, e)]
                want = acc[m] / (sum(past) / 5)
            assert ratios[m] == pytest.approx(want, rel=1e-15, abs=0)
        raw = backward(net, e)
        mslr.scale_gradients_()
        for name, p in net.named_parameters():
            m = {"audio": 0, "visual": 1, "text": 2}.get(name.split(".")[0])
            scale = 1.0 if m is None else init[m] * ratios[m]
            torch.testing.assert_close(p.grad, raw[name] * scale, rtol=1e-6, atol=0)
    assert len(mslr.history[0]) == 5
    state = mslr.state_dict()
    fresh = agm_fast.MSLR([net.audio, net.visual, net.text], init_lr_scales=init)
    with pytest.raises(ValueError, match="modalities"):
        fresh.load_state_dict(state)
    again = agm_fast.MSLR({"a": net.audio, "v": net.visual, "t": net.text}, init_lr_scales=init)
    again.load_state_dict(state)
    assert again.epoch_end([0.7, 0.5, 0.4]) == mslr.epoch_end([0.7, 0.5, 0.4])


def test_mslr_history_and_selection_errors():
    net = Net()
    mslr = agm_fast.MSLR([net.audio, net.visual], history=2)
    assert mslr.epoch_end(torch.tensor([0.2, 0.4])) == [1.0, 1.0]
    assert mslr.epoch_end([0.4, 0.4]) == [1.0, 1.0]
    assert mslr.epoch_end([0.6, 0.2]) == pytest.approx([0.6 / 0.3, 0.2 / 0.4])
    with pytest.raises(ValueError, match="the prefix 'video' selects no trainable parameter"):
        agm_fast.MSLR({"a": "audio", "x": "video"}, model=net)
    # Prefixes are plain name prefixes, as in OGMGE: "aud" also selects audio.*, so it overlaps "audio".
    with pytest.raises(ValueError, match="selected by both modality 'a' and modality 'x'"):
        agm_fast.MSLR({"a": "audio", "x": "aud"}, model=net)
    with pytest.raises(ValueError, match="expected a non-empty name prefix"):
        agm_fast.MSLR({"a": ""}, model=net)
    # A DataParallel-style "module." wrapper prefix is ignored.
    wrapped = nn.Sequential()
    wrapped.add_module("module", net)
    dp = agm_fast.MSLR({"a": "audio."}, model=wrapped)
    assert [id(p) for p in dp._params[0]] == [id(p) for p in net.audio.parameters()]
    with pytest.raises(ValueError, match="model="):
        agm_fast.MSLR({"a": "audio"})
    with pytest.raises(ValueError, match="selected by both"):
        agm_fast.MSLR({"a": net.audio, "b": net.audio[0]})
    with pytest.raises(TypeError, match="modalities: expected a dict"):
        agm_fast.MSLR(net.audio)
    with pytest.raises(ValueError, match="2 values"):
        mslr.epoch_end([0.1])
    with pytest.raises(ValueError, match="non-finite"):
        mslr.epoch_end([0.1, float("nan")])
    with pytest.raises(ValueError, match="history: expected an int >= 1, got 0"):
        agm_fast.MSLR([net.audio], history=0)
    # The count of past epochs is `history`; `window` is the modulation window of the method interface only.
    with pytest.raises(TypeError, match="window"):
        agm_fast.MSLR([net.audio], window=2)
    for scales, exc, pattern in (
        ([-1.0, 1.0], ValueError, r"init_lr_scales\[0\]: expected a finite number > 0.0, got -1.0"),
        ([float("inf"), 1.0], ValueError, "init_lr_scales: expected finite values"),
        ([0.0, 1.0], ValueError, r"init_lr_scales\[0\]: expected a finite number > 0.0"),
        (["x", 1.0], TypeError, "init_lr_scales: expected numbers"),
    ):
        with pytest.raises(exc, match=pattern):
            agm_fast.MSLR([net.audio, net.visual], init_lr_scales=scales)

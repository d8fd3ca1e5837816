"""The few-shot methods: shared maths on hand-built cases, and each one learns on tiny data."""

from __future__ import annotations

import pytest
import torch

from training.backbones import Conv4, ResNet12, create_backbone
from training.data import EpisodeSampler, ImageSet
from training.methods import (
    MAML,
    METHODS,
    PrototypicalNetworks,
    cosine_logits,
    create_method,
    l2_logits,
    prototypes,
)
from training.methods.base import check_episode


def test_prototypes_and_distances() -> None:
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    protos = prototypes(feats, torch.tensor([0, 0, 1]), 2)
    assert protos.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    q = torch.tensor([[2.0, 1.0]])
    assert l2_logits(q, protos).tolist() == [[-1.0, -5.0]]  # negative squared distances
    cos = cosine_logits(q, protos, 2.0)
    assert torch.allclose(cos, 2 * torch.tensor([[2 / 5**0.5, 1 / 5**0.5]]))


def test_episode_checks() -> None:
    x = torch.zeros(4, 1, 8, 8)
    assert check_episode(x, torch.tensor([0, 1, 1, 0]), x) == 2
    with pytest.raises(ValueError, match="no gaps"):
        check_episode(x, torch.tensor([0, 2, 2, 0]), x)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        check_episode(x[0], torch.tensor([0]), x)
    with pytest.raises(ValueError, match="differ"):
        check_episode(x, torch.tensor([0, 1, 1, 0]), torch.zeros(2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"support_labels must be \[4\]"):
        check_episode(x, torch.tensor([0, 1]), x)
    net = PrototypicalNetworks(Conv4(1, hidden=4))
    with pytest.raises(ValueError, match=r"Conv4 expects \[B, 1, H, W\]"):
        net(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.zeros(1, 3, 8, 8))


def episode_tensors(ds: ImageSet, smp: EpisodeSampler, i: int) -> tuple[torch.Tensor, ...]:
    ep = smp.episode(i)
    return (
        ds.normalise(ds.batch(ep.support, ep.support_turns)),
        torch.from_numpy(ep.support_labels),
        ds.normalise(ds.batch(ep.query, ep.query_turns)),
        torch.from_numpy(ep.query_labels),
    )


@pytest.mark.parametrize("name", METHODS)
def test_method_learns(glyphs: ImageSet, name: str) -> None:
    torch.manual_seed(0)
    options = {"inner_lr": 0.1} if "maml" in name else {}  # small net: smaller inner steps
    method = create_method(
        name, Conv4(1, hidden=16), in_channels=1, size=glyphs.size, n_way=5, **options
    )
    smp = EpisodeSampler(glyphs, 5, 1, 3, seed=0)
    held = [episode_tensors(glyphs, smp, 1000 + i) for i in range(4)]

    def held_loss() -> float:
        return sum(float(method.loss(method(s, sy, q), qy).detach()) for s, sy, q, qy in held)

    opt = torch.optim.Adam(method.parameters(), lr=3e-3)
    before = held_loss()
    for i in range(40):
        s, sy, q, qy = episode_tensors(glyphs, smp, i)
        loss = method.loss(method(s, sy, q), qy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < 0.8 * before, (name, before, after)


def test_second_order_maml_differs_from_first_order(glyphs: ImageSet) -> None:
    smp = EpisodeSampler(glyphs, 3, 1, 2, seed=0)
    s, sy, q, qy = episode_tensors(glyphs, smp, 0)
    grads = []
    for first_order in (False, True):
        torch.manual_seed(0)
        m = MAML(Conv4(1, hidden=8), 8, 3, first_order=first_order)
        m.loss(m(s, sy, q), qy).backward()
        grads.append(m.head.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    m.eval()  # evaluation still adapts (with grad), returns detached logits
    with torch.no_grad():
        out = m(s, sy, q)
    assert out.shape == (6, 3) and not out.requires_grad
    with pytest.raises(ValueError, match="3 ways"):
        m(s[:2], sy[:2] % 2, q)


def test_backbones() -> None:
    x = torch.zeros(2, 1, 28, 28)
    assert Conv4(1)(x).shape == (2, 64)
    assert ResNet12(1, widths=(8, 8, 16, 16))(x).shape == (2, 16)
    assert create_backbone("conv4", 3, hidden=8)(torch.zeros(1, 3, 84, 84)).shape == (1, 200)
    # pools=3: the last block keeps its 3x3 map on 28x28 input (28 -> 14 -> 7 -> 3)
    assert create_backbone("conv4", pools=3)(x).shape == (2, 64 * 3 * 3)
    assert Conv4(1, hidden=4, pools=0)(x).shape == (2, 4 * 28 * 28)
    with pytest.raises(ValueError, match="pools must be 0..4"):
        Conv4(1, pools=5)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg")
    with pytest.raises(ValueError, match="unknown method"):
        create_method("snail", Conv4(1), in_channels=1, size=(28, 28), n_way=5)


def test_timm_tower_or_clear_error() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install timm"):
            create_backbone("timm:resnet10t")
        return
    tower = create_backbone("timm:resnet10t", 1)
    assert tower(torch.zeros(2, 1, 32, 32)).shape[0] == 2


def test_cosine_classifier_by_hand() -> None:
    from training.methods.aux_head import CosineClassifier

    head = CosineClassifier(2, 3, scale=4.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5], [-1.0, -1.0]]))
    feats = torch.tensor([[3.0, 4.0]])  # unit vector (0.6, 0.8)
    expected = 4.0 * torch.tensor([[0.6, 0.8, -1.4 / 2**0.5]])
    torch.testing.assert_close(head(feats), expected)
    labels = torch.tensor([1])
    torch.testing.assert_close(head.loss(feats, labels), -expected.log_softmax(1)[0, 1])
    with pytest.raises(ValueError, match="num_classes >= 2"):
        CosineClassifier(4, 1)

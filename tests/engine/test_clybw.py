"""ClybW against an op-for-op transcription of the reference, hand-derived values, and resume."""

from __future__ import annotations

import math

import pytest
import torch

from loradrop.engine.train.clybw import ClybW

REFERENCE_DEFAULTS = dict(
    betas=(0.95, 0.95),
    amp_fac=2.0,
    eps=1e-8,
    weight_decay=0.1,
    centralization=0.5,
    normalization=0.5,
    normalize_channels=True,
)

# LoCon-like shapes: linear down/up, 3x3 conv down, 1x1 conv up, repeated so the foreach path
# stacks them; 1-D tensors (whole-tensor statistics, and one too small to normalize); and
# tensors over 32768 elements, which torch reduces on several threads: with one row, a lone
# tensor's mean is split across threads, so stacking it would change its bits.
SHAPES = [
    (8, 24), (8, 24), (8, 24), (24, 8), (24, 8),
    (8, 5, 3, 3), (8, 5, 3, 3), (6, 8, 1, 1), (6, 8, 1, 1),
    (7,), (2,), (1, 40000), (1, 40000), (3, 20000), (3, 20000),
]  # fmt: skip


def reference_step(params: list[torch.Tensor], state: dict, hp: dict) -> None:
    """The reference Compass.step for one group, transcribed op for op.

    The reference works in place on p.grad; this works in place on a copy of it.
    """
    beta1, beta2 = hp["betas"]
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad.clone()
        if p not in state:
            state[p] = {"step": 0, "ema": torch.zeros_like(p), "ema_squared": torch.zeros_like(p)}
        st = state[p]
        st["step"] += 1
        if hp["centralization"] != 0:
            grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True).mul_(hp["centralization"]))
        if hp["normalization"] != 0:
            if grad.dim() > 1 and hp["normalize_channels"]:
                s = grad.std(dim=tuple(range(1, grad.dim())), keepdim=True).add_(1e-8)
                grad.lerp_(grad.div_(s), weight=hp["normalization"])
            elif torch.numel(grad) > 2:
                s = grad.std().add_(1e-8)
                grad.lerp_(grad.div_(s), weight=hp["normalization"])
        bias_correction = 1 - beta1 ** st["step"]
        bias_correction_sqrt = (1 - beta2 ** st["step"]) ** (1 / 2)
        step_size = hp["lr"] / bias_correction
        st["ema"].mul_(beta1).add_(grad, alpha=1 - beta1)
        grad.add_(st["ema"], alpha=hp["amp_fac"])
        st["ema_squared"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (st["ema_squared"].sqrt() / bias_correction_sqrt).add_(hp["eps"])
        if hp["weight_decay"] != 0:
            p.data.mul_(1 - step_size * hp["weight_decay"])
        p.data.addcdiv_(grad, denom, value=-step_size)


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]


def make_grads(step: int) -> list[torch.Tensor]:
    """Per-step gradients of mixed scales, with row means far from zero."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = []
    for i, s in enumerate(SHAPES):
        scale = 10.0 ** (-(i % 4) - 2)
        grads.append((torch.randn(s, generator=gen) + 0.3 * (i % 3)) * scale)
    return grads


def set_grads(params, grads, step: int) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        # Some parameters sit out a step, so per-tensor step counts diverge as in the reference.
        p.grad = None if (step == 1 and i % 5 == 0) else g.clone()
    # A gradient in another memory layout (autograd may hand over non-contiguous ones).
    if params[3].grad is not None:
        params[3].grad = params[3].grad.t().contiguous().t()
        assert not params[3].grad.is_contiguous()


CONFIGS = {
    "defaults": {},
    "no-centralization": {"centralization": 0.0},
    "no-normalization": {"normalization": 0.0},
    "neither": {"centralization": 0.0, "normalization": 0.0},
    "whole-tensor-std": {"normalize_channels": False},
    "no-weight-decay": {"weight_decay": 0.0},
    "other-values": {"centralization": 1.0, "normalization": 0.25, "amp_fac": 1.0, "betas": (0.9, 0.99)},
}


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_reference_bitwise(config, foreach):
    overrides = CONFIGS[config]
    hp = {**REFERENCE_DEFAULTS, **overrides}
    ours, theirs = make_params(), make_params()
    split = 6
    # The recipe's two groups: UNet at 3e-4, text encoders at 1e-4.
    opt = ClybW(
        [{"params": ours[:split], "lr": 3e-4}, {"params": ours[split:], "lr": 1e-4}],
        foreach=foreach,
        **overrides,
    )
    state: dict = {}
    for step in range(4):
        grads = make_grads(step)
        set_grads(ours, grads, step)
        set_grads(theirs, grads, step)
        opt.step()
        reference_step(theirs[:split], state, {**hp, "lr": 3e-4})
        reference_step(theirs[split:], state, {**hp, "lr": 1e-4})
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"param {i} {tuple(a.shape)} differs after step {step + 1}"
    for a, b in zip(ours, theirs):
        mine = opt.state[a]
        assert mine["step"] == state[b]["step"] and isinstance(mine["step"], int)
        assert torch.equal(mine["ema"], state[b]["ema"])
        assert torch.equal(mine["ema_squared"], state[b]["ema_squared"])


@pytest.mark.parametrize("threads", [1, 3])
def test_foreach_equals_per_tensor_on_other_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for foreach in (False, True):
            params = make_params()
            opt = ClybW(params, lr=3e-4, foreach=foreach)
            for step in range(3):
                set_grads(params, make_grads(step), step)
                opt.step()
            results.append(params)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_gradients_are_left_untouched():
    params = make_params()
    grads = make_grads(0)
    set_grads(params, grads, 0)
    ClybW(params, lr=1e-3).step()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_first_update_is_twenty_lr_sign_g():
    # Rows of zero mean and equal magnitudes: centralization changes nothing and the normalized
    # gradient keeps the sign of g. At t = 1: m = 0.05 g, g' = 1.1 g, sqrt(v)/bc2 = 1.1 |g|, so
    # the update is -lr/(1 - 0.95) * sign(g) = -20 lr sign(g) (weight decay acts on p = 0).
    lr = 1e-3
    g = torch.tensor([[3.0, -3.0, 3.0, -3.0], [-0.5, 0.5, 0.5, -0.5]])
    for shape in [(2, 4), (2, 2, 2, 1)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = g.reshape(shape).clone()
        ClybW([p], lr=lr).step()
        torch.testing.assert_close(p.detach(), -20 * lr * torch.sign(p.grad), rtol=1e-6, atol=0)


def test_step_size_is_twenty_lr_at_step_1_and_1_02_lr_at_step_80():
    # With zero gradients the moments stay zero and the update is pure decoupled weight decay,
    # p_t = p_{t-1} (1 - eta_t wd): the ratio of successive values reveals eta_t.
    lr, wd = 0.1, 0.1
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = ClybW([p], lr=lr, weight_decay=wd)
    eta = []
    for _ in range(80):
        before = p.detach().double()[0, 0].item()
        p.grad = torch.zeros_like(p)
        opt.step()
        eta.append((1 - p.detach().double()[0, 0].item() / before) / wd)
    assert eta[0] / lr == pytest.approx(20.0, rel=1e-5)
    assert eta[79] / lr == pytest.approx(1 / (1 - 0.95**80), rel=1e-4)
    assert eta[79] / lr == pytest.approx(1.02, abs=0.005)
    assert all(a > b for a, b in zip(eta, eta[1:]))


def test_normalization_is_on_off_not_a_blend():
    # The reference's quirk: lerp(g, g.div_(s), alpha) divides g in place first, so the
    # result is g/s for any alpha != 0.
    runs = {}
    for alpha in (0.5, 1.0, 0.0):
        params = make_params()
        opt = ClybW(params, lr=3e-4, normalization=alpha)
        for step in range(3):
            set_grads(params, make_grads(step), step)
            opt.step()
        runs[alpha] = params
    assert all(torch.equal(a, b) for a, b in zip(runs[0.5], runs[1.0]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.5], runs[0.0]))


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_degenerate_rows_give_the_references_parameters(foreach):
    # Rows the reference's lerp(g, g/s, alpha) could treat differently from a plain g/s: zeros,
    # negative zeros, and a constant huge row whose g/s overflows (std 0, s = 1e-8): the
    # reference's lerp makes that NaN, the divide alone inf; the parameter is NaN either way.
    grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    grad[0] = 1e35
    grad[1] = 0.0
    grad[2] = -0.0
    ours = [torch.nn.Parameter(torch.ones(4, 6)) for _ in range(2)]
    theirs = [torch.nn.Parameter(torch.ones(4, 6)) for _ in range(2)]
    opt = ClybW(ours, lr=1e-3, foreach=foreach)
    state: dict = {}
    for _ in range(2):
        for p in ours + theirs:
            p.grad = grad.clone()
        opt.step()
        reference_step(theirs, state, {**REFERENCE_DEFAULTS, "lr": 1e-3})
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert a[0].isnan().all() and a[1:].isfinite().all()


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_resume_from_state_dict_continues_identically(tmp_path, foreach):
    def groups(params):
        return [{"params": params[:6], "lr": 3e-4}, {"params": params[6:], "lr": 1e-4}]

    straight = make_params()
    opt = ClybW(groups(straight), foreach=foreach)
    for step in range(5):
        set_grads(straight, make_grads(step), step)
        opt.step()

    first = make_params()
    opt = ClybW(groups(first), foreach=foreach)
    for step in range(3):
        set_grads(first, make_grads(step), step)
        opt.step()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt = ClybW(groups(resumed), foreach=foreach)
    opt.load_state_dict(saved["optimizer"])
    assert opt.state[resumed[1]]["step"] == 3 and opt.state[resumed[0]]["step"] == 2  # sat out step 2
    for step in range(3, 5):
        set_grads(resumed, make_grads(step), step)
        opt.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_loads_a_state_dict_without_foreach_key():
    # The reference's groups have no "foreach"; such a state dict still loads and steps.
    params = make_params()
    opt = ClybW(params, lr=1e-4)
    set_grads(params, make_grads(0), 0)
    opt.step()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["foreach"]
    opt = ClybW(params, lr=1e-4)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["foreach"] is False
    set_grads(params, make_grads(1), 1)
    opt.step()


def test_sparse_gradients_are_refused_before_any_change():
    dense = torch.nn.Parameter(torch.ones(3, 3))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    dense.grad = torch.ones(3, 3)
    opt = ClybW([dense, *emb.parameters()], lr=1e-3)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3, 3))
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": -1.0}, {"eps": -1e-8}, {"betas": (1.0, 0.95)}, {"betas": (0.9,)}, {"weight_decay": -0.1}],
)
def test_bad_hyperparameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="ClybW"):
        ClybW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_defaults_are_the_references():
    opt = ClybW([torch.nn.Parameter(torch.ones(2))])
    group = opt.param_groups[0]
    assert {k: group[k] for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert group["lr"] == 1e-3 and group["foreach"] is False


def test_closure_loss_is_returned_and_trains_a_real_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 1)
    )
    x = torch.randn(32, 3, 4, 4)
    y = 0.1 * x.sum(dim=(1, 2, 3)).unsqueeze(1)
    opt = ClybW(model.parameters(), lr=1e-3)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(40):
        last = opt.step(closure).item()
    assert math.isfinite(last) and last < 0.01 * first


def test_importable_from_engine_package():
    from loradrop.engine import ClybW as lazy

    assert lazy is ClybW

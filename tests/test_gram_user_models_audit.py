"""per_sample_grad_gram on models that are not transformers (MLPs, embeddings, norms, convolutions, batch norm,
weight sharing, functional uses, parametrized layers) against a loop of torch.autograd.grad per sample in float64:
the Gram ``G G^T`` of the flattened per-sample gradients over the covered parameters, or a refusal by name."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from pypattern.gram import gram_parameters, per_sample_grad_gram
from pypattern.ops.grad_gram import center_gram

B = 5


def _loop_gram(model, loss_fn, *inputs, modules=None, centered=False):
    """``G G^T`` of the per-sample gradients ``grad l_i`` of the batch's losses, one autograd call per sample."""
    if modules is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(gram_parameters(model, modules).values())
    losses = loss_fn(model, *inputs)
    rows = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i].sum(), params, retain_graph=True, allow_unused=True)
        gs = [
            torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
            for p, g in zip(params, gs)
        ]
        rows.append(torch.cat([g.reshape(-1).double() for g in gs]))
    flat = torch.stack(rows)
    g = flat @ flat.T
    return center_gram(g) if centered else g


def _rel(x, y):
    return float((x - y).abs().max() / y.abs().max())


def _sq(model, x):
    out = model(x)
    return (out**2).reshape(out.shape[0], -1).sum(-1)


class _Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.e, self.o = nn.Embedding(7, 4, **kw), nn.Linear(4, 1)

    def forward(self, ids):
        return self.o(torch.tanh(self.e(ids))).squeeze(-1)


class _Loop(nn.Module):
    """One linear map applied three times (an RNN-style loop), then a readout."""

    def __init__(self):
        super().__init__()
        self.cell, self.o = nn.Linear(4, 4), nn.Linear(4, 1)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.cell(x) * self.gain)
        return self.o(x).squeeze(-1)


class _Conv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.c, self.o = conv, nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.c(x)).flatten(2).mean(-1)
        return self.o(h).squeeze(-1)


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(4, 3), nn.Linear(2, 3, bias=False), nn.Linear(3, 1)

    def forward(self, x, z):
        return self.o(torch.tanh(self.a(x) + self.b(z))).squeeze(-1)


def _case(name):
    torch.manual_seed(0)
    x = torch.randn(B, 4, dtype=torch.float64)
    ids = torch.randint(0, 7, (B, 6))
    ids[0, :3], ids[1, 1] = 0, 0
    if name.startswith("mlp"):
        bias = name == "mlp"
        m = nn.Sequential(nn.Linear(4, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
        return m.double(), _sq, (torch.randn(B, 2, 4, dtype=torch.float64),)
    if name.startswith("embedding"):
        kw = {
            "padding": {"padding_idx": 0},
            "negative padding": {"padding_idx": -7},
            "sparse": {"sparse": True},
        }
        m = _Emb(**kw.get(name[len("embedding ") :], {})).double()
        with torch.no_grad():
            m.e.weight.mul_(3)
        return m, _sq, (ids,)
    if name.startswith("layernorm"):
        affine, bias = {"layernorm": (True, True), "layernorm no bias": (True, False)}.get(
            name, (False, False)
        )
        m = nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=affine, bias=bias), nn.Linear(6, 2)
        )
        if affine:
            with torch.no_grad():
                m[1].weight.uniform_(0.5, 2.0)
        return m.double(), _sq, (torch.randn(B, 3, 4, dtype=torch.float64),)
    if name == "groupnorm without affine":
        return (
            nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6, affine=False), nn.Linear(6, 2)).double(),
            _sq,
            (x,),
        )
    if name == "batchnorm in eval mode":
        m = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(), nn.Linear(6, 2)
        ).double()
        m(torch.randn(8, 4, dtype=torch.float64))  # running statistics of their own
        return m.eval(), _sq, (x,)
    if name == "loop with a buffer":
        return _Loop().double(), _sq, (x,)
    if name == "module twice in a Sequential":
        shared = nn.Linear(4, 4)
        return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 1)).double(), _sq, (x,)
    if name == "frozen convolution":
        m = _Conv(nn.Conv2d(3, 4, 3)).double()
        m.c.requires_grad_(False)
        return m, _sq, (torch.randn(B, 3, 5, 5, dtype=torch.float64),)
    z = torch.randn(B, 2, dtype=torch.float64)
    if name == "tuple input":
        return _Two().double(), lambda m, t: m(*t) ** 2, ((x, z),)
    if name == "dict input":
        return _Two().double(), lambda m, d: m(d["x"], d["z"]) ** 2, ({"x": x, "z": z},)
    raise AssertionError(name)


CASES = [
    "mlp",
    "mlp without biases",
    "embedding",
    "embedding padding",
    "embedding negative padding",
    "embedding sparse",
    "layernorm",
    "layernorm no bias",
    "layernorm without affine",
    "groupnorm without affine",
    "batchnorm in eval mode",
    "loop with a buffer",
    "module twice in a Sequential",
    "frozen convolution",
    "tuple input",
    "dict input",
]


@pytest.mark.parametrize("name", CASES)
def test_gram_of_user_models_equals_a_per_sample_autograd_loop(name):
    model, loss, inputs = _case(name)
    ref = _loop_gram(model, loss, *inputs)
    assert _rel(per_sample_grad_gram(model, loss, *inputs, check=True), ref) < 1e-12
    parts = per_sample_grad_gram(model, loss, *inputs, per_module=True, centered=True, check=True)
    assert _rel(sum(parts.values()), center_gram(ref)) < 1e-11
    for site, g in parts.items():  # each site's Gram is over its own module's parameters
        assert _rel(g, _loop_gram(model, loss, *inputs, modules=[site], centered=True)) < 1e-11


def _functional():
    class F1(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.o = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 1)

        def forward(self, x):
            return self.o(torch.tanh(F.linear(x, self.W))).squeeze(-1)

    return F1()


def _tied_linears():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 1))
    m[2].weight = m[0].weight
    return m


@pytest.mark.parametrize(
    "make, x_shape, match",
    [
        (
            lambda: _Conv(nn.Conv1d(3, 4, 3)),
            (B, 3, 8),
            r"leave out 2 trainable parameters \(\['c.weight', 'c.bias'\]",
        ),
        (lambda: _Conv(nn.Conv2d(3, 4, 3)), (B, 3, 5, 5), r"leave out 2 trainable parameters \(\['c.weight'"),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6)), (B, 4), r"\['1.weight', '1.bias'\]"),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), (B, 4), r"\['1.weight', '1.bias'\]"),
        (_functional, (B, 4), r"leave out 1 trainable parameters \(\['W'\]"),
        (lambda: _Emb(max_norm=1.0), None, r"e: nn.Embedding with scale_grad_by_freq or max_norm"),
        (
            lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm((2, 6))),
            (B, 2, 4),
            r"1: nn.LayerNorm over more",
        ),
        (_tied_linears, (B, 4), r"2.weight is the same tensor as 0.weight"),
    ],
)
def test_layers_the_default_sites_do_not_cover_are_refused_by_name(make, x_shape, match):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randint(0, 7, (B, 3)) if x_shape is None else torch.randn(*x_shape, dtype=torch.float64)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        per_sample_grad_gram(model, _sq, x)


def test_a_module_named_in_modules_that_is_not_a_site_is_refused_by_name():
    model = _Conv(nn.Conv1d(3, 4, 3)).double()
    x = torch.randn(B, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"modules: 'c' is a Conv1d holding no nn.Linear"):
        per_sample_grad_gram(model, _sq, x, modules=["c"])
    assert (
        _rel(per_sample_grad_gram(model, _sq, x, modules=["o"]), _loop_gram(model, _sq, x, modules=["o"]))
        < 1e-12
    )


def test_batch_norm_on_batch_statistics_is_named_when_the_check_fails():
    """A batch norm in training mode (or without running statistics) makes every loss depend on every sample: the
    captured gradients are not per-sample ones, and the check's error names the batch norm."""
    torch.manual_seed(0)
    x = torch.randn(B, 4, dtype=torch.float64)
    for train, running in [(True, True), (False, False)]:
        model = nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6, affine=False, track_running_stats=running),
            nn.Tanh(),
            nn.Linear(6, 2),
        ).double()
        model.train(train)
        with pytest.raises(ValueError, match=r"(?s)site '0'.*the model mixes the samples: \['1'\] normalise"):
            per_sample_grad_gram(model, _sq, x)


def test_check_once_checks_again_when_a_submodule_alone_changes_mode():
    """A model verified with its batch norm in eval mode, then that batch norm alone set to training mode (the top
    module's mode unchanged): the next call is checked again and refused, not a silently wrong Gram."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False), nn.Tanh(), nn.Linear(6, 2)
    ).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    model.train()
    model[1].eval()
    assert _rel(per_sample_grad_gram(model, _sq, x), _loop_gram(model, _sq, x)) < 1e-12
    model[1].train()
    with pytest.raises(ValueError, match=r"the model mixes the samples"):
        per_sample_grad_gram(model, _sq, x)


def _parametrized(kind):
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    if kind == "parametrize":

        class Exp(nn.Module):
            def forward(self, w):
                return w.exp()

        parametrize.register_parametrization(model[0], "weight", Exp())
    elif kind == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize("kind", ["parametrize", "weight_norm", "old weight_norm"])
def test_parametrized_layers_are_refused_by_name_and_left_out_when_frozen(kind):
    """A linear map whose weight is computed from other parameters has no per-sample gradient of its own
    parameters at its site: refused naming the module when they are trainable, left out when they are frozen."""
    torch.manual_seed(0)
    x = torch.randn(B, 4, dtype=torch.float64)
    model = _parametrized(kind)
    with pytest.raises(
        NotImplementedError, match=r"0: the weight of this \w*Linear is computed from other param"
    ):
        per_sample_grad_gram(model, _sq, x)
    with pytest.raises(NotImplementedError, match=r"0: the weight"):
        per_sample_grad_gram(model, _sq, x, modules=["0"])
    assert (
        _rel(per_sample_grad_gram(model, _sq, x, modules=["2"]), _loop_gram(model, _sq, x, modules=["2"]))
        < 1e-12
    )
    model[0].requires_grad_(False)
    g = per_sample_grad_gram(model, _sq, x, per_module=True)
    assert set(g) == {"2"}
    assert _rel(g["2"], _loop_gram(model, _sq, x)) < 1e-12

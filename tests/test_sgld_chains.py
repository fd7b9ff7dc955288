"""``sgld_chains_step_``: C SGLD chains stepped in one call, row ``c`` of every stacked tensor being chain ``c``.

The contract checked here: row ``c`` gets, bit for bit on one backend, the update that :func:`sgld_step_` gives
chain ``c``'s rows alone with seed ``seeds[c]`` (noise included), whatever the layouts of the stacked tensors; the
flags are per chain and tensor; bad input is refused naming the argument; and the batched runner's
:meth:`StackedSamplerState.step_chains` is its chains stepped one at a time. Each backend runs on the tensors of
its device (see tests/_backend_cases.py).
"""

from __future__ import annotations

import pytest
import torch
from _backend_cases import backend_devices, to

from pypattern.ops.sgld import FLAG_GRAD_NONFINITE, FLAG_UPDATE_NONFINITE, sgld_chains_step_, sgld_step_
from pypattern.sampling.samplers import StackedSamplerState

pytestmark = pytest.mark.usefixtures("one_thread")

OP = "sgld_chains_step_"
CASES = backend_devices(OP)
# the compiled kernels (C++ and CUDA): the case large enough for the C++ kernel's parallel split
KERNELS = [c for c in CASES if c.values[0] in ("cpp", "cuda")]
# where the backend is fast (the Triton interpreter runs each launch in Python): the batched runner's steps and
# the comparison across backends (tests/test_sgld.py compares the interpreter's noise stream with the reference's)
RUNNER = [c for c in CASES if not (c.values[0] == "triton" and c.values[1] == "cpu")]
COMPILED = [c for c in RUNNER if c.values[0] != "reference"]
DTYPES = [torch.float32, torch.float64]

HYPER = dict(step_size=1e-3, nbeta=37.0, localization=100.0, weight_decay=0.01)
SEEDS = [0, 2**64 - 1, 1, 2**64 - 2, 2**63, 2**32 + 3, 12345]  # C = 7, the ends of the seed range included
STEP = 2**32 + 5  # the high word of the step counter is used
# noise of the same Philox integers in different math libraries (tests/test_sgld.py)
NOISE_RTOL, NOISE_ATOL = 1e-5, 5e-6
OVERFLOW_WARNINGS = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers of its width (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]
    return t.detach().cpu().contiguous().view(as_int)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(_bits(got), _bits(want)), f"{what}: differs in {int((got != want).sum())} entries"


def _per_chain(params, grads, anchors, *, seeds, **kw) -> torch.Tensor:
    """``sgld_step_`` on each chain's rows in turn (in place); the ``(C, len(params))`` flags."""
    flags = [
        sgld_step_([p[c] for p in params], [g[c] for g in grads], anchors, seed=s, **kw).cpu()
        for c, s in enumerate(seeds)
    ]
    return torch.stack(flags) if flags else torch.zeros((0, len(params)), dtype=torch.int32)


def _chain_case(C: int, dtype, device: str, *, masked: bool, seed: int = 0):
    """Stacked params, grads, the shared anchors and masks of four tensors: a 0-d row, a (5, 3) row with a bool
    mask, a row of zero elements and a (26, 5) row (two of the C++ kernel's blocks) with a non-contiguous float
    mask holding 0, 0.5 and 1. The params start within 0.1 of the anchors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (5, 3), (0, 4), (26, 5)]
    anchors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params = [a + 0.1 * torch.randn((C, *s), generator=gen, dtype=dtype) for a, s in zip(anchors, shapes)]
    grads = [torch.randn((C, *s), generator=gen, dtype=dtype) for s in shapes]
    params, grads, anchors = ([t.to(device) for t in ts] for ts in (params, grads, anchors))
    masks = None
    if masked:
        wide = ((torch.rand(26, 10, generator=gen) * 2).round() / 2).to(dtype).to(device)
        float_mask = wide[:, ::2]  # made on the device: a copy to it would be contiguous
        assert not float_mask.is_contiguous()
        bool_mask = torch.rand(5, 3, generator=gen) > 0.4
        masks = [None, bool_mask.to(device), torch.ones(0, 4, dtype=dtype, device=device), float_mask]
        for m in masks[1::2]:
            assert bool((m == 0).any()) and bool((m != 0).any())
    return params, grads, anchors, masks


def _active(p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The entries of stacked ``p`` that a step moves (mask not 0), broadcast over the chains."""
    if mask is None:
        return torch.ones(p.shape, dtype=torch.bool)
    return (mask != 0).cpu().expand(p.shape)


# --------------------------------------------------------------------------- the per-chain steps, bit for bit


@pytest.mark.parametrize("backend, device", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "C, noise_scale, bounding_box, masked",
    [(7, 1.0, 0.05, True), (7, 0.0, None, True), (1, 1.0, None, False)],
    ids=["C7-noise-box-masks", "C7-nonoise-nobox-masks", "C1-noise-nobox-nomasks"],
)
def test_rows_are_the_per_chain_steps_bit_for_bit(
    backend, device, dtype, C, noise_scale, bounding_box, masked
):
    params, grads, anchors, masks = _chain_case(C, dtype, device, masked=masked)
    seeds = SEEDS if C == 7 else [2**64 - 1]
    kw = dict(
        HYPER, noise_scale=noise_scale, bounding_box=bounding_box, masks=masks, step=STEP, backend=backend
    )
    together = [p.clone() for p in params]
    flags = sgld_chains_step_(together, grads, anchors, seeds=seeds, **kw)
    assert flags.dtype == torch.int32 and tuple(flags.shape) == (C, len(params))
    assert not bool(flags.any())
    alone = [p.clone() for p in params]
    assert torch.equal(_per_chain(alone, grads, anchors, seeds=seeds, **kw), flags.cpu())
    for t, (x, y) in enumerate(zip(together, alone)):
        assert_same_bits(x, y, f"params[{t}]")
    # the step did something: every entry whose mask is not 0 moved, the others kept their bits
    for t, (new, old) in enumerate(zip(together, params)):
        moving = _active(new, None if masks is None else masks[t])
        changed = (new != old).cpu()
        assert bool(changed[moving].all()), f"params[{t}]: an unmasked entry did not move"
        assert torch.equal(_bits(new)[~moving], _bits(old)[~moving]), f"params[{t}]: a frozen entry moved"
        if bounding_box is not None:
            off = (new - anchors[t]).abs().cpu()[moving]
            assert bool((off <= bounding_box * (1 + 1e-6)).all())


@pytest.mark.parametrize("backend, device", KERNELS)
def test_a_hundred_thousand_entries_on_two_threads(backend, device):
    """About 1e5 entries over three chains: the C++ kernel's parallel split of its (tensor, chain) rows into blocks
    cuts rows in the middle; one thread and two give the per-chain steps' bits."""
    gen = torch.Generator().manual_seed(3)
    C, shapes = 3, [(33_335,), (7,), (100, 3)]
    anchors = [torch.randn(s, generator=gen) for s in shapes]
    params = [a + 0.1 * torch.randn((C, *s), generator=gen) for a, s in zip(anchors, shapes)]
    grads = [torch.randn((C, *s), generator=gen) for s in shapes]
    mask = (torch.rand(shapes[0], generator=gen) * 2).round() / 2
    params, grads, anchors = ([t.to(device) for t in ts] for ts in (params, grads, anchors))
    kw = dict(HYPER, noise_scale=1.0, masks=[mask.to(device), None, None], step=STEP, backend=backend)
    seeds = [2**64 - 1, 0, 99]
    alone = [p.clone() for p in params]
    _per_chain(alone, grads, anchors, seeds=seeds, **kw)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            together = [p.clone() for p in params]
            assert not bool(sgld_chains_step_(together, grads, anchors, seeds=seeds, **kw).any())
            results.append(together)
    finally:
        torch.set_num_threads(before)
    for together in results:
        for t, (x, y) in enumerate(zip(together, alone)):
            assert_same_bits(x, y, f"params[{t}]")
    assert bool((results[0][0] != params[0])[:, mask.to(device) != 0].all())


# ---------------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("backend, device", CASES)
def test_strided_params_grads_and_anchors_are_stepped_in_place(backend, device):
    """Params whose chain axis is innermost in memory (a permuted chain-last tensor), every other row of a tensor
    and every other column of one; grads permuted and expanded along the chain axis (stride 0); transposed and
    strided anchors. The rows get the per-chain steps' bits, written into the given tensors' memory (and nowhere
    else in it)."""
    C, dtype = 3, torch.float64
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=dtype).to(device)

    bases = [rnd(4, 5, C), rnd(2 * C, 7), rnd(C, 8)]

    def views(b):
        return [b[0].permute(2, 0, 1), b[1][::2], b[2][:, 1::2]]

    params = views(bases)
    assert [tuple(p.shape) for p in params] == [(C, 4, 5), (C, 7), (C, 4)]
    assert not any(p.is_contiguous() for p in params)
    assert params[0].stride()[0] == 1  # the chain axis is the innermost one in memory
    grads = [rnd(4, 5, C).permute(2, 0, 1), rnd(7).expand(C, 7), rnd(C, 4)]
    assert grads[1].stride()[0] == 0
    anchors = [rnd(5, 4).t(), rnd(14)[::2], rnd(4, 2)[:, 1]]
    for a, p in zip(anchors, params):
        a.copy_(p[0] + 0.1 * a)  # near the params (for the bounding box), in the anchors' own layout
    assert not any(a.is_contiguous() for a in anchors)
    masks = [None, None, (rnd(4, 3)[:, 0] > 0).to(dtype)]
    kw = dict(HYPER, noise_scale=1.0, bounding_box=0.5, masks=masks, step=2**64 - 1, backend=backend)
    seeds = [2**64 - 1, 0, 7]

    copies = [b.clone() for b in bases]
    alone = views(copies)
    _per_chain(alone, grads, anchors, seeds=seeds, **kw)
    before = [b.clone() for b in bases]
    pointers, strides = [p.data_ptr() for p in params], [p.stride() for p in params]
    given = list(params)
    flags = sgld_chains_step_(given, grads, anchors, seeds=seeds, **kw)
    assert not bool(flags.any())
    for t, p in enumerate(params):
        assert given[t] is p and p.data_ptr() == pointers[t] and p.stride() == strides[t]
        assert_same_bits(p, alone[t], f"params[{t}]")
        assert bool((p != views(before)[t]).any()), f"params[{t}] did not move"
    # the memory the bases hold outside the views is untouched; inside, it holds the new values
    for b, stepped_alone in zip(bases, copies):
        assert_same_bits(b, stepped_alone)
    assert_same_bits(bases[1][1::2], before[1][1::2])
    assert_same_bits(bases[2][:, ::2], before[2][:, ::2])


# ------------------------------------------------------------------------------------------------ cross-backend


@pytest.mark.parametrize("backend, device", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_agree_with_the_reference_within_the_noise_tolerance(backend, device, dtype):
    """Across backends the Philox integers are the same and the noise differs by the rounding of log, cos and
    sqrt in each math library: within the tolerance tests/test_sgld.py uses between backends, chain by chain."""
    params, grads, anchors, masks = _chain_case(7, dtype, device, masked=True, seed=1)
    kw = dict(HYPER, noise_scale=1.0, masks=masks, seeds=SEEDS, step=STEP)
    ref, out = [p.clone() for p in params], [p.clone() for p in params]
    f_ref = sgld_chains_step_(ref, grads, anchors, backend="reference", **kw)
    f_out = sgld_chains_step_(out, grads, anchors, backend=backend, **kw)
    assert torch.equal(f_ref.cpu(), f_out.cpu())
    for t, (r, o, p) in enumerate(zip(ref, out, params)):
        err = (o - r).abs().cpu()
        within = err <= NOISE_ATOL + NOISE_RTOL * r.abs().cpu()
        assert bool(within.all()), f"params[{t}]: differs from the reference by up to {float(err.max())}"
        if p.numel():
            # the noise is not the same across chains: a seed given to the wrong row would show
            noise = (r - p).cpu().reshape(7, -1)
            assert not torch.allclose(noise[0], noise[1], rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- flags


def _flag_case(device):
    """Three chains, two tensors: chain 1's gradient of tensor 1 holds a NaN, chain 2's gradient of tensor 0 a
    finite 1e38 whose update overflows (step_size * nbeta / 2 = 50)."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(3, 4, generator=gen), torch.randn(3, 2, 3, generator=gen)]
    grads = [torch.randn(3, 4, generator=gen), torch.randn(3, 2, 3, generator=gen)]
    anchors = [p[0] + 0.1 for p in params]
    grads[1][1, 0, 2] = float("nan")
    grads[0][2, 1] = 1e38
    hyper = dict(step_size=1e-3, nbeta=1e5, localization=1.0, noise_scale=1.0, step=4)
    return list(to(device, *params)), list(to(device, *grads)), list(to(device, *anchors)), hyper


@pytest.mark.parametrize("backend, device", CASES)
@OVERFLOW_WARNINGS
def test_flags_name_the_chain_and_the_tensor(backend, device):
    params, grads, anchors, hyper = _flag_case(device)
    seeds = [5, 2**64 - 1, 0]
    kw = dict(hyper, seeds=seeds, backend=backend)
    stepped = [p.clone() for p in params]
    flags = sgld_chains_step_(stepped, grads, anchors, check_finite=False, **kw)
    want = [[0, 0], [0, FLAG_GRAD_NONFINITE], [FLAG_UPDATE_NONFINITE, 0]]
    assert flags.dtype == torch.int32 and flags.cpu().tolist() == want
    # the flagged entries kept their values; every other entry moved
    kept = [torch.zeros(3, 4, dtype=torch.bool), torch.zeros(3, 2, 3, dtype=torch.bool)]
    kept[1][1, 0, 2] = True
    kept[0][2, 1] = True
    for t, (new, old) in enumerate(zip(stepped, params)):
        assert torch.equal(_bits(new)[kept[t]], _bits(old)[kept[t]]), f"params[{t}]: a flagged entry moved"
        assert bool((new != old).cpu()[~kept[t]].all()), f"params[{t}]: an unflagged entry did not move"
        assert bool(torch.isfinite(new).all())
    alone = [p.clone() for p in params]
    per_chain = _per_chain(
        alone, grads, anchors, seeds=seeds, check_finite=False, **dict(hyper, backend=backend)
    )
    assert per_chain.tolist() == want
    for t, (x, y) in enumerate(zip(stepped, alone)):
        assert_same_bits(x, y, f"params[{t}]")

    # check_finite=True (the default, validated or not) raises naming the first chain flagged, after the step
    for validate in (True, False):
        raised = [p.clone() for p in params]
        with pytest.raises(
            FloatingPointError, match=r"chain 1 \(seeds\[1\] = 18446744073709551615\).*grads\[1\]"
        ):
            sgld_chains_step_(raised, grads, anchors, validate=validate, **kw)
        for t, (x, y) in enumerate(zip(raised, stepped)):
            assert_same_bits(x, y, f"params[{t}]")
    # the overflow alone: chain 2, bit 2, named as an overflow
    grads[1][1, 0, 2] = 0.5
    with pytest.raises(
        FloatingPointError, match=r"^chain 2 \(seeds\[2\] = 0\): .*overflowed .*params\[0\]"
    ) as e:
        sgld_chains_step_([p.clone() for p in params], grads, anchors, **kw)
    assert "chain 1" not in str(e.value) and "grads[1]" not in str(e.value)
    flags = sgld_chains_step_([p.clone() for p in params], grads, anchors, check_finite=False, **kw)
    assert flags.cpu().tolist() == [[0, 0], [0, 0], [FLAG_UPDATE_NONFINITE, 0]]


# ------------------------------------------------------------------------------------------------ empty cases


@pytest.mark.parametrize("backend, device", CASES)
def test_no_chains_or_no_tensors_return_empty_flags(backend, device):
    kw = dict(HYPER, step=0, backend=backend)
    # C = 0
    params = [torch.zeros(0, 4, device=device), torch.zeros(0, device=device)]
    grads = [torch.ones(0, 4, device=device), torch.ones(0, device=device)]
    anchors = [torch.ones(4, device=device), torch.ones((), device=device)]
    flags = sgld_chains_step_(params, grads, anchors, seeds=[], **kw)
    assert flags.dtype == torch.int32 and tuple(flags.shape) == (0, 2)
    assert torch.equal(anchors[0].cpu(), torch.ones(4)) and float(anchors[1]) == 1.0
    # no tensors, with chains and without
    for seeds in ([1, 2**64 - 1], []):
        flags = sgld_chains_step_([], [], [], seeds=seeds, **kw)
        assert flags.dtype == torch.int32 and tuple(flags.shape) == (len(seeds), 0)
    # chains whose rows have no elements, beside a tensor that moves
    p = [torch.zeros(2, 0, 3, device=device), torch.zeros(2, 3, device=device)]
    g = [torch.ones(2, 0, 3, device=device), torch.ones(2, 3, device=device)]
    a = [torch.zeros(0, 3, device=device), torch.zeros(3, device=device)]
    flags = sgld_chains_step_(p, g, a, seeds=[3, 4], **kw)
    assert flags.cpu().tolist() == [[0, 0], [0, 0]]
    assert tuple(p[0].shape) == (2, 0, 3) and bool((p[1] != 0).all())


# ----------------------------------------------------------------------------------------------- bad input


def _valid():
    """Three chains of a (4,) tensor and a 0-d one: every case below changes one argument of these."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)]
    grads = [torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)]
    anchors = [torch.randn(4, generator=gen), torch.randn((), generator=gen)]
    return dict(params=params, grads=grads, anchors=anchors, masks=None, seeds=[1, 2, 3])


def _shared_params(args):
    base = torch.randn(4)
    args["params"][0] = base.expand(3, 4)  # three rows, one memory: each entry would be stepped three times
    return base


def _overlapping_rows(args):
    base = torch.randn(10)
    args["params"][0] = base.as_strided((3, 4), (2, 1))  # rows overlapping by two entries
    return base


BAD = {
    "params-rows-not-len-seeds": (
        lambda a: a.update(params=[a["params"][0], torch.randn(2)], grads=[a["grads"][0], torch.randn(2)]),
        ValueError,
        r"params\[1\] has shape \(2,\); its first dimension must be the chain axis, of length len\(seeds\) = 3",
    ),
    "params-0d": (
        lambda a: a.update(params=[a["params"][0], torch.randn(())], grads=[a["grads"][0], torch.randn(())]),
        ValueError,
        r"params\[1\] has shape \(\);",
    ),
    "grads-shape": (
        lambda a: a["grads"].__setitem__(0, torch.randn(3, 5)),
        ValueError,
        r"grads\[0\] has shape \(3, 5\) but params\[0\] has \(3, 4\)",
    ),
    "grads-dtype": (
        lambda a: a["grads"].__setitem__(0, torch.randn(3, 4, dtype=torch.float64)),
        TypeError,
        r"grads\[0\] has dtype torch.float64",
    ),
    "anchors-stacked": (
        lambda a: a["anchors"].__setitem__(0, torch.randn(3, 4)),
        ValueError,
        r"anchors\[0\] has shape \(3, 4\); it must be one chain's row of params\[0\], shape \(4,\)",
    ),
    "anchors-0d-stacked": (
        lambda a: a["anchors"].__setitem__(1, torch.randn(3)),
        ValueError,
        r"anchors\[1\] has shape \(3,\); it must be one chain's row of params\[1\], shape \(\)",
    ),
    "masks-stacked": (
        lambda a: a.update(masks=[torch.rand(3, 4) > 0.5, None]),
        ValueError,
        r"masks\[0\] has shape \(3, 4\); it must be one chain's row of params\[0\]",
    ),
    "masks-other-shape": (
        lambda a: a.update(masks=[None, torch.ones(1)]),
        ValueError,
        r"masks\[1\] has shape \(1,\)",
    ),
    "masks-int": (
        lambda a: a.update(masks=[torch.ones(4, dtype=torch.int64), None]),
        TypeError,
        r"masks\[0\] must be bool or floating point",
    ),
    "masks-length": (
        lambda a: a.update(masks=[None]),
        ValueError,
        r"masks must have one entry \(or None\) per tensor",
    ),
    "seed-float": (lambda a: a.update(seeds=[1, 2.0, 3]), TypeError, r"seeds\[1\] must be an int, got float"),
    "seed-bool": (lambda a: a.update(seeds=[1, 2, True]), TypeError, r"seeds\[2\] must be an int, got bool"),
    "seed-negative": (
        lambda a: a.update(seeds=[-1, 2, 3]),
        ValueError,
        r"seeds\[0\] must be in \[0, 2\*\*64\), got -1",
    ),
    "seed-2**64": (
        lambda a: a.update(seeds=[1, 2**64, 3]),
        ValueError,
        r"seeds\[1\] must be in \[0, 2\*\*64\), got 18446744073709551616",
    ),
    "seeds-float-tensor": (
        lambda a: a.update(seeds=torch.tensor([1.0, 2.0, 3.0])),
        TypeError,
        r"seeds must be a sequence of ints \(or a 1-d integer tensor\), got a torch.float32 tensor",
    ),
    "seeds-string": (
        lambda a: a.update(seeds="abc"),
        TypeError,
        r"seeds must be a sequence of ints.*got str",
    ),
    "seeds-one-int": (lambda a: a.update(seeds=3), TypeError, r"seeds must be a sequence of ints.*got int"),
    "params-expanded-over-chains": (
        _shared_params,
        ValueError,
        r"params\[0\] has elements that share memory .*strides \(0, 1\)",
    ),
    "params-rows-overlapping": (_overlapping_rows, ValueError, r"params\[0\] has elements that share memory"),
    "grads-are-params": (
        lambda a: a["grads"].__setitem__(0, a["params"][0]),
        ValueError,
        r"grads\[0\] shares memory with params\[0\]",
    ),
    "grads-a-view-of-other-params": (
        lambda a: a["grads"].__setitem__(1, a["params"][0][:, 2]),
        ValueError,
        r"grads\[1\] shares memory with params\[0\]",
    ),
    "anchors-a-row-of-params": (
        lambda a: a["anchors"].__setitem__(0, a["params"][0][1]),
        ValueError,
        r"anchors\[0\] shares memory with params\[0\]",
    ),
    "masks-a-row-of-params": (
        lambda a: a.update(masks=[a["params"][0][2], None]),
        ValueError,
        r"masks\[0\] shares memory with params\[0\]",
    ),
    "params-listed-twice": (
        lambda a: a.update(
            params=[a["params"][0], a["params"][0][:, 1]],
            grads=[a["grads"][0], torch.randn(3)],
        ),
        ValueError,
        r"params\[0\] and params\[1\] share memory",
    ),
    "params-int": (
        lambda a: a.update(params=[torch.zeros(3, 4, dtype=torch.int32), a["params"][1]]),
        TypeError,
        r"params\[0\] has dtype torch.int32",
    ),
    "grads-not-tensor": (
        lambda a: a["grads"].__setitem__(1, [0.0, 0.0, 0.0]),
        TypeError,
        r"grads\[1\] must be a tensor, got list",
    ),
    "lengths": (
        lambda a: a["anchors"].pop(),
        ValueError,
        r"params, grads and anchors must have the same length, got 2, 2, 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_naming_the_argument_and_nothing_is_written(case):
    mutate, exc, match = BAD[case]
    args = _valid()
    base = mutate(args)
    watched = [t for t in args["params"] if isinstance(t, torch.Tensor)]
    watched += [base] if isinstance(base, torch.Tensor) else []
    before = [t.clone() for t in watched]
    with pytest.raises(exc, match=match):
        sgld_chains_step_(
            args["params"],
            args["grads"],
            args["anchors"],
            masks=args["masks"],
            seeds=args["seeds"],
            **HYPER,
            step=0,
        )
    for t, old in zip(watched, before):
        assert torch.equal(t, old), "a refused call wrote to the params"


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(step=2**64), ValueError, r"step must be in \[0, 2\*\*64\)"),
        (dict(step=-1), ValueError, r"step must be in \[0, 2\*\*64\)"),
        (dict(step_size=0.0), ValueError, r"step_size must be > 0"),
        (dict(bounding_box=float("nan")), ValueError, r"bounding_box must be finite"),
        (dict(nbeta=True), TypeError, r"nbeta must be a real number, got True"),
    ],
)
def test_bad_numbers_are_refused_by_name(kw, exc, match):
    args = _valid()
    with pytest.raises(exc, match=match):
        sgld_chains_step_(
            args["params"], args["grads"], args["anchors"], seeds=args["seeds"], **{**HYPER, "step": 0, **kw}
        )


@pytest.mark.parametrize("which", ["anchors", "masks"])
def test_non_finite_shared_tensors_are_refused_counting_their_own_entries(which):
    """A NaN in an anchor or a mask is named with the count of its own entries, as the per-chain step names it
    (the shared tensor is one tensor, however many chains read it)."""
    args = _valid()
    bad = torch.tensor([0.0, float("nan"), 1.0, 1.0])
    kw = dict(HYPER, step=0)
    if which == "anchors":
        args["anchors"][0] = bad
    else:
        args["masks"] = [bad, None]
    with pytest.raises(ValueError, match=rf"{which}\[0\] holds 1 NaN or Inf entries") as one:
        sgld_step_(
            [p[0] for p in args["params"]],
            [g[0] for g in args["grads"]],
            args["anchors"],
            masks=args["masks"],
            seed=1,
            **kw,
        )
    with pytest.raises(ValueError, match=rf"{which}\[0\] holds") as stacked:
        sgld_chains_step_(
            args["params"], args["grads"], args["anchors"], masks=args["masks"], seeds=args["seeds"], **kw
        )
    assert str(stacked.value) == str(one.value)


def test_an_integer_seeds_tensor_is_its_list():
    args = _valid()
    seeds = [2**63 - 1, 0, 17]
    kw = dict(HYPER, noise_scale=1.0, step=STEP)
    by_list = [p.clone() for p in args["params"]]
    by_tensor = [p.clone() for p in args["params"]]
    sgld_chains_step_(by_list, args["grads"], args["anchors"], seeds=seeds, **kw)
    sgld_chains_step_(by_tensor, args["grads"], args["anchors"], seeds=torch.tensor(seeds), **kw)
    for x, y in zip(by_list, by_tensor):
        assert_same_bits(x, y)
    with pytest.raises(TypeError, match=r"seeds must be a sequence of ints"):
        sgld_chains_step_(by_list, args["grads"], args["anchors"], seeds=torch.tensor([[1, 2, 3]]), **kw)


# ------------------------------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("backend, device", CASES)
def test_autograd_learns_of_the_in_place_step(backend, device):
    kw = dict(HYPER, seeds=[1, 2], step=0, backend=backend)
    w = torch.randn(2, 3, device=device, requires_grad=True)
    b = torch.randn(2, device=device, requires_grad=True)
    y = (w * w).sum() + (b * b).sum()
    anchors = [w[0].detach().clone(), b[0].detach().clone()]
    with torch.no_grad():
        versions = w._version, b._version
        before = w.detach().clone()
        sgld_chains_step_([w, b], [torch.ones_like(w), torch.ones_like(b)], anchors, **kw)
    assert w._version > versions[0] and b._version > versions[1]
    assert bool((w.detach() != before).all())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad and grad mode is on"):
        sgld_chains_step_([w, b], [torch.ones_like(w), torch.ones_like(b)], anchors, **kw)


# ------------------------------------------------------------------------------- the batched runner's step


def _runner_case(device, masked: bool, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    C, shapes = 6, {"w": (5, 3), "b": (37,), "s": ()}
    stacked = {n: torch.randn((C, *s), generator=gen).to(device) for n, s in shapes.items()}
    grads = {n: torch.randn((C, *s), generator=gen).to(device) for n, s in shapes.items()}
    anchors = [(s[0] + 0.05 * torch.randn(s[0].shape, generator=gen).to(device)) for s in stacked.values()]
    masks = None
    if masked:
        masks = [
            (torch.rand(5, 3, generator=gen) > 0.4).to(device),
            ((torch.rand(37, generator=gen) * 2).round() / 2).to(device),
            None,
        ]
    return stacked, grads, anchors, masks


@pytest.mark.parametrize("backend, device", RUNNER)
@pytest.mark.parametrize("masked", [False, True], ids=["nomasks", "masks"])
@pytest.mark.parametrize(
    "coupling, bounding_box, noise_scale",
    [(1, None, 1.0), (1, 0.1, 1.0), (3, None, 1.0), (3, None, 0.0)],
    ids=["m1", "m1-box", "m3", "m3-nonoise"],
)
def test_step_chains_is_each_chains_unchecked_step(
    backend, device, masked, coupling, bounding_box, noise_scale
):
    """Chains lo .. hi - 1 of the batched runner stepped by one call are those chains stepped one at a time by
    :meth:`StackedSamplerState.step` (the unchecked path), bit for bit; the rows outside lo .. hi do not move."""
    stacked, grads, anchors, masks = _runner_case(device, masked)
    names = list(stacked)
    C, lo, hi, step = 6, 1, 5, 2**32 + 9
    seeds = [3, 2**64 - 1, 0, 17, 2**63 + 1, 9]
    hyper = dict(HYPER, noise_scale=noise_scale, bounding_box=bounding_box)
    state = StackedSamplerState(
        "sgld",
        stacked,
        [names] * C,
        seeds,
        [None] * C,
        hyper=hyper,
        own={},
        backend=backend,
        noise_coupling=coupling,
    )
    together = {n: s.clone() for n, s in stacked.items()}
    alone = {n: s.clone() for n, s in stacked.items()}
    flags = state.step_chains(
        lo,
        hi,
        [together[n][lo:hi] for n in names],
        [grads[n][lo:hi] for n in names],
        anchors,
        masks=masks,
        step=step,
    )
    assert tuple(flags.shape) == (hi - lo,) and not bool(flags.any())
    for i in range(lo, hi):
        f = state.step(
            i,
            [alone[n][i] for n in names],
            [grads[n][i] for n in names],
            anchors,
            masks=masks,
            seed=seeds[i],
            step=step,
            validate=False,
        )
        assert not bool(f.any())
    for n in names:
        assert_same_bits(together[n], alone[n], n)
        assert_same_bits(together[n][:lo], stacked[n][:lo], n)
        assert_same_bits(together[n][hi:], stacked[n][hi:], n)
        assert bool((together[n][lo:hi] != stacked[n][lo:hi]).any()), f"{n} did not move"


@pytest.mark.parametrize("backend, device", RUNNER)
def test_step_chains_flags_the_chain_with_a_non_finite_gradient(backend, device):
    stacked, grads, anchors, masks = _runner_case(device, masked=False)
    names = list(stacked)
    grads["b"][3, 10] = float("nan")
    state = StackedSamplerState(
        "sgld",
        stacked,
        [names] * 6,
        list(range(6)),
        [None] * 6,
        hyper=dict(HYPER, noise_scale=1.0, bounding_box=None),
        own={},
        backend=backend,
    )
    before = stacked["b"][3, 10].clone()
    flags = state.step_chains(
        2, 6, [stacked[n][2:6] for n in names], [grads[n][2:6] for n in names], anchors, masks=None, step=1
    )
    assert flags.cpu().tolist() == [0, FLAG_GRAD_NONFINITE, 0, 0]
    assert_same_bits(stacked["b"][3, 10], before)


def test_a_chains_flags_are_or_ed_over_its_tensors():
    """Bit 1 on one tensor and bit 2 on another make 3 (a maximum would give 2 and hide the non-finite gradient)."""
    from pypattern.sampling.samplers import or_flags

    f = torch.tensor([[1, 2, 0], [0, 0, 0], [2, 2, 0], [0, 1, 1]], dtype=torch.int32)
    assert or_flags(f).tolist() == [3, 0, 2, 1]
    assert or_flags(torch.zeros((3, 0), dtype=torch.int32)).tolist() == [0, 0, 0]

"""Exact activation patching and AtP against TransformerLens 4.3.0 (bench-only peer, in .bench-venvs/tl).

Setup: a random-weight TransformerBridge.boot_native model (n_layers=4, d_model=256, n_heads=8,
d_head=32, d_mlp=1024, d_vocab=1000, n_ctx=64, gelu), batch 8 x 32 tokens, logit-difference metric. The same
weights are converted into pypattern's Transformer; both grids must agree (1e-4 in float32).

Bound: the multiply-adds that a patch can actually change (layers >= L, positions >= p; in the last block
only the keys/values of the changed rows and the metric row's query, attention, MLP and unembedding) against
what TransformerLens computes per cell (a full forward with logits at every position). ``macs_per_cell`` and
``macs_full_forward`` count them; the ratio of the grid sums is the speed-up that the arithmetic allows
(5.5x for the resid_pre grid, 8.7x for the per-head z grid; a rougher count, which keeps every row of
the last block, gives about 3.4x). Measured speed-ups above the bound mean TransformerLens also loses time
outside its arithmetic (hooks, Python per cell).

Run: ``bash bench/envs/tl.sh`` once, then
``.bench-venvs/tl/bin/python -m pytest -q bench/bench_patching.py --benchmark-only -s``. Without
TransformerLens only the pypattern benchmarks run (the comparisons are skipped). One thread throughout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import time

import pytest
import torch

from pypattern.models import Transformer, TransformerConfig
from pypattern.patching import LogitDiff, activation_patching
from pypattern.patching.attribution import attribution_patching

HAS_TL = importlib.util.find_spec("transformer_lens") is not None
CFG = dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=1000, n_ctx=64)
B, T = 8, 32
REPORT: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if REPORT:
        print(
            "\n[bench_patching] bound_<site>, <site>_bound: the speed-up over TransformerLens' per-cell full "
            "forwards that the multiply-adds allow (x); *_s: wall seconds per grid; <site>_speedup: TransformerLens' "
            "time / ours; <site>_of_bound: the bound / the speed-up; *_maxerr_*: largest difference of the grids"
        )
        print("[bench_patching] " + "; ".join(f"{k}={v}" for k, v in REPORT.items()))


# ----- the bound ---------------------------------------------------------------------------------------------
def _row_macs(c, keys):
    """Multiply-adds of one full block row with ``keys`` attended keys."""
    H, dh, d, dm = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"]
    return 4 * d * H * dh + 2 * keys * H * dh + 2 * d * dm


def macs_full_forward(c, T):
    """TransformerLens per cell: every row of every layer plus logits at every position."""
    return sum(c["n_layers"] * _row_macs(c, t + 1) for t in range(T)) + T * c["d_model"] * c["d_vocab"]


def macs_per_cell(c, site, layer, p, T):
    """Multiply-adds that can change when ``site`` is patched at (layer, p), metric at position T - 1."""
    H, dh, d, dm, L, V = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"], c["n_layers"], c["d_vocab"]
    m = T - 1
    rows = range(p, T)
    total = 0
    last = layer == L - 1
    # the patched layer
    if site == "resid_pre":
        total += 3 * d * H * dh  # q, k, v of row p
        out_rows = [m] if last else rows
        for t in out_rows:
            total += 2 * (t + 1) * H * dh + d * H * dh + 2 * d * dm  # scores, z, W_O, MLP
    elif site == "z":  # one head's z at row p: W_O slice, MLP at row p
        if last and p != m:
            return d * V
        total += dh * d + 2 * d * dm
    # later layers: rows >= p; the last layer only the metric's row (plus keys/values of the changed rows)
    for lay in range(layer + 1, L):
        if lay == L - 1:
            total += 2 * d * H * dh * len(rows) + _row_macs(c, m + 1) - 2 * d * H * dh
        else:
            total += sum(_row_macs(c, t + 1) for t in rows)
    return total + d * V  # the metric's logits


def bound(site):
    c = CFG
    heads = c["n_heads"] if site == "z" else 1
    tl = c["n_layers"] * T * heads * macs_full_forward(c, T)
    ours = heads * sum(
        macs_per_cell(c, site, layer, p, T) for layer in range(c["n_layers"]) for p in range(T)
    )
    return tl / ours


# ----- models ------------------------------------------------------------------------------------------------
def _prompts(d_vocab=None, b=None, t=None):
    """Clean prompts ``(b, t)``, corrupted at positions 5 and 20, and the answer / wrong tokens of each example
    (defaults: the small bench model's vocabulary and batch)."""
    d_vocab, b, t = d_vocab or CFG["d_vocab"], b or B, t or T
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (b, t), generator=g)
    corr = clean.clone()
    corr[:, 5] = (clean[:, 5] + 1) % d_vocab
    corr[:, 20] = (clean[:, 20] + 7) % d_vocab
    ans = torch.randint(0, d_vocab, (b,), generator=g)
    wrong = torch.randint(0, d_vocab, (b,), generator=g)
    return clean, corr, ans, wrong


def scale_bounds(c: dict, b: int, t: int, with_runs: bool = True) -> dict:
    """Multiply-adds each GPT-2-small-shaped grid must do on a batch of ``b`` x ``t`` (see
    ``test_scale_gpt2_small_cpu_time``): the exact grids' cells after causal reuse plus (``with_runs``) the two runs
    every exact grid needs, AtP's three forwards, AtP*'s plus its GradDrop backwards."""
    L, H = c["n_layers"], c["n_heads"]
    k = METRIC_COLS
    runs = 2 * b * _forward_macs(c, t, cols=k) if with_runs else 0
    rows = [(l_, p) for l_ in range(L) for p in range(t)]
    fwd = b * _forward_macs(c, t, cols=k)
    return {
        "resid_pre": b * sum(scale_macs(c, "resid_pre", l_, p, t, cols=k) for l_, p in rows) + runs,
        "attn_out": b * sum(scale_macs(c, "attn_out", l_, p, t, cols=k) for l_, p in rows) + runs,
        "z_all_pos": b * H * sum(scale_macs(c, "z", l_, 0, t, all_pos=True, cols=k) for l_ in range(L))
        + runs,
        "atp": 3 * fwd,
        "atp*": 3 * fwd + b * _graddrop_macs(c, t),
    }


def _tl_model(dtype=torch.float32):
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**CFG, act_fn="gelu", seed=0)
    bridge = TransformerBridge.boot_native(cfg, dtype=dtype)
    bridge.eval()
    return bridge


def _native(bridge):
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    nat = bridge.original_model
    if not isinstance(nat, NativeModel):
        raise TypeError(f"expected a NativeModel under the bridge, found {type(nat).__name__}")
    return nat


def convert_tl_native(bridge, dtype=torch.float32) -> Transformer:
    """TransformerLens' native model (split q/k/v/o ``nn.Linear``) -> pypattern's TL-layout weights."""
    nat = _native(bridge)
    c = CFG
    H, dh, d = c["n_heads"], c["d_head"], c["d_model"]
    model = Transformer(TransformerConfig(**c, act_fn="gelu", dtype=dtype, ln_eps=nat.cfg.eps))
    sd = {"embed.W_E": nat.tok_embed.weight, "pos_embed.W_pos": nat.pos.weight}
    for i, blk in enumerate(nat.layers):
        p = f"blocks.{i}."
        a = blk.attn
        for name, lin in (("Q", a.q), ("K", a.k), ("V", a.v)):
            sd[p + f"attn.W_{name}"] = lin.weight.view(H, dh, d).transpose(1, 2)
            sd[p + f"attn.b_{name}"] = lin.bias.view(H, dh)
        sd[p + "attn.W_O"] = a.o.weight.T.reshape(H, dh, d)
        sd[p + "attn.b_O"] = a.o.bias
        sd[p + "ln1.w"], sd[p + "ln1.b"] = blk.ln1.weight, blk.ln1.bias
        sd[p + "ln2.w"], sd[p + "ln2.b"] = blk.ln2.weight, blk.ln2.bias
        sd[p + "mlp.W_in"], sd[p + "mlp.b_in"] = blk.mlp.fc_in.weight.T, blk.mlp.fc_in.bias
        sd[p + "mlp.W_out"], sd[p + "mlp.b_out"] = blk.mlp.fc_out.weight.T, blk.mlp.fc_out.bias
    sd["ln_final.w"], sd["ln_final.b"] = nat.ln_out.weight, nat.ln_out.bias
    sd["unembed.W_U"] = nat.head.weight.T
    sd["unembed.b_U"] = torch.zeros(c["d_vocab"])
    model.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in sd.items()})
    return model


def _tl_grid(bridge, site, clean, corr, ans, wrong):
    import transformer_lens.patching as P

    _, clean_cache = bridge.run_with_cache(clean)

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, ans[:, None]) - last.gather(-1, wrong[:, None])).mean()

    fn = P.get_act_patch_resid_pre if site == "resid_pre" else P.get_act_patch_attn_head_out_by_pos
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # silence the per-cell progress bar
        return fn(bridge, corr, clean_cache, metric)


def _ours(model, site, clean, corr, ans, wrong):
    r = activation_patching(model, site, clean, corr, metric=LogitDiff(ans, wrong))
    return r.values.mean(0)  # (layer, pos) or (layer, head, pos)


def _ours_random(dtype=torch.float32):
    return Transformer(TransformerConfig(**CFG, act_fn="gelu", dtype=dtype, seed=0))


# ----- benchmarks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_bench_exact_grid_pypattern(benchmark, site):
    model = _ours_random()
    clean, corr, ans, wrong = _prompts()
    benchmark.group = f"exact patching grid {site}, batch {B}x{T}"
    benchmark.extra_info.update(role="ours", label="pypattern")
    benchmark.pedantic(
        _ours, args=(model, site, clean, corr, ans, wrong), rounds=3, iterations=1, warmup_rounds=1
    )
    REPORT[f"bound_{site}"] = round(bound(site), 2)


def test_bench_atp_whole_grid(benchmark):
    model = _ours_random()
    clean, corr, ans, wrong = _prompts()
    benchmark.group = f"AtP over resid_pre and z, batch {B}x{T}"
    benchmark.extra_info.update(role="ours", label="pypattern")
    benchmark.pedantic(
        lambda: attribution_patching(
            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["resid_pre", "z"]
        ),
        rounds=5,
        iterations=1,
        warmup_rounds=1,
    )


@pytest.mark.skipif(not HAS_TL, reason="transformer_lens is not installed (run bash bench/envs/tl.sh)")
@pytest.mark.parametrize("site", ["resid_pre", "z"])
def test_bench_exact_grid_transformerlens(benchmark, site):
    bridge = _tl_model()
    clean, corr, ans, wrong = _prompts()
    benchmark.group = f"exact patching grid {site}, batch {B}x{T}"
    benchmark.extra_info.update(role="peer", label="TransformerLens")
    benchmark.pedantic(_tl_grid, args=(bridge, site, clean, corr, ans, wrong), rounds=1, iterations=1)


@pytest.mark.skipif(not HAS_TL, reason="transformer_lens is not installed (run bash bench/envs/tl.sh)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_equal_to_transformerlens_and_speedup(dtype, tol):
    """Same weights, same grids (within tol), and the measured speed-ups against the bound."""
    bridge = _tl_model(dtype)
    model = convert_tl_native(bridge, dtype)
    clean, corr, ans, wrong = _prompts()
    with torch.no_grad():
        torch.testing.assert_close(model(clean), bridge(clean).to(dtype), rtol=0, atol=tol * 10)
    for site in ("resid_pre", "z"):
        t0 = time.perf_counter()
        ref = _tl_grid(bridge, site, clean, corr, ans, wrong)
        t_tl = time.perf_counter() - t0
        t_ours = min(_timed(_ours, model, site, clean, corr, ans, wrong) for _ in range(3))
        ours = _ours(model, site, clean, corr, ans, wrong)
        if site == "z":
            ours = ours.permute(0, 2, 1)  # TL: (layer, pos, head)
        err = (ours.to(torch.float64) - ref.to(torch.float64)).abs().max().item()
        assert err <= tol, f"{site}: pypattern and TransformerLens differ by {err}"
        if dtype == torch.float32:
            REPORT[f"{site}_tl_s"] = round(t_tl, 3)
            REPORT[f"{site}_ours_s"] = round(t_ours, 3)
            REPORT[f"{site}_speedup"] = round(t_tl / t_ours, 2)
            REPORT[f"{site}_bound"] = round(bound(site), 2)
            REPORT[f"{site}_of_bound"] = round(bound(site) / (t_tl / t_ours), 2)
            if site == "z":
                t_atp = min(
                    _timed(
                        lambda: attribution_patching(
                            model, clean, corr, metric=LogitDiff(ans, wrong), sites=["z"]
                        )
                    )
                    for _ in range(5)
                )
                REPORT["atp_z_s"] = round(t_atp, 4)
                REPORT["atp_vs_tl_exact_z"] = round(t_tl / t_atp, 1)
        REPORT[f"{site}_maxerr_{str(dtype).split('.')[-1]}"] = f"{err:.1e}"


def _timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ----- at scale: a GPT-2-small-shaped model converted from its Hugging Face form --------------------------------
SCALE = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257)
SCALE_B, SCALE_T, SCALE_THREADS, SCALE_ROUNDS = 8, 32, 2, 2
#: the grids of :func:`test_scale_gpt2_small_cpu_time`, the names ``PYPATTERN_BENCH_GRIDS`` chooses from
SCALE_GRIDS = ("resid_pre", "attn_out", "z_all_pos", "atp", "atp*")
RUN_SCALE = bool(__import__("os").environ.get("PYPATTERN_BENCH_SCALE"))
HAS_HF = importlib.util.find_spec("transformers") is not None


def _row(c, keys):
    """Multiply-adds of one full block row attending to ``keys`` keys (q, k, v, o, attention, MLP)."""
    H, dh, d, dm = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"]
    return 4 * d * H * dh + 2 * keys * H * dh + 2 * d * dm


def _later(c, layer, p, m):
    """Layers after ``layer`` at rows p..m (the last layer: keys/values of those rows, the metric row in full)."""
    H, dh, d, L = c["n_heads"], c["d_head"], c["d_model"], c["n_layers"]
    total = 0
    for lay in range(layer + 1, L):
        if lay == L - 1:
            total += 2 * d * H * dh * (m - p + 1) + _row(c, m + 1) - 2 * d * H * dh
        else:
            total += sum(_row(c, t + 1) for t in range(p, m + 1))
    return total


#: unembedding columns the grids' metric reads: a logit difference needs the answer's and the wrong token's (the
#: exact engine and AtP compute only those, forward and backward)
METRIC_COLS = 2


def scale_macs(c, site, layer, p, T, all_pos=False, cols=None):
    """Minimum multiply-adds of one cell, per example (see the section's docstring); the metric row's unembedding
    counts ``cols`` columns (default: the whole vocabulary)."""
    H, dh, d, dm, L = c["n_heads"], c["d_head"], c["d_model"], c["d_mlp"], c["n_layers"]
    V = c["d_vocab"] if cols is None else cols
    m = T - 1
    last = layer == L - 1
    p0 = 0 if all_pos else p
    out_rows = [m] if last else list(range(p0, m + 1))
    if site == "resid_pre":
        total = 3 * d * H * dh + sum(2 * (t + 1) * H * dh + d * H * dh + 2 * d * dm for t in out_rows)
    elif site == "attn_out":
        total = 2 * d * dm if (p == m or not last) else 0
    elif site == "z" and all_pos:
        total = sum(dh * d + 2 * d * dm for _ in out_rows)
    else:
        raise ValueError(site)
    if last and site != "resid_pre" and not all_pos and p != m:
        return d * V  # the metric row does not read the patched row
    return total + _later(c, layer, p0, m) + d * V


def _forward_macs(c, T, cols=None):
    """A forward at every row, with the metric row's unembedding over ``cols`` columns (default all)."""
    return c["n_layers"] * sum(_row(c, t + 1) for t in range(T)) + c["d_model"] * (cols or c["d_vocab"])


def _graddrop_macs(c, T):
    """GradDrop's backwards, per example: the pass that drops layer l's outputs changes no gradient after layer
    l and none flows into layer l's attention or MLP, so it is a backward through layers 0 .. l - 1 (an activation
    gradient through a block costs about the block's forward multiply-adds): ``sum_l l`` blocks at every row."""
    L = c["n_layers"]
    return sum(range(L)) * sum(_row(c, t + 1) for t in range(T))


class _PeakRSS:
    """Peak resident set of this process while the block runs (sampled every 2 ms from /proc/self/statm)."""

    def __enter__(self):
        import threading

        self.page = __import__("os").sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _gemm_products(a: torch.Tensor, b: torch.Tensor) -> list:
    """The ways this CPU can compute ``a @ b``: ``torch.matmul`` (the BLAS ``sgemm``) and, where this torch has it,
    oneDNN's matmul against ``b`` packed once (what pypattern's grids use inside ``fixed_weights`` where it is
    faster). A bound is taken at the faster of the two, so a grid is never charged less than the CPU's best GEMM
    rate."""
    from pypattern.models.packed import _ops_present

    ways = [lambda: a @ b]
    if _ops_present():
        ops = torch.ops.mkldnn
        packed = ops._reorder_linear_weight(b.t().contiguous())
        ways.append(lambda: ops._linear_pointwise(a, packed, None, "none", [], ""))
    return ways


def _gemm_rate():
    a, b = torch.randn(SCALE_B * SCALE_T, 768), torch.randn(768, 3072)
    best = float("inf")
    for f in _gemm_products(a, b):
        for _ in range(3):
            f()
        best = min(best, min(_timed(f) for _ in range(20)))
    return a.shape[0] * 768 * 3072 / best


def _scale_models():
    import transformers

    from pypattern import from_hf

    cfg = transformers.GPT2Config(
        n_layer=SCALE["n_layers"],
        n_embd=SCALE["d_model"],
        n_head=SCALE["n_heads"],
        vocab_size=SCALE["d_vocab"],
        n_positions=1024,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ours = from_hf(hf)
    return hf, ours


def _tl_bridge(hf, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SCALE["d_vocab"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", unk_token="t0")
    fast.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer)
    bridge.eval()
    return bridge


def _tl_cases(L, H):
    """The cells TransformerLens is timed on per grid (extrapolated per cell) and compared with ours:
    ``{grid: (activation, (index kind, setter), cells)}``."""
    import transformer_lens.patching as P

    lay, pos, hs = [0, L // 2, L - 1], [5, 20], [0, H - 1]
    return {
        "resid_pre": ("resid_pre", (2, P.layer_pos_patch_setter), [(a, b) for a in lay for b in pos]),
        "attn_out": ("attn_out", (2, P.layer_pos_patch_setter), [(a, b) for a in lay for b in pos]),
        "z_all_pos": ("z", ("z_all", P.layer_head_vector_patch_setter), [(a, h) for a in lay for h in hs]),
        "z_by_pos": (
            "z",
            (3, P.layer_pos_head_vector_patch_setter),
            [(a, b, h) for a in [0, L - 1] for b in pos for h in hs],
        ),
    }


def _tl_cells(bridge, clean, corr, ans, wrong, act, setter, cells, clock=time.perf_counter):
    """TransformerLens' exact patching of ``cells``: values and seconds of ``clock`` per cell."""
    import pandas as pd
    import transformer_lens.patching as P

    _, cache = bridge.run_with_cache(clean)

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(-1, ans[:, None]) - last.gather(-1, wrong[:, None])).mean()

    cols = {2: ["layer", "pos"], "z_all": ["layer", "head_index"], 3: ["layer", "pos", "head_index"]}
    df = pd.DataFrame(cells, columns=cols[setter[0]])
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        t = clock()
        vals = P.generic_activation_patch(bridge, corr, cache, metric, setter[1], act, index_df=df)
        return vals, (clock() - t) / len(cells)


@pytest.mark.skipif(not RUN_SCALE, reason="set PYPATTERN_BENCH_SCALE=1 to run the GPT-2-small-sized bench")
@pytest.mark.skipif(
    not (HAS_TL and HAS_HF), reason="needs transformers and transformer_lens (bench/envs/tl.sh)"
)
def test_scale_gpt2_small(tmp_path):
    """GPT-2 small's shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50257), random weights, float32,
    batch 8 x 32 tokens, two threads: built as a Hugging Face ``GPT2LMHeadModel`` from a config, converted with
    ``pypattern.from_hf``, and wrapped (the same weights) by TransformerLens 4.3.0's ``TransformerBridge``.

    Multiply-add bound (``scale_macs``): what must be computed at minimum given causal reuse, per example. A cell at
    (layer L, position p) must recompute layers > L at rows p..m (m the metric position; in the last layer only the
    keys/values of rows p..m and the metric row's query, attention, output and MLP), plus at layer L what the site
    feeds: ``resid_pre`` row p's q/k/v and the attention, W_O and MLP of rows p..m (rows > p keep their q/k/v);
    ``attn_out`` the MLP of row p; a head's ``z`` over all positions its W_O slice and the MLP at every row (rows
    from 0); then the metric row's unembedding, over the columns the metric reads (:data:`METRIC_COLS`: the logit
    difference's two, all the exact engine computes). Norms, activations and softmax are not multiply-adds and are not
    counted. A grid's bound in seconds is its multiply-adds over the rate of one large float32 matmul measured in the
    same run on the same threads (``(256, 768) @ (768, 3072)``), so "x of bound" is time / (MACs / GEMM rate).
    AtP: two forwards of the blocks (every row) and one backward for activation gradients only (about one forward's
    multiply-adds), each with the metric row's unembedding: about 3 forwards. AtP* adds GradDrop's backward per
    layer l, which has to run through layers 0 .. l - 1 only (:func:`_graddrop_macs`; the QK fix's score
    recomputation is small and not counted).

    TransformerLens runs one full forward of the batch per cell whatever the cell, so its per-cell time is measured
    on a subset of cells (the same cells are compared with ours for equality) and extrapolated to the full grid:
    stated as such in the report. Peak memory: the process's resident set sampled every 2 ms during each run (and
    its increase over the resident set before the run).

    Run once (minutes): ``PYPATTERN_BENCH_SCALE=1 .bench-venvs/tl/bin/python -m pytest -q -s
    bench/bench_patching.py -k scale``.
    """
    import datetime
    import platform

    import transformer_lens.patching as P

    n0 = torch.get_num_threads()
    torch.set_num_threads(SCALE_THREADS)
    try:
        hf, ours = _scale_models()
        bridge = _tl_bridge(hf, tmp_path)
        c, B, T, L, H = SCALE, SCALE_B, SCALE_T, SCALE["n_layers"], SCALE["n_heads"]
        clean, corr, ans, wrong = _prompts(c["d_vocab"], B, T)
        met = lambda: LogitDiff(ans, wrong)
        with torch.no_grad():
            d_logits = (ours(clean) - bridge(clean)).abs().max().item()
        rate = _gemm_rate()
        _log(f"GEMM rate {rate / 1e9:.1f} GMAC/s, logits max |diff| {d_logits:.1e}")
        # warm-up (first calls pay for lazy initialisation): one small grid each
        activation_patching(ours, "resid_pre", clean, corr, metric=met(), layers=[L - 1], positions=[T - 1])
        _tl_cells(
            bridge, clean, corr, ans, wrong, "resid_pre", (2, P.layer_pos_patch_setter), [(L - 1, T - 1)]
        )
        grids = {
            "resid_pre": dict(site="resid_pre"),
            "attn_out": dict(site="attn_out"),
            "z_all_pos": dict(site="z", per_position=False),
        }
        macs = scale_bounds(c, B, T, with_runs=False)
        n_cells = {"resid_pre": L * T, "attn_out": L * T, "z_all_pos": L * H, "z_by_pos": L * H * T}
        # the same cells for TransformerLens (timed, extrapolated per cell) and for equality with ours
        tl_cases = _tl_cases(L, H)
        z_cells = tl_cases["z_by_pos"][2]  # (layer, position, head): ours at the same positions and heads
        pos, hs = sorted({b for _, b, _ in z_cells}), sorted({h for *_, h in z_cells})
        times = {k: [] for k in [*grids, "atp", "atp*"]}
        tl_cell = {k: [] for k in tl_cases}
        mem, errs, batch = {}, {}, {}
        for _ in range(SCALE_ROUNDS):  # interleaved: ours, TransformerLens, ours, ...
            for name, kw in grids.items():
                with _PeakRSS() as pk:
                    t = time.perf_counter()
                    r = activation_patching(
                        ours, clean_tokens=clean, corrupted_tokens=corr, metric=met(), **kw
                    )
                    times[name].append(time.perf_counter() - t)
                mem[name] = (pk.peak, pk.peak - pk.start)
                batch[name] = r.info.get("max_batch")
                _log(f"{name} ours {times[name][-1]:.2f} s, peak RSS {pk.peak / 2**30:.2f} GiB")
                act, setter, cells = tl_cases[name]
                ref, per_cell = _tl_cells(bridge, clean, corr, ans, wrong, act, setter, cells)
                tl_cell[name].append(per_cell)
                _log(f"{name} TransformerLens {per_cell:.3f} s per cell")
                mine = torch.stack([r.values.mean(0)[cell] for cell in cells])
                errs[name] = (mine.double() - ref.double()).abs().max().item()
            for name, kw in (("atp", {}), ("atp*", dict(qk_fix=True, grad_drop=True))):
                sites = ["z"] if name == "atp" else ["z", "q", "k", "v"]
                with _PeakRSS() as pk:
                    t = time.perf_counter()
                    attribution_patching(ours, clean, corr, metric=met(), sites=sites, **kw)
                    times[name].append(time.perf_counter() - t)
                mem[name] = (pk.peak, pk.peak - pk.start)
                _log(f"{name} ours {times[name][-1]:.2f} s, peak RSS {pk.peak / 2**30:.2f} GiB")
            act, setter, cells = tl_cases["z_by_pos"]
            ref, per_cell = _tl_cells(bridge, clean, corr, ans, wrong, act, setter, cells)
            tl_cell["z_by_pos"].append(per_cell)
            _log(f"z_by_pos TransformerLens {per_cell:.3f} s per cell")
            sub = activation_patching(
                ours, "z", clean, corr, metric=met(), layers=[0, L - 1], heads=hs, positions=pos
            ).values.mean(0)  # (layer, head, pos)
            mine = torch.stack([sub[[0, L - 1].index(a), hs.index(h), pos.index(b)] for a, b, h in cells])
            errs["z_by_pos"] = (mine.double() - ref.double()).abs().max().item()
        rng = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"
        lines = [
            f"date {datetime.date.today()}, cpu {_cpu_model()}, threads {SCALE_THREADS}, torch {torch.__version__},"
            f" python {platform.python_version()}; logits ours vs TransformerLens max |diff| {d_logits:.1e};"
            f" GEMM rate {rate / 1e9:.1f} GMAC/s",
        ]
        for name in [*grids, "atp", "atp*"]:
            t_min = min(times[name])
            bound_s = macs[name] / rate
            line = (
                f"{name}: ours {rng(times[name])} s, bound {bound_s:.2f} s ({macs[name] / 1e9:.0f} GMAC),"
                f" {t_min / bound_s:.2f}x of bound, peak RSS {mem[name][0] / 2**30:.2f} GiB"
                f" (+{mem[name][1] / 2**30:.2f} GiB)"
            )
            if name in grids:
                tl_full = [x * n_cells[name] for x in tl_cell[name]]
                line += (
                    f", engine batch {batch[name]} cells; TransformerLens {rng(tl_full)} s (extrapolated from"
                    f" {len(tl_cases[name][2])} cells x {n_cells[name]}), speed-up {min(tl_full) / t_min:.1f}x"
                    f"-{max(tl_full) / t_min:.1f}x, max |diff| {errs[name]:.1e}"
                )
            else:
                tl_full = [x * n_cells["z_by_pos"] for x in tl_cell["z_by_pos"]]
                line += (
                    f"; TransformerLens exact heads x positions grid {rng(tl_full)} s (extrapolated from"
                    f" {len(tl_cases['z_by_pos'][2])} cells x {n_cells['z_by_pos']}, max |diff| on them"
                    f" {errs['z_by_pos']:.1e}), {min(tl_full) / t_min:.0f}x faster"
                )
            lines.append(line)
        print("\n[bench_patching scale]\n" + "\n".join(lines))
        for name in errs:
            assert errs[name] <= 1e-3, f"{name}: pypattern and TransformerLens differ by {errs[name]}"
    finally:
        torch.set_num_threads(n0)


def _cpu_gemm_rate(reps: int = 10, rounds: int = 5) -> float:
    """Multiply-adds per second of CPU time (all threads) of the reference ``(256, 768) @ (768, 3072)`` matmul, by
    the faster of ``torch.matmul`` and oneDNN's packed matmul (:func:`_gemm_products`)."""
    a, b = torch.randn(256, 768), torch.randn(768, 3072)
    best = float("inf")
    for f in _gemm_products(a, b):
        for _ in range(3):
            f()
        for _ in range(rounds):
            t = time.process_time()
            for _ in range(reps):
                f()
            best = min(best, time.process_time() - t)
    return reps * 256 * 768 * 3072 / best


def _cpu_forward_rate(model, tokens: torch.Tensor, reps: int = 3) -> float:
    """Multiply-adds per second of CPU time of the plain model's forward on ``tokens`` (no gradients, every block at
    every row, no unembedding: ``return_type=None``), the fastest of ``reps`` forwards. The same arithmetic as the
    grids' (projections, attention, MLP, norms, activation, residual adds) at the plain model's efficiency: a bound
    that charges the grids' elementwise work at the model's own cost, where the GEMM rate charges nothing for it."""
    b, t = tokens.shape
    c = {k: getattr(model.cfg, k) for k in ("n_heads", "d_head", "d_model", "d_mlp", "n_layers", "d_vocab")}
    macs = b * (_forward_macs(c, t) - c["d_model"] * c["d_vocab"])
    with torch.no_grad():
        model(tokens, return_type=None)
        best = float("inf")
        for _ in range(reps):
            t0 = time.process_time()
            model(tokens, return_type=None)
            best = min(best, time.process_time() - t0)
    return macs / best


def _peak_reset() -> int:
    """Reset the process's peak resident set (``/proc/self/clear_refs``); returns the resident set now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _peak() -> int:
    """Peak resident set of the process since the last :func:`_peak_reset` (``VmHWM``), in bytes."""
    return _status_kb("VmHWM") * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _tl_cells_cpu(bridge, clean, corr, ans, wrong, act, setter, cells):
    """TransformerLens' exact patching of ``cells``: values and CPU seconds per cell (one full forward each)."""
    return _tl_cells(bridge, clean, corr, ans, wrong, act, setter, cells, clock=time.process_time)


@pytest.mark.skipif(not RUN_SCALE, reason="set PYPATTERN_BENCH_SCALE=1 to run the GPT-2-small-sized bench")
@pytest.mark.skipif(not HAS_HF, reason="needs transformers")
def test_scale_gpt2_small_cpu_time(tmp_path):
    """The GPT-2-small-shaped grids of :func:`test_scale_gpt2_small`, measured in CPU time of the process on one
    thread, against the bound in CPU time of the same multiply-adds at the rate of the reference matmul (also in
    CPU time, measured before and after each grid; the faster rate is used), and, when TransformerLens is
    installed, against TransformerLens 4.3.0 on the same weights (interleaved: each grid of ours, then
    TransformerLens on a few cells of it, in CPU time, extrapolated per cell to the whole grid).

    CPU time is what a shared machine does not distort much: wall time under other load stretches both our run
    and the bound's matmul, but not by the same factor when they are timed at different moments. The bound here
    also counts the two runs every grid needs (the source and the target run: blocks at every row, the
    unembedding of the metric row), which ``scale_macs`` leaves out.

    A second bound charges the same multiply-adds at the rate of the plain model's own forward
    (:func:`_cpu_forward_rate`, also measured before and after each grid, the faster used): the arithmetic the grid
    does besides matmuls (norms, activation, softmax, residual adds) at the cost the model pays for it in a forward.
    For AtP*'s GradDrop backwards it is an approximation (a backward is charged at the forward's rate).

    AtP and AtP* (QK fix, GradDrop) are bounded as in :func:`test_scale_gpt2_small` (3 forwards, which include
    their own clean and corrupted runs; AtP* plus :func:`_graddrop_macs`) and compared with TransformerLens' exact grid
    of every head at every position (``z``, 144 x 32 cells, extrapolated from 8 cells).

    Peak memory: the process's peak resident set while the grid runs (``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``), and its increase over the resident set before the run (the models and, with
    TransformerLens, its bridge are resident throughout). The engine's batch is the largest number of cells
    whose working-memory estimate fits ``max_memory`` (default 1 GiB; ``PYPATTERN_BENCH_MAX_MEMORY`` sets it).

    Run (minutes; with TransformerLens tens of minutes): ``PYPATTERN_BENCH_SCALE=1 OMP_NUM_THREADS=1
    .bench-venvs/tl/bin/python -m pytest -q -s bench/bench_patching.py -k cpu_time`` (or ``.venv/bin/python``
    for ours alone; ``PYPATTERN_BENCH_GRIDS=atp,atp*`` runs only the grids named, ``PYPATTERN_BENCH_ROUNDS``
    sets the rounds, default 2).
    """
    import datetime

    only = os.environ.get("PYPATTERN_BENCH_GRIDS")
    unknown = sorted(set(only.split(",")) - set(SCALE_GRIDS)) if only else []
    if unknown:
        raise pytest.UsageError(
            f"PYPATTERN_BENCH_GRIDS={only!r}: unknown {unknown}; choose from {list(SCALE_GRIDS)}"
        )
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hf, ours = _scale_models()
        bridge = _tl_bridge(hf, tmp_path) if HAS_TL else None
        c, Bs, Ts, L, H = SCALE, SCALE_B, SCALE_T, SCALE["n_layers"], SCALE["n_heads"]
        clean, corr, ans, wrong = _prompts(c["d_vocab"], Bs, Ts)
        max_memory = int(float(os.environ.get("PYPATTERN_BENCH_MAX_MEMORY", 2**30)))
        bounds = scale_bounds(c, Bs, Ts)
        grids = {
            "resid_pre": (dict(site="resid_pre"), bounds["resid_pre"]),
            "attn_out": (dict(site="attn_out"), bounds["attn_out"]),
            "z_all_pos": (dict(site="z", per_position=False), bounds["z_all_pos"]),
        }
        activation_patching(
            ours, "resid_pre", clean, corr, metric=LogitDiff(ans, wrong), layers=[L - 1], positions=[Ts - 1]
        )
        grids["atp"] = (dict(sites=["z"]), bounds["atp"])
        grids["atp*"] = (dict(sites=["z", "q", "k", "v"], qk_fix=True, grad_drop=True), bounds["atp*"])
        assert tuple(grids) == SCALE_GRIDS
        only = os.environ.get("PYPATTERN_BENCH_GRIDS")
        names = [n for n in grids if not only or n in only.split(",")]
        rounds = int(os.environ.get("PYPATTERN_BENCH_ROUNDS", 2))
        tl_cases, n_cells = {}, {"resid_pre": L * Ts, "attn_out": L * Ts, "z_all_pos": L * H}
        n_cells["z_by_pos"] = L * H * Ts
        if bridge is not None:
            tl_cases = _tl_cases(L, H)
            _tl_cells_cpu(bridge, clean, corr, ans, wrong, *tl_cases["resid_pre"][:2], [(L - 1, Ts - 1)])
        res = {
            n: dict(cpu=[], wall=[], bound=[], plain=[], mem=[], batch=None, tl=[], err=0.0)
            for n in [*names, "z_by_pos"]
        }
        for _ in range(
            rounds
        ):  # interleaved: a grid of ours, TransformerLens on cells of it, the next grid, ...
            for name in names:
                kw, macs = grids[name]
                r0, f0 = _cpu_gemm_rate(), _cpu_forward_rate(ours, clean)
                rss0 = _peak_reset()
                t, w = time.process_time(), time.perf_counter()
                if name.startswith("atp"):
                    attribution_patching(ours, clean, corr, metric=LogitDiff(ans, wrong), **kw)
                else:
                    r = activation_patching(
                        ours,
                        clean_tokens=clean,
                        corrupted_tokens=corr,
                        metric=LogitDiff(ans, wrong),
                        max_memory=max_memory,
                        **kw,
                    )
                    res[name]["batch"] = r.info.get("max_batch")
                cpu, wall = time.process_time() - t, time.perf_counter() - w
                res[name]["mem"].append((_peak(), _peak() - rss0))
                rate = max(r0, _cpu_gemm_rate())
                frate = max(f0, _cpu_forward_rate(ours, clean))
                res[name]["cpu"].append(cpu)
                res[name]["wall"].append(wall)
                res[name]["bound"].append(macs / rate)
                res[name]["plain"].append(macs / frate)
                _log(
                    f"{name}: CPU {cpu:.1f} s (wall {wall:.1f} s), bound {macs / rate:.1f} s ({macs / 1e9:.0f} GMAC),"
                    f" plain-forward bound {macs / frate:.1f} s"
                )
                tl_name = "z_by_pos" if name == "atp*" else name
                if tl_name in tl_cases:
                    act, setter, cells = tl_cases[tl_name]
                    ref, per_cell = _tl_cells_cpu(bridge, clean, corr, ans, wrong, act, setter, cells)
                    res[tl_name]["tl"].append(per_cell * n_cells[tl_name])
                    _log(f"{tl_name} TransformerLens {per_cell:.2f} CPU-s per cell")
                    if tl_name == "z_by_pos":
                        sub = activation_patching(
                            ours,
                            "z",
                            clean,
                            corr,
                            metric=LogitDiff(ans, wrong),
                            layers=[0, L - 1],
                            heads=[0, H - 1],
                            positions=[5, 20],
                        ).values.mean(0)
                        mine = torch.stack(
                            [
                                sub[[0, L - 1].index(a), [0, H - 1].index(h), [5, 20].index(b)]
                                for a, b, h in cells
                            ]
                        )
                    else:
                        mine = torch.stack([r.values.mean(0)[cell] for cell in cells])
                    err = (mine.double() - ref.double()).abs().max().item()
                    res[tl_name]["err"] = max(res[tl_name]["err"], err)
        rng = lambda xs, f="{:.1f}": f"{f.format(min(xs))}-{f.format(max(xs))}"
        lines = [
            f"date {datetime.date.today()}, cpu {_cpu_model()}, one thread, torch {torch.__version__}, {rounds} rounds,"
            f" max_memory {max_memory}"
        ]
        for name in names:
            d = res[name]
            ratio = [a / b for a, b in zip(d["cpu"], d["bound"])]
            pratio = [a / b for a, b in zip(d["cpu"], d["plain"])]
            line = (
                f"{name}: CPU {rng(d['cpu'])} s (wall {rng(d['wall'])} s), bound {rng(d['bound'])} s,"
                f" {rng(ratio, '{:.2f}')}x of bound, {rng(pratio, '{:.2f}')}x of the plain-forward bound"
                f" {rng(d['plain'])} s, peak RSS {max(m[0] for m in d['mem']) / 2**30:.2f} GiB"
                f" (+{max(m[1] for m in d['mem']) / 2**30:.2f} GiB)"
            )
            if d["batch"] is not None:
                line += f", engine batch {d['batch']} cells"
            tl_name = "z_by_pos" if name.startswith("atp") else name
            tl = res[tl_name]["tl"] if tl_name in res else []
            if tl:
                sp = [a / b for a, b in zip(tl, d["cpu"])]
                what = "exact heads x positions grid" if tl_name == "z_by_pos" else "grid"
                line += (
                    f"; TransformerLens {what} {rng(tl, '{:.0f}')} CPU-s (extrapolated from"
                    f" {len(tl_cases[tl_name][2])} cells x {n_cells[tl_name]}), ours {rng(sp)}x faster,"
                    f" max |diff| {res[tl_name]['err']:.1e}"
                )
            lines.append(line)
        print("\n[bench_patching scale, CPU time]\n" + "\n".join(lines))
        for name in res:
            assert res[name]["err"] <= 1e-3, (
                f"{name}: pypattern and TransformerLens differ by {res[name]['err']}"
            )
    finally:
        torch.set_num_threads(n0)


def _log(msg):
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"

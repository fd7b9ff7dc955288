"""Component names resolved to parameter entries, against masks built by hand from the documented layouts: heads,
shared key/value heads, MLPs, experts, embeddings and norms of pypattern Transformers (grouped-query attention,
biases, query/key norms, mixtures of experts with a shared expert, parallel blocks, tied embeddings) and of
Hugging Face models (unconverted, and converted with from_hf: the same weights either way); the union of the
default components; the entries the per-component samplers move (every other entry bit-identical); names that do
not exist refused naming them."""

import pytest
import torch

import pypattern as pp
from pypattern.models import Transformer, TransformerConfig, component_masks, list_components

transformers = pytest.importorskip("transformers")
from pypattern.models.hf_masks import hf_component_masks, hf_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 29
S = dict(num_chains=2, num_draws=3, step_size=1e-3, localization=50.0, nbeta=8.0, seed=0, quiet=True)
S_QUIET = dict(S, warn_nonstationary=False)


def _pp_model(**kw) -> Transformer:
    base = dict(
        n_layers=2, d_model=16, n_heads=4, d_head=4, d_vocab=V, n_ctx=8, d_mlp=8, dtype=torch.float64, seed=0
    )
    m = Transformer(TransformerConfig(**{**base, **kw}))
    with torch.no_grad():  # biases and norms start at 0 / 1: make every entry distinct
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


GQA_MOE = dict(
    n_key_value_heads=2, gated_mlp=True, n_experts=3, experts_per_token=2, moe_shared_d_mlp=8, mlp_bias=False,
    qk_norm=True, attn_bias=True, normalization_type="RMS", positional_embedding_type="rotary",
    tie_word_embeddings=True, unembed_bias=False,
)  # fmt: skip
PARALLEL = dict(
    parallel_attn_mlp=True, parallel_shared_norm=True, gated_mlp=True, mlp_bias=True, attn_bias=True,
    normalization_type="LN",
)  # fmt: skip


def _hand_pp(m: Transformer, component: str) -> dict[str, torch.Tensor]:
    """The documented entries of ``component`` on pypattern's Transformer, written out from the parameter layout
    (first axis of W_Q / W_O / b_Q: query heads; of W_K / W_V / b_K / b_V: key/value heads; of an expert weight:
    experts)."""
    params = dict(m.named_parameters())
    out = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    parts = component.split(".")
    if component == "embed":
        out["embed.W_E"][:] = True
    elif component == "unembed":
        for n in params:
            if n.startswith("unembed."):
                out[n][:] = True
        if m.cfg.tie_word_embeddings:
            out["embed.W_E"][:] = True
    elif len(parts) == 5 and parts[3] in ("head", "kv_head"):
        a, i = f"blocks.{parts[1]}.attn", int(parts[4])
        names = ("W_Q", "b_Q", "W_O") if parts[3] == "head" else ("W_K", "W_V", "b_K", "b_V")
        n_kv = m.cfg.n_key_value_heads or m.cfg.n_heads
        if parts[3] == "head" and n_kv == m.cfg.n_heads:  # multi-head: the head's own keys and values too
            names += ("W_K", "W_V", "b_K", "b_V")
        for pn in names:
            if f"{a}.{pn}" in out:
                out[f"{a}.{pn}"][i] = True
    elif len(parts) == 5 and parts[3] == "expert":
        for pn in ("W_gate", "W_in", "W_out"):  # not the router, not the shared expert
            out[f"blocks.{parts[1]}.mlp.{pn}"][int(parts[4])] = True
    else:  # a module: every parameter under it
        for n in params:
            if n.startswith(component + "."):
                out[n][:] = True
    return out


def _same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for n in want:
        assert torch.equal(got[n], want[n]), (what, n, int(got[n].sum()), int(want[n].sum()))


@pytest.mark.parametrize("options", [GQA_MOE, PARALLEL], ids=["gqa_moe_qknorm_tied", "parallel_shared_norm"])
def test_pypattern_component_masks_equal_hand_built_slices_and_partition_each_block(options):
    m = _pp_model(**options)
    names = list_components(m)
    extra = ["blocks.1.attn", "blocks.1.mlp", "blocks.0.ln1", "ln_final", "unembed"]
    if m.cfg.n_experts:
        extra += [f"blocks.{layer}.mlp.expert.{e}" for layer in (0, 1) for e in range(3)]
    for c in names + extra:
        _same(component_masks(m, c, all_params=True), _hand_pp(m, c), c)
    params = dict(m.named_parameters())
    for layer in (0, 1):
        count = {n: torch.zeros_like(p, dtype=torch.int64) for n, p in params.items()}
        for c in names:
            if c.startswith(f"blocks.{layer}.attn."):
                for n, v in component_masks(m, c).items():
                    count[n] += v
        attn = component_masks(m, f"blocks.{layer}.attn")
        for n in attn:  # heads and key/value heads: every entry of the attention once, but the shared ones
            shared = n.endswith(("b_O", "q_norm.w", "k_norm.w"))
            assert bool((count[n] == (0 if shared else 1)).all()), n
        if m.cfg.n_experts:  # experts: every expert entry once; router and shared expert in none
            count = {n: torch.zeros_like(p, dtype=torch.int64) for n, p in params.items()}
            for e in range(3):
                for n, v in component_masks(m, f"blocks.{layer}.mlp.expert.{e}").items():
                    count[n] += v
            for n in component_masks(m, f"blocks.{layer}.mlp"):
                want = 1 if n.rsplit(".", 1)[1] in ("W_gate", "W_in", "W_out") else 0
                assert bool((count[n] == want).all()), n


def test_include_shared_kv_adds_exactly_the_groups_key_value_head():
    m = _pp_model(**GQA_MOE)
    for h in range(4):
        got = component_masks(m, f"blocks.0.attn.head.{h}", all_params=True, include_shared_kv=True)
        want = _hand_pp(m, f"blocks.0.attn.head.{h}")
        kv = _hand_pp(m, f"blocks.0.attn.kv_head.{h // 2}")  # 4 query heads over 2 key/value heads
        _same(got, {n: want[n] | kv[n] for n in want}, f"head {h} with its key/value head")


# ------------------------------------------------------------------------------------------ Hugging Face models


def _hf(arch: str):
    tr = transformers
    common = dict(vocab_size=V, max_position_embeddings=16, num_hidden_layers=2, num_attention_heads=4)
    cfgs = {
        "llama": lambda: tr.LlamaConfig(  # grouped-query attention with q/k/v/o and MLP biases
            hidden_size=32, num_key_value_heads=2, intermediate_size=24, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=False, **common,
        ),
        "neox": lambda: tr.GPTNeoXConfig(  # per-head [q, k, v] row blocks, parallel residual
            hidden_size=32, intermediate_size=24, rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0,
            eos_token_id=0, **common,
        ),
        "phi3": lambda: tr.Phi3Config(  # fused qkv_proj: every query head, then every key head, every value head
            hidden_size=32, num_key_value_heads=2, intermediate_size=24, partial_rotary_factor=0.5,
            pad_token_id=0, bos_token_id=0, eos_token_id=0, **common,
        ),
        "phi": lambda: tr.PhiConfig(  # parallel attention and MLP on one LayerNorm, biases everywhere
            hidden_size=32, intermediate_size=24, resid_pdrop=0.0, embd_pdrop=0.0, **common,
        ),
        "gemma2": lambda: tr.Gemma2Config(  # sandwich norms, multi-query attention
            hidden_size=32, num_key_value_heads=1, head_dim=8, intermediate_size=24, sliding_window=3,
            query_pre_attn_scalar=8, **common,
        ),
        "mixtral": lambda: tr.MixtralConfig(
            hidden_size=32, num_key_value_heads=2, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
            **common,
        ),
        "qwen2_moe": lambda: tr.Qwen2MoeConfig(  # q/k/v biases, a gated shared expert
            hidden_size=32, num_key_value_heads=2, intermediate_size=24, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, **common,
        ),
        "olmoe": lambda: tr.OlmoeConfig(  # one query/key norm across every head: no per-head components
            hidden_size=32, num_key_value_heads=4, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            pad_token_id=0, bos_token_id=None, eos_token_id=None, **common,
        ),
        "bigcode": lambda: tr.GPTBigCodeConfig(  # multi-query: c_attn rows [every query head | k | v]
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_inner=24, n_positions=16, multi_query=True,
            bos_token_id=0, eos_token_id=0,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    kw = dict(experts_implementation="eager") if arch in ("mixtral", "qwen2_moe", "olmoe") else {}
    m = tr.AutoModelForCausalLM.from_config(cfgs[arch](), attn_implementation="eager", **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


HF = ["llama", "neox", "phi3", "phi", "gemma2", "mixtral", "qwen2_moe", "olmoe", "bigcode"]


def _rows(n: int, idx) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.bool)
    t[idx] = True
    return t


def _hand_hf(m, component: str) -> dict[str, torch.Tensor]:
    """The documented entries of a head, key/value head or expert of a Hugging Face model, from its layout."""
    params = dict(m.named_parameters())
    out = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    parts = component.split(".")
    layer, kind, i = int(parts[1]), parts[3], int(parts[4])
    mt = m.config.model_type
    if kind == "expert":  # entry i of the stacked experts; router and shared expert are not the expert's
        for n in params:
            if n.startswith(f"model.layers.{layer}.mlp.experts."):
                out[n][i] = True
        return out
    nh = m.config.num_attention_heads
    if mt == "gpt_bigcode":
        dh, nkv = m.config.n_embd // nh, 1
    else:
        dh = getattr(m.config, "head_dim", None) or m.config.hidden_size // nh
        nkv = getattr(m.config, "num_key_value_heads", None) or nh
    own = slice(i * dh, (i + 1) * dh)
    g = i // (nh // nkv) if kind == "head" else i
    kv = slice(g * dh, (g + 1) * dh)
    with_kv = kind == "kv_head" or nkv == nh

    def rows(name, sl):
        if name in out:
            out[name][sl] = True

    if mt == "gpt_neox":
        a = f"gpt_neox.layers.{layer}.attention"
        rows(f"{a}.query_key_value.weight", slice(3 * i * dh, 3 * (i + 1) * dh))
        rows(f"{a}.query_key_value.bias", slice(3 * i * dh, 3 * (i + 1) * dh))
        out[f"{a}.dense.weight"][:, own] = True
    elif mt in ("phi3", "gpt_bigcode"):
        a, fused, o = (
            (f"model.layers.{layer}.self_attn", "qkv_proj", "o_proj")
            if mt == "phi3"
            else (f"transformer.h.{layer}.attn", "c_attn", "c_proj")
        )
        n = nh * dh + 2 * nkv * dh
        sel = _rows(n, own) if kind == "head" else _rows(n, [])
        if with_kv:
            sel |= _rows(n, slice(nh * dh + g * dh, nh * dh + (g + 1) * dh))  # key rows
            sel |= _rows(n, slice((nh + nkv) * dh + g * dh, (nh + nkv) * dh + (g + 1) * dh))  # value rows
        for p in ("weight", "bias"):
            if f"{a}.{fused}.{p}" in out:
                out[f"{a}.{fused}.{p}"][sel] = True
        if kind == "head":
            out[f"{a}.{o}.weight"][:, own] = True
    else:  # split projections
        a = f"model.layers.{layer}.self_attn"
        o = "dense" if mt == "phi" else "o_proj"
        if kind == "head":
            rows(f"{a}.q_proj.weight", own)
            rows(f"{a}.q_proj.bias", own)
            out[f"{a}.{o}.weight"][:, own] = True
        if with_kv:
            for p in ("k_proj", "v_proj"):
                rows(f"{a}.{p}.weight", kv)
                rows(f"{a}.{p}.bias", kv)
    return out


@pytest.mark.parametrize("arch", HF)
def test_hugging_face_masks_equal_hand_built_slices_and_the_converted_models_masks(arch):
    """Every listed component and every expert: the unconverted model's mask equals the hand-built one (heads,
    key/value heads, experts) and selects the weights the converted model's mask of the same name selects (the
    entries of the converted parameters that change when the masked entries of the original change)."""
    m = _hf(arch)
    conv = pp.from_hf(m)
    assert hf_components(m) == list_components(conv)
    n_exp = getattr(m.config, "num_local_experts", None) or getattr(m.config, "num_experts", None)
    names = hf_components(m) + [
        "blocks.1.attn",
        "blocks.1.mlp",
        "blocks.1.ln1",
        "ln_final",
        "embed",
        "unembed",
    ]
    names += [f"blocks.{layer}.mlp.expert.{e}" for layer in (0, 1) for e in range(n_exp or 0)]
    base = {n: p.detach().clone() for n, p in conv.named_parameters()}
    hand_checked = 0
    for c in names:
        masks = hf_component_masks(m, c, all_params=True)
        if ".head." in c or ".kv_head." in c or ".expert." in c:
            _same(masks, _hand_hf(m, c), f"{arch} {c}")
            hand_checked += 1
        saved = {n: p.detach().clone() for n, p in m.named_parameters()}
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(masks[n] * (0.5 + torch.rand_like(p)))
            moved = {n: p.detach() != base[n] for n, p in pp.from_hf(m).named_parameters()}
            for n, p in m.named_parameters():
                p.copy_(saved[n])
        _same(component_masks(conv, c, all_params=True), moved, f"{arch} {c} (converted)")
    assert hand_checked > 0


# ------------------------------------------------------------------------------------ what the samplers move


def _recorder(w0: dict):
    moved: dict = {}

    def cb(run, model):
        seen = moved.setdefault(run, {n: torch.zeros_like(v, dtype=torch.bool) for n, v in w0.items()})
        for n, p in model.named_parameters():
            seen[n] |= p.detach() != w0[n]

    return moved, cb


@pytest.mark.parametrize("form", ["pypattern", "hf_mixtral", "hf_qwen2_moe"])
@pytest.mark.parametrize("batched", [True, False])
def test_refined_llc_moves_exactly_each_components_entries(form, batched):
    m = _pp_model(**GQA_MOE) if form == "pypattern" else _hf(form[3:])
    if batched and form != "pypattern":  # a Hugging Face mixture routes with data-dependent shapes: no vmap
        batched = None
    comps = [
        "blocks.1.attn.head.3",
        "blocks.1.attn.kv_head.0",
        "blocks.0.mlp.expert.1",
        "blocks.1.mlp",
        "embed",
    ]
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    moved, cb = _recorder(w0)
    data = [torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    r = pp.refined_llc(m, data, components=comps, callbacks=[cb], batched=batched, **S_QUIET)
    for n, p in m.named_parameters():  # the model is left at w*
        assert torch.equal(p, w0[n]), n
    assert list(r.component) == ["full", *comps]
    for run, c in enumerate(comps, start=1):
        want = component_masks(m, c, all_params=True)
        _same(moved[run], want, c)  # inside: every entry moved; outside: bit-identical
        assert r.num_params[run] == sum(int(v.sum()) for v in want.values())
    assert all(bool(v.all()) for v in moved[0].values())  # the unrestricted run moves everything


@pytest.mark.parametrize("form", ["pypattern", "hf_llama"])
def test_susceptibilities_move_exactly_each_components_entries(form):
    m = _pp_model(**GQA_MOE) if form == "pypattern" else _hf(form[3:])
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    data = [torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    probe = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(9))
    for c in ("blocks.0.attn.head.1", "blocks.0.attn.kv_head.1"):
        seen = {n: torch.zeros_like(v, dtype=torch.bool) for n, v in w0.items()}

        def phi(model, seen=seen):  # records the entries away from w* at every evaluation
            for n, p in model.named_parameters():
                seen[n] |= p.detach() != w0[n]
            return torch.zeros((), dtype=torch.float64)

        pp.susceptibilities(
            m, data, probe, [c], observable=phi, convention="physics", batched=False, **S_QUIET
        )
        _same(seen, component_masks(m, c, all_params=True), c)


# ------------------------------------------------------------------------------------------------- refusals


def test_names_that_do_not_exist_are_refused_naming_them_on_every_form():
    ppm = _pp_model(**GQA_MOE)
    dense = _pp_model()
    llama, mixtral = _hf("llama"), _hf("mixtral")
    cases = [
        (ppm, "blocks.2.attn.head.0", "layer 2 is out of range; the model has 2 layers"),
        (ppm, "blocks.0.attn.head.4", "head 4 is out of range; the layer has 4"),
        (ppm, "blocks.0.attn.kv_head.2", "kv head 2 is out of range; the layer has 2"),
        (ppm, "blocks.0.mlp.expert.3", "expert 3 is out of range; the layer has 3"),
        (ppm, "blocks.0.attn.heads.0", "'blocks.0.attn.heads.0' matches no parameter"),
        (ppm, "blocks.0.attn.head.01", "write 'blocks.0.attn.head.1'"),
        (dense, "blocks.0.mlp.expert.0", r"blocks\.0\.mlp is not a mixture of experts"),
        (dense, "blocks.0.attn.kv_head.0", "no shared key/value heads"),
        (llama, "blocks.2.attn.head.0", "layer 2 is out of range; the model has 2 layers"),
        (llama, "blocks.0.attn.head.4", "out of range; layer 0 has 4 heads"),
        (llama, "blocks.0.attn.kv_head.2", "out of range; layer 0 has 2 key/value heads"),
        (llama, "blocks.0.mlp.expert.0", "llama has no mixture of experts"),
        (llama, "blocks.0.attn.heads.0", "'blocks.0.attn.heads.0' matches no parameter"),
        (mixtral, "blocks.1.mlp.expert.4", "out of range; layer 1 has 4 experts"),
        (mixtral, "blocks.2.mlp.expert.0", "layer 2 is out of range; the model has 2 layers"),
        (_hf("olmoe"), "blocks.0.attn.head.0", "across all heads"),
    ]
    for model, c, words in cases:
        with pytest.raises(ValueError, match=words):
            component_masks(model, c)
    data = [torch.randint(0, V, (2, 8))]
    probe = torch.randint(0, V, (2, 8))
    for model in (ppm, mixtral):  # the estimators refuse them before sampling, naming the component
        with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.expert\.7"):
            pp.refined_llc(model, data, components=["blocks.0.mlp", "blocks.1.mlp.expert.7"], **S)
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.head\.9"):
            pp.susceptibilities(model, data, probe, ["blocks.0.attn.head.9"], **S)


def test_default_components_of_a_tied_model_cover_its_unembedding_bias():
    """With tied embeddings "embed" is documented as both embedding and unembedding, and "unembed" selects
    ``embed.W_E`` and ``unembed.b_U``: the default list must reach ``b_U`` too (one component, as the heads do)."""
    m = _pp_model(tie_word_embeddings=True, unembed_bias=True)
    covered = {n for c in list_components(m) for n, v in component_masks(m, c).items() if v.any()}
    assert "unembed.b_U" in covered
    r = pp.refined_llc(m, [torch.randint(0, V, (2, 8))], components="heads", include_full=False, **S_QUIET)
    assert int(r.num_params.sum()) == sum(
        p.numel()
        for n, p in m.named_parameters()
        if not n.startswith(("blocks.0.ln", "blocks.1.ln", "ln_final")) and not n.endswith("b_O")
    )

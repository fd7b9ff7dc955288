"""auto-circuit 1.0.1 on a grouped-query-attention model: how it forms the edges into keys and values, and how its
edges map onto pypattern's.

One random Hugging Face Llama (grouped-query attention, RMSNorm, rotary, gated MLP; float64) is converted twice:
into pypattern's Transformer by ``pypattern.from_hf`` and into a TransformerLens 2.16.1 ``HookedTransformer`` by
TransformerLens' own ``convert_llama_weights``. auto-circuit's edges are read off its ``patchable_model``; its
EAP scores (mask gradients) and patched runs are compared with pypattern's on the same prompts and the same edge
sets, mapped as follows (``G`` query heads per key/value head ``g``):

- auto-circuit makes one destination per *query head* for each of Q, K and V (``A{l}.{h}.K`` reads the
  ``hook_k_input`` slot of head ``h``); pypattern one per key/value head (``L{l}KV{g}.k``), read by the whole
  group. With TransformerLens' default grouped layout ``hook_k_input`` has one slot per key/value head and
  auto-circuit's per-query-head masks do not fit it; with ``ungroup_grouped_query_attention=True`` each query head
  gets its own copy of the key/value input and weights, and auto-circuit runs.
- Patching: pypattern's ``u -> L{l}KV{g}.k`` is auto-circuit's ``u -> A{l}.{h}.K`` for every ``h`` of the group,
  patched jointly (every query head of the group then attends with the same patched keys, which is what the shared
  key/value head computes). Any set of pypattern's edges, with each key/value edge expanded to its group, gives the
  same patched run (checked on random sets). A set holding only some heads of a group has no pypattern equivalent:
  it gives query heads that share a key/value head different keys, which the model itself cannot compute.
- EAP is linear in the edge: pypattern's ``u -> L{l}KV{g}.k`` score is the sum of auto-circuit's scores of the
  group's ``u -> A{l}.{h}.K`` edges. Exact single-edge effects are not additive: the joint patch of a group's edges
  differs from the sum of their single effects (reported).

Run after ``bash bench/envs/autocircuit.sh``::

    OMP_NUM_THREADS=1 .bench-venvs/autocircuit/bin/python bench/compat_autocircuit_gqa.py
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import replace

import torch

import pypattern
from pypattern.circuits import edge_attribution, edges
from pypattern.circuits.engine import prepare_runs
from pypattern.models import Transformer
from pypattern.patching import LogitDiff

SHAPES = (  # (n_heads, n_key_value_heads): grouped-query and multi-query attention
    (4, 2),
    (6, 3),
    (4, 1),
)


def hf_llama(n_heads: int, n_kv: int, seed: int = 0):
    """A random Llama with non-trivial norm weights, float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    d_head = 8
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=n_heads * d_head,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(4.0)  # larger than the default init, so that attention patterns are not uniform
    return m


def tl_model(hf, ungroup: bool):
    """TransformerLens' HookedTransformer with the Hugging Face weights (TransformerLens' own converter), set up the
    way auto-circuit needs (split q/k/v inputs, per-head results, MLP inputs)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    cfg = HookedTransformerConfig(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        d_vocab=c.vocab_size,
        n_ctx=c.max_position_embeddings,
        act_fn="silu",
        normalization_type="RMS",
        final_rms=True,
        eps=c.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
        rotary_adjacent_pairs=False,
        gated_mlp=True,
        dtype=torch.float64,
        default_prepend_bos=False,
        ungroup_grouped_query_attention=ungroup,
    )
    tl = HookedTransformer(cfg)
    missing, unexpected = tl.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    assert not unexpected and all(
        k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing
    ), (
        missing,
        unexpected,
    )
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)
    tl.eval()
    return tl


def ac_name(edge, G: int) -> tuple[str, str | None]:
    """auto-circuit's edge -> (pypattern's edge name, the query head of a key/value destination or None)."""

    def node(n: str, dst: bool):
        if n == "Resid Start":
            return "embed", None
        if n == "Resid End":
            return "logits", None
        if n.startswith("MLP "):
            return "MLP" + n.split()[1], None
        layer, head, *qkv = n[1:].split(".")
        if not dst:
            return f"L{layer}H{head}", None
        if qkv[0] == "Q":
            return f"L{layer}H{head}.q", None
        return f"L{layer}KV{int(head) // G}.{qkv[0].lower()}", int(head)

    src, _ = node(edge.src.name, False)
    dst, head = node(edge.dest.name, True)
    return f"{src}->{dst}", head


def prompts(V: int, B: int = 6, T: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, T), generator=g)
    corr = clean.clone()
    corr[:, 1:6:2] = torch.randint(0, V, (B, 3), generator=g)
    ans = torch.randint(0, V, (B,), generator=g)
    wrong = (ans + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    return clean, corr, LogitDiff(ans, wrong)


def grouped_attempt(hf, clean, corr, metric) -> str:
    """auto-circuit on TransformerLens' default (grouped) layout: what happens to a patched run of one edge into a
    query input (no key/value edge patched)."""
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model

    tl = tl_model(hf, ungroup=False)
    try:
        acm = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True)
    except Exception as e:  # noqa: BLE001 - the point is to report what auto-circuit does
        return f"patchable_model failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        src = src_ablations(acm, corr, AblationType.RESAMPLE)
        q = [e for e in acm.edges if e.dest.name.endswith(".Q")][:1]
        with torch.no_grad(), patch_mode(acm, src, edges=q):
            metric(acm(clean)[acm.out_slice])
    except Exception as e:  # noqa: BLE001
        return f"a patched run failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "ran"


def compare(n_heads: int, n_kv: int) -> dict:
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks, train_mask_mode

    G = n_heads // n_kv
    hf = hf_llama(n_heads, n_kv)
    ours_model = pypattern.from_hf(hf)
    # Hugging Face's Llama computes RMSNorm and the rotary angles in float32 even in a float64 model, and the
    # converted model does the same; TransformerLens computes both in float64 (the two differ by about 2e-7). The
    # comparison with TransformerLens uses the same weights with both computed in float64.
    ours_model_64 = Transformer(replace(ours_model.cfg, norm_dtype=None, rotary_dtype=None))
    ours_model_64.load_state_dict(ours_model.state_dict())
    ours_model_64.eval()
    clean, corr, metric = prompts(hf.config.vocab_size)
    out: dict = {"n_heads": n_heads, "n_key_value_heads": n_kv}

    tl = tl_model(hf, ungroup=True)
    with torch.no_grad():
        l_hf = hf(clean).logits
        out["logits_max_abs_diff_ours_vs_hf"] = float((ours_model(clean) - l_hf).abs().max())
        out["logits_max_abs_diff_tl_vs_hf"] = float((tl(clean) - l_hf).abs().max())
        out["logits_max_abs_diff_ours_float64_norm_vs_tl"] = float(
            (ours_model_64(clean) - tl(clean)).abs().max()
        )
    out["grouped_layout"] = grouped_attempt(hf, clean, corr, metric)

    ours_model = ours_model_64
    acm = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True)
    g = edges(ours_model)
    mapped = [(e, *ac_name(e, G)) for e in acm.edges]
    by_ours: dict[str, list] = {}
    for e, name, _ in mapped:
        by_ours.setdefault(name, []).append(e)
    assert set(by_ours) == {e.name for e in g}, "the edge sets differ beyond the key/value expansion"
    kv_edges = [e.name for e in g if e.dst.startswith(f"L{0}KV") or "KV" in e.dst]
    assert all(len(by_ours[n]) == G for n in kv_edges) and all(
        len(v) == 1 for n, v in by_ours.items() if n not in set(kv_edges)
    )
    out["edges_ours"] = len(g)
    out["edges_autocircuit"] = len(acm.edges)
    out["key_value_edges_ours"] = len(kv_edges)

    # EAP: mask gradients of the batch sum (divided by the batch size) against pypattern's batch-mean scores
    src = src_ablations(acm, corr, AblationType.RESAMPLE)
    with train_mask_mode(acm):
        set_all_masks(acm, val=0.0)
        with patch_mode(acm, src):
            metric(acm(clean)[acm.out_slice]).sum().backward()
    B = clean.shape[0]
    theirs = {e: float(e.patch_mask(acm).grad[e.patch_idx]) / B for e in acm.edges}
    ours = edge_attribution(ours_model, clean, corr, metric=metric, method="eap").scores
    summed = torch.tensor([sum(theirs[e] for e in by_ours[x.name]) for x in g], dtype=torch.float64)
    scale = float(ours.abs().max())
    out["eap_max_abs_diff_ours_vs_sum_over_group"] = float((summed - ours).abs().max())
    out["eap_scale_max_abs_score"] = scale
    kv_idx = torch.tensor([i for i, x in enumerate(g) if x.name in set(kv_edges)])
    one_head = torch.tensor([theirs[by_ours[x.name][0]] for x in g], dtype=torch.float64)
    out["eap_max_abs_diff_ours_vs_first_head_only_kv_edges"] = float((one_head - ours)[kv_idx].abs().max())

    # exact patching: random sets of pypattern's edges, each key/value edge expanded to its group
    eng, _ = prepare_runs(ours_model, g, clean, corr, metric)
    gen = torch.Generator().manual_seed(2)
    dens = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
    sets = torch.rand(len(dens), len(g), generator=gen) < dens[:, None]
    ours_sets = eng.run(sets)
    worst = 0.0
    for i, m in enumerate(sets):
        names = [g[j].name for j in m.nonzero().flatten().tolist()]
        patched = [e for n in names for e in by_ours[n]]
        with torch.no_grad(), patch_mode(acm, src, edges=patched):
            th = metric(acm(clean)[acm.out_slice])
        worst = max(worst, float((th - ours_sets[i]).abs().max()))
    out["exact_sets_max_abs_diff"] = worst
    out["exact_sets"] = len(sets)

    # every key/value edge alone: pypattern's single edge vs the joint patch of its group's edges, and vs the sum
    # of the group's single-edge effects
    base = eng.base_metric().mean()
    eye = torch.zeros(len(kv_idx), len(g), dtype=torch.bool)
    eye[torch.arange(len(kv_idx)), kv_idx] = True
    ours_single = eng.run(eye).mean(1) - base
    joint_diff, sum_gap = 0.0, 0.0
    for i, j in enumerate(kv_idx.tolist()):
        group = by_ours[g[j].name]
        with torch.no_grad():
            with patch_mode(acm, src, edges=group):
                joint = float(metric(acm(clean)[acm.out_slice]).mean()) - float(base)
            singles = 0.0
            for e in group:
                with patch_mode(acm, src, edges=[e]):
                    singles += float(metric(acm(clean)[acm.out_slice]).mean()) - float(base)
        joint_diff = max(joint_diff, abs(joint - float(ours_single[i])))
        sum_gap = max(sum_gap, abs(singles - float(ours_single[i])))
    out["kv_single_edge_max_abs_diff_vs_joint_group_patch"] = joint_diff
    out["kv_single_edge_max_abs_diff_vs_sum_of_head_patches"] = sum_gap
    out["kv_single_edge_max_abs_effect"] = float(ours_single.abs().max())
    return out


def main() -> None:
    try:
        import auto_circuit  # noqa: F401
        import transformer_lens
    except ImportError as e:
        raise SystemExit(
            f"peer not installed ({e}): this comparison needs auto-circuit 1.0.1 and TransformerLens 2.16.1; run "
            "`bash bench/envs/autocircuit.sh`, then `.bench-venvs/autocircuit/bin/python "
            "bench/compat_autocircuit_gqa.py`"
        ) from None

    torch.set_num_threads(1)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?")
    print(
        json.dumps(
            {
                "cpu": model_name,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformer_lens": getattr(transformer_lens, "__version__", "2.16.1"),
                "threads": torch.get_num_threads(),
            }
        )
    )
    for h, kv in SHAPES:
        print(json.dumps(compare(h, kv)))


if __name__ == "__main__":
    main()

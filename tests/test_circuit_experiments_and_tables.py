"""Known-circuit recovery reads the heads' roles from their attention (and finds none in a model without them),
and a circuit's table lists tied edges in the order its scores rank them."""

import pytest
import torch

from pypattern.circuits import experiments
from pypattern.circuits.graph import EdgeGraph
from pypattern.circuits.results import Circuit, EdgeScores
from pypattern.models import Transformer
from pypattern.tasks import InductionTask

pytestmark = pytest.mark.usefixtures("one_thread")

N, K = 10, 6


def _untrained_induction_model():
    return Transformer(InductionTask().model_config(seed=3))


def _patterns_by_loop(model, clean):
    """Each layer's attention pattern ``(batch, head, query, key)`` as its hook point sees it."""
    seen = {}

    def keep(layer):
        def hook(module, inputs, output):
            seen[layer] = output.detach().float()

        return hook

    handles = [
        model.blocks[layer].attn.hook_pattern.register_forward_hook(keep(layer))
        for layer in range(model.cfg.n_layers)
    ]
    try:
        with torch.no_grad():
            model(clean)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_head_roles_are_the_attention_to_the_previous_position_and_to_the_token_after_the_first_copy():
    model = _untrained_induction_model()
    clean, _, _, _ = experiments.induction_circuit_prompts(model.cfg.d_vocab, 6, N, K, seed=5)
    roles = experiments.head_roles(model, clean, N, K)
    pat = _patterns_by_loop(model, clean)
    B, H, T = clean.shape[0], model.cfg.n_heads, clean.shape[1]
    for layer in range(model.cfg.n_layers):
        for h in range(H):
            prev = sum(float(pat[layer][b, h, q, q - 1]) for b in range(B) for q in range(2, N + 1)) / (
                B * (N - 1)
            )
            ind = sum(float(pat[layer][b, h, T - 1, K + 1]) for b in range(B)) / B
            assert roles["previous_token"][layer, h].item() == pytest.approx(prev, abs=1e-6)
            assert roles["induction"][layer, h].item() == pytest.approx(ind, abs=1e-6)


def test_a_model_without_induction_heads_has_no_roles_and_no_recovered_circuit():
    model = _untrained_induction_model()
    r = experiments.run_induction_circuit(
        model=model, num_prompts=8, methods=("eap",), fractions=(0.0, 0.05, 1.0), quiet=True
    )
    assert r["prev_head"] is None
    assert r["induction_heads"] == []
    # the roles on the same prompts, by the attention patterns: near even, below both thresholds
    clean = r["prompts"][0]
    pat = _patterns_by_loop(model, clean)
    prev = pat[0][:, :, range(2, N + 1), range(1, N)].mean((0, 2))
    ind = pat[1][:, :, -1, K + 1].mean(0)
    assert float(prev.max()) < experiments.PREVIOUS_TOKEN_THRESHOLD
    assert float(ind.max()) < experiments.INDUCTION_THRESHOLD
    assert r["roles_found"] is False
    assert r["key_composition_in_top_5pct"] == {"eap": []}
    assert r["circuit_recovered"] == {"eap": False}


def test_roles_come_from_the_scores_and_the_key_composition_is_read_from_the_ranking(monkeypatch):
    model = _untrained_induction_model()
    L, H = model.cfg.n_layers, model.cfg.n_heads
    prev, ind = torch.full((L, H), 0.1), torch.full((L, H), 0.05)
    prev[0, 2] = 0.9  # a previous-token head that is not head 0
    ind[1, 1], ind[1, 3] = 0.5, 0.25
    monkeypatch.setattr(experiments, "head_roles", lambda *a, **k: {"previous_token": prev, "induction": ind})
    r = experiments.run_induction_circuit(
        model=model, num_prompts=8, methods=("eap",), fractions=(0.0, 0.05, 1.0), quiet=True
    )
    assert r["prev_head"] == 2 and r["induction_heads"] == [1, 3] and r["roles_found"] is True
    sc = r["scores"]["eap"]
    s = sc.scores.tolist()
    budget = int(0.05 * len(sc.graph))
    top = sorted(range(len(s)), key=lambda i: (-abs(s[i]), i))[:budget]  # by |score|, ties in graph order
    names = {sc.graph[i].name for i in top}
    want = sorted({f"L0H2->L1H{h}.k@{K + 1}" for h in (1, 3)} & names)
    assert r["key_composition_in_top_5pct"]["eap"] == want
    f5 = r["faithfulness_at_5pct"]["eap"]
    assert r["circuit_recovered"]["eap"] == (bool(want) and f5 >= 0.9)


def test_a_circuit_table_lists_tied_edges_in_the_ranking_order():
    g = EdgeGraph(2, 4, n_pos=5)
    E = len(g)
    vals = torch.zeros(2, E, dtype=torch.float64)
    vals[:, ::3] = 1.0  # many edges tied at |score| 1 (some negative), the rest tied at 0
    vals[:, 1::7] = -1.0
    vals[:, 5] = 2.0
    sc = EdgeScores(g, vals, "eap", "noise", "resample", "m", torch.zeros(2), torch.ones(2))
    s = sc.scores.tolist()
    for n in (1, 40, 300, E):
        want = [g[i].name for i in sorted(range(E), key=lambda i: (-abs(s[i]), i))[:n]]
        c = sc.circuit(n=n)
        assert c.to_pandas()["name"].tolist() == want
        assert [e.name for e, _ in sc.top(n)] == want
    # a hand-made circuit whose scores hold NaN: NaN last, the rest by |score| in graph order
    scores = torch.tensor([float("nan"), 1.0, -1.0, 0.5] + [0.0] * (E - 4), dtype=torch.float64)
    c = Circuit(g, torch.arange(E) < 5, scores)
    assert c.to_pandas()["name"].tolist() == [g[i].name for i in (1, 2, 3, 4, 0)]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"fractions": (2.0,)}, r"fractions\[0\]=2\.0 .*\[0, 1\]"),
        ({"fractions": (0.05, -0.1)}, r"fractions\[1\]=-0\.1 .*\[0, 1\]"),
        ({"fractions": ("a",)}, r"fractions\[0\]='a'"),
        ({"methods": ()}, r"methods=\(\) .*eap"),
        ({"methods": ("EAP",)}, r"methods=\('EAP',\) .*eap-ig"),
    ],
)
def test_induction_experiment_settings_are_refused_by_name_before_any_scoring(kw, match, monkeypatch):
    def scored(*a, **k):
        raise AssertionError("edges were scored")

    monkeypatch.setattr(experiments, "edge_attribution", scored)
    with pytest.raises(ValueError, match=match):
        experiments.run_induction_circuit(model=_untrained_induction_model(), num_prompts=4, quiet=True, **kw)


@pytest.mark.parametrize("fractions", [(), (0.01, 1.5)])
def test_ioi_experiment_fractions_are_refused_before_training(fractions, monkeypatch):
    def trained(*a, **k):
        raise AssertionError("a model was trained")

    monkeypatch.setattr(experiments, "train_ioi_model", trained)
    with pytest.raises(ValueError, match=r"fractions"):
        experiments.run_ioi_circuits(seeds=(0,), fractions=fractions)


def test_a_repeated_fraction_is_one_point_and_one_row_per_method(monkeypatch):
    model = _untrained_induction_model()
    r = experiments.run_induction_circuit(
        model=model, num_prompts=4, methods=["eap", "eap"], fractions=(0.01, 0.01, 0.05), quiet=True
    )
    E = r["num_edges"]
    assert list(r["scores"]) == ["eap"]
    assert r["curve"].counts.tolist() == sorted({round(0.01 * E), int(0.05 * E), round(0.05 * E)})


def test_circuit_command_names_the_heads_whose_attention_has_the_role(tmp_path):
    import json

    from pypattern.circuits.cli import run_circuit_demo

    res = run_circuit_demo(str(tmp_path), methods=("eap",), steps=60, quiet=True)
    summary = json.loads((tmp_path / "circuit_summary.json").read_text())
    # the same model and prompts, the roles read from the attention patterns by a loop
    model, _ = experiments.train_induction_model(0, 60)
    clean, _, _, _ = experiments.induction_circuit_prompts(model.cfg.d_vocab, 64, N, K, seed=1000)
    pat = _patterns_by_loop(model, clean)
    prev = pat[0][:, :, range(2, N + 1), range(1, N)].mean((0, 2))
    ind = pat[1][:, :, -1, K + 1].mean(0)
    want_prev = (
        f"L0H{int(prev.argmax())}" if float(prev.max()) >= experiments.PREVIOUS_TOKEN_THRESHOLD else None
    )
    want_ind = [f"L1H{h}" for h in range(len(ind)) if float(ind[h]) >= experiments.INDUCTION_THRESHOLD]
    for got in (res, summary):
        assert got["previous_token_head"] == want_prev
        assert got["induction_heads"] == want_ind
        assert got["roles_found"] == (want_prev is not None and bool(want_ind))


@pytest.mark.parametrize("text", ["", "0,,1", "a", "-1", "0.5"])
def test_experiment_command_refuses_seeds_that_are_not_ints(text, capsys):
    with pytest.raises(SystemExit) as e:
        experiments.main(["--seeds", text, "--induction-only"])
    assert e.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_mask_of_the_other_kind_of_graph_is_named_as_such():
    flat, per_pos = EdgeGraph(2, 2, has_mlp=True), EdgeGraph(2, 2, has_mlp=True, n_pos=6)
    assert len(per_pos) == 6 * len(flat)
    with pytest.raises(ValueError, match=rf"{len(flat)} entries.*per-position edges over 6 positions"):
        flat.mask(torch.ones(len(per_pos), dtype=torch.bool))
    with pytest.raises(
        ValueError, match=rf"{len(per_pos)} entries.*{len(flat)} is the count of this model's edges without"
    ):
        per_pos.mask(torch.ones(len(flat), dtype=torch.bool))
    with pytest.raises(ValueError, match=r"another graph"):
        flat.mask(torch.ones(len(flat) + 1, dtype=torch.bool))

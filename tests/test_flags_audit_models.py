"""Concept flags checked against hand-written computations where users meet them: the flag loss and its gradient
against a naive loop (finite differences and autograd), labels of every integer dtype, batches with no labelled
position whose activations hold NaN elsewhere, padded Hugging Face batches whose padding is kept out of the loss
by ``attention_mask``, steering and read-out on GPT-2, GPT-NeoX, Llama and Qwen2 models (converted with
``pypattern.from_hf`` and wrapped with ``pypattern.hooked_hf``) in float32, float64 and bfloat16 at batch and
sequence length 1, several flags at different layers at once, right-padded batches steered as their unpadded rows,
steering concepts of every integer dtype, results saved and loaded, two training steps replayed by hand, and a
task's bad stage-2 labels refused by name."""

import numpy as np
import pytest
import torch

import pypattern as pp
from pypattern import flags

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
SPEC = pp.FlagSpec(
    "blocks.1.hook_resid_pre", dims=(5, 1, 9, 3, 7), num_concepts=3, on_value=0.5, off_value=-1.5
)


def _code64(spec: pp.FlagSpec) -> torch.Tensor:
    """The code as the module docstring states it: concept c's contiguous, nearly equal group of the flags on."""
    n, c = len(spec.dims), spec.num_concepts
    code = torch.full((c, n), spec.off_value, dtype=torch.float64)
    start = 0
    for i in range(c):
        size = n // c + (1 if i < n % c else 0)
        code[i, start : start + size] = spec.on_value
        start += size
    return code


def _naive_loss(acts: torch.Tensor, labels: torch.Tensor, spec: pp.FlagSpec, keep=None) -> torch.Tensor:
    """mean over labelled (and kept) positions of mean over k of (acts[b, t, dims[k]] - code[label, k])**2, as a
    loop in float64 (differentiable in ``acts``)."""
    b, t, _ = acts.shape
    lab = labels if labels.dim() == 2 else labels[:, None].expand(b, t)
    code = _code64(spec)
    terms = []
    for i in range(b):
        for j in range(t):
            c = int(lab[i, j])
            if c < 0 or (keep is not None and not bool(keep[i, j])):
                continue
            for k, d in enumerate(spec.dims):
                terms.append((acts[i, j, d].double() - code[c, k]) ** 2)
    return torch.stack(terms).sum() / (len(terms) // len(spec.dims) * len(spec.dims))


# ----- the loss and its gradient ----------------------------------------------------------------------------
def test_flag_loss_gradient_equals_finite_differences_and_the_naive_loss_autograd():
    g = torch.Generator().manual_seed(11)
    acts = torch.randn(2, 4, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    lab = torch.tensor([[0, -1, 2, 1], [-1, -1, 1, 0]])
    got = pp.flag_loss(acts, lab, SPEC)
    want = _naive_loss(acts, lab, SPEC)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    (g_got,) = torch.autograd.grad(got, acts)
    (g_want,) = torch.autograd.grad(want, acts)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-14)
    # central differences on a few entries: flags at labelled positions, an unlabelled position, a non-flag dim
    with torch.no_grad():
        for idx in ((0, 0, 5), (1, 3, 7), (0, 2, 1), (0, 1, 5), (1, 0, 0)):
            h = 1e-6
            up, down = acts.detach().clone(), acts.detach().clone()
            up[idx] += h
            down[idx] -= h
            fd = (float(pp.flag_loss(up, lab, SPEC)) - float(pp.flag_loss(down, lab, SPEC))) / (2 * h)
            assert float(g_got[idx]) == pytest.approx(fd, abs=1e-8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_labels_of_every_integer_dtype_give_the_same_loss(dtype):
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(3, 4, 12, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (3, 4), generator=g)
    want = float(_naive_loss(acts, lab, SPEC))
    assert float(pp.flag_loss(acts, lab.to(dtype), SPEC)) == pytest.approx(want, rel=1e-12)
    per_sample = lab[:, 0]
    want1 = float(_naive_loss(acts, per_sample, SPEC))
    assert float(pp.flag_loss(acts, per_sample.to(dtype), SPEC)) == pytest.approx(want1, rel=1e-12)
    assert float(pp.flag_loss(acts, per_sample.numpy().astype(str(dtype)[6:]), SPEC)) == pytest.approx(
        want1, rel=1e-12
    )
    with pytest.raises(ValueError, match=r"concept_labels has values in \[0, 3\]; give 0\.\.2"):
        pp.flag_loss(acts, torch.tensor([0, 3, 1], dtype=dtype), SPEC)


def test_a_batch_without_labelled_positions_has_loss_zero_whatever_the_other_activations_hold():
    acts = torch.randn(2, 3, 12, dtype=torch.float64)
    acts[0, 0, 0] = float("nan")  # a non-flag dimension
    acts[1, 2, 5] = float("inf")  # a flag at an unlabelled position
    leaf = acts.clone().requires_grad_(True)
    none = torch.full((2, 3), -1)
    loss = pp.flag_loss(leaf, none, SPEC)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(acts))
    # with one labelled position the unlabelled ones do not count either
    one = none.clone()
    one[1, 0] = 2
    assert float(pp.flag_loss(acts, one, SPEC)) == pytest.approx(
        float(_naive_loss(acts, one, SPEC)), rel=1e-12
    )


# ----- padded Hugging Face batches --------------------------------------------------------------------------
def _llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_padding_is_kept_out_of_the_flag_loss_by_the_attention_mask():
    model = pp.hooked_hf(_llama())
    ids = torch.randint(1, V, (3, 6))
    am = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])  # full, right padded, left padded
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(3, 1, 8, 20))
    with torch.no_grad():
        _, cache = model.run_with_cache({"input_ids": ids, "attention_mask": am}, names_filter=spec.hook)
    acts = cache[spec.hook]
    per_sample = torch.tensor([0, 1, 1])
    want = float(_naive_loss(acts, per_sample, spec, keep=am.bool()))
    for mask in (am, am.bool(), am.float(), am.numpy()):
        assert float(pp.flag_loss(acts, per_sample, spec, attention_mask=mask)) == pytest.approx(
            want, rel=1e-6
        )
    # the same as marking the padding unknown in the labels
    lab = per_sample[:, None].expand(3, 6).masked_fill(am == 0, -1)
    assert float(pp.flag_loss(acts, lab, spec)) == pytest.approx(want, rel=1e-6)
    # and not the loss with the padding counted
    assert float(pp.flag_loss(acts, per_sample, spec)) != pytest.approx(want, rel=1e-3)
    # the right-padded row alone, unpadded: its loss is the loss of its real positions in the batch
    with torch.no_grad():
        _, alone = model.run_with_cache(ids[1:2, :4], names_filter=spec.hook)
    one = pp.flag_loss(alone[spec.hook], per_sample[1:2], spec)
    both = pp.flag_loss(acts[1:2], per_sample[1:2], spec, attention_mask=am[1:2])
    assert float(one) == pytest.approx(float(both), rel=1e-5)
    # every position padding: loss 0
    assert float(pp.flag_loss(acts, per_sample, spec, attention_mask=torch.zeros(3, 6))) == 0.0
    for bad, said in (
        (torch.ones(3, 5), r"attention_mask has shape \(3, 5\); give \(3, 6\)"),
        (torch.full((3, 6), 2), r"attention_mask has values other than 0 and 1"),
        (torch.ones(3, 6, dtype=torch.complex64), r"attention_mask has dtype torch.complex64"),
        ("11", r"attention_mask is a str"),
    ):
        with pytest.raises((ValueError, TypeError), match=said):
            pp.flag_loss(acts, per_sample, spec, attention_mask=bad)


def test_a_steered_right_padded_batch_gives_each_row_the_logits_of_the_row_alone():
    model = pp.hooked_hf(_llama())
    ids = torch.randint(1, V, (2, 6))
    am = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(3, 1, 8, 20), on_value=4.0, off_value=-4.0)
    with torch.no_grad():
        with pp.steer(model, spec, torch.tensor([0, 1])):
            both = model({"input_ids": ids, "attention_mask": am})
        with pp.steer(model, spec, 1):
            alone = model(ids[1:2, :4])
        free = model(ids[1:2, :4])
    torch.testing.assert_close(both[1, :4], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone, free, atol=1e-3)


# ----- steering on converted and wrapped families -----------------------------------------------------------
def _hf(arch: str):
    T = transformers
    torch.manual_seed(0)
    small = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    if arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=32)
        cfg.bos_token_id = cfg.eos_token_id = 0
        return T.GPT2LMHeadModel(cfg).eval()
    if arch == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small, rotary_pct=0.5)).eval()
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2)).eval()
    return T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "qwen2"])
@pytest.mark.parametrize("how", ["converted", "hooked"])
def test_steering_writes_the_code_reads_back_and_leaves_other_dims_on_every_family(arch, how):
    hf = _hf(arch)
    base = pp.from_hf(hf) if how == "converted" else pp.hooked_hf(hf)
    spec = pp.FlagSpec("blocks.2.hook_resid_pre", dims=(3, 17, 8, 1, 30), num_concepts=2, on_value=3.0)
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        model = base.to(dtype)
        for shape in ((1, 1), (1, 5), (3, 1), (2, 4)):
            tokens = torch.randint(0, V, shape, generator=g)
            concept = torch.randint(0, 2, shape[:1], generator=g)
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens, names_filter=spec.hook)
                clean, logits = cache[spec.hook], model(tokens)
                with pp.steer(model, spec, concept):
                    _, cache = model.run_with_cache(tokens, names_filter=spec.hook)
                    steered = model(tokens)
                acts = cache[spec.hook]
                want = clean.clone()
                want[..., list(spec.dims)] = _code64(spec)[concept][:, None].to(dtype)
                assert torch.equal(acts, want)
                assert torch.equal(pp.read_flags(acts, spec), concept[:, None].expand(shape))
                assert float(pp.flag_loss(acts, concept, spec)) == 0.0
                assert not torch.equal(steered, logits)
                # controls: the residual stream before the flag layer is untouched, and writing back the values
                # the model wrote itself (a one-token batch, one value per flag) leaves its logits as they are
                _, early = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
                with pp.steer(model, spec, concept):
                    _, early_steered = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
                assert torch.equal(early_steered["blocks.1.hook_resid_pre"], early["blocks.1.hook_resid_pre"])
                _, first = model.run_with_cache(tokens[:1, :1], names_filter=spec.hook)
                own = first[spec.hook][0, 0, list(spec.dims)]
                with pp.ablate_flags(model, spec, own.double()):
                    same = model(tokens[:1, :1])
                assert torch.equal(same, model(tokens[:1, :1]))
        base = model.float()


def test_several_flags_at_different_layers_steer_independently():
    model = pp.from_hf(_hf("llama"))
    early = pp.FlagSpec("blocks.0.hook_resid_post", dims=(0, 1, 2, 3), num_concepts=2, on_value=5.0)
    late = pp.FlagSpec("blocks.2.hook_resid_pre", dims=(10, 11, 12, 13, 14, 15), num_concepts=3, on_value=5.0)
    tokens = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        with pp.steer(model, early, 1), pp.steer(model, late, torch.tensor([2, 0])):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (early.hook, late.hook))
            both = model(tokens)
        # by hand: the two overwrites as plain hooks
        code_e, code_l = _code64(early)[1], _code64(late)[torch.tensor([2, 0])]

        def write_e(x, hook):
            x = x.clone()
            x[..., list(early.dims)] = code_e.to(x.dtype)
            return x

        def write_l(x, hook):
            x = x.clone()
            x[..., list(late.dims)] = code_l[:, None].to(x.dtype)
            return x

        with model.hooks([(early.hook, write_e), (late.hook, write_l)]):
            by_hand = model(tokens)
    assert torch.equal(both, by_hand)
    assert torch.equal(pp.read_flags(cache[early.hook], early), torch.ones(2, 5, dtype=torch.long))
    assert torch.equal(pp.read_flags(cache[late.hook], late), torch.tensor([[2] * 5, [0] * 5]))


# ----- results ------------------------------------------------------------------------------------------------
def test_flag_results_round_trip_through_files_without_pickle(tmp_path):
    nan = float("nan")
    rep = pp.FlagReport(
        0.5, 0.25, 0.125, 0.75, 1.5, 2.0, 0.5, 0.4, nan, nan, nan, 0.9, reference={"probe_flag": 0.3}
    )
    tr = flags.FlagTrainResult([0, 10, 19], [1, 2, 2], [3.5, 2.0, 1.25], [0.5, 0.25, nan], 4.0)
    for obj, cls in ((rep, pp.FlagReport), (tr, flags.FlagTrainResult)):
        path = tmp_path / f"{cls.__name__}.npz"
        obj.save(path)
        with np.load(path, allow_pickle=False) as f:  # readable without unpickling
            assert len(f.files) > 0
        back = cls.load(path)
        for k, v in vars(obj).items():
            w = getattr(back, k)
            if isinstance(v, float) and np.isnan(v):
                assert np.isnan(w)
            elif isinstance(v, list):
                np.testing.assert_array_equal(np.asarray(w, float), np.asarray(v, float))
            else:
                assert w == v


# ----- a task's stage-2 labels ----------------------------------------------------------------------------------
class _Unlabelled(pp.TopicTask):
    """A concept task whose stage-2 batches lack ``target_concept`` or mark it unknown (-1)."""

    def __init__(self, *a, mode: str, **kw):
        super().__init__(*a, **kw)
        self.mode = mode

    def sample(self, num_samples, seed=0, switch_prob=0.0):
        b = super().sample(num_samples, seed=seed, switch_prob=switch_prob)
        if self.mode == "missing":
            b.extra.pop("target_concept")
        else:
            b.extra["target_concept"] = torch.full_like(b.extra["target_concept"], -1)
        return b


@pytest.mark.parametrize("mode", ["missing", "unknown"])
def test_stage_two_refuses_a_task_without_target_concepts_by_name(mode):
    task = _Unlabelled(num_topics=2, tokens_per_topic=6, num_shared=4, seq_len=12, mode=mode)
    model = pp.Transformer(task.model_config(d_model=32, n_heads=4, d_mlp=48, seed=0))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    said = r"extra\['target_concept'\]" + (
        " is missing" if mode == "missing" else r" has values in \[-1, -1\]"
    )
    with pytest.raises(ValueError, match=said):
        pp.train_flags(model, task, spec, stage1_steps=1, stage2_steps=1, batch_size=4, quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----- training steps ---------------------------------------------------------------------------------------
def test_train_flags_steps_are_adamw_on_the_lm_loss_plus_the_weighted_naive_flag_loss():
    """Two steps (one of each stage) of a converted Qwen2 model in float64, replayed by hand: the same batches,
    stage 2's flags overwritten from ``switch_pos - 1`` on with the new concept's code, the flag loss on what the
    model wrote, AdamW."""
    task = pp.TopicTask(num_topics=2, tokens_per_topic=6, num_shared=4, seq_len=10)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=task.d_vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
    ).eval()
    model = pp.from_hf(hf).double()
    twin = pp.from_hf(hf).double()
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(9, 2, 30, 5, 17), num_concepts=2, off_value=-1.0)
    kw = dict(aux_weight=0.7, switch_prob=1.0, batch_size=6, lr=1e-2, weight_decay=0.1, seed=3)
    res = pp.train_flags(model, task, spec, stage1_steps=1, stage2_steps=1, log_every=1, quiet=True, **kw)

    g = torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    code = _code64(spec)
    twin.train()
    for step, stage in enumerate((1, 2)):
        bseed = int(torch.randint(0, 2**62, (), generator=g))
        batch = task.sample(6, seed=bseed, switch_prob=0.0 if stage == 1 else 1.0)
        written = []

        def hook(x, hook, batch=batch, stage=stage, written=written):
            written.append(x)
            if stage == 1:
                return None
            x = x.clone()
            for i in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if t >= int(batch.extra["switch_pos"][i]) - 1:
                        x[i, t, list(spec.dims)] = code[int(batch.extra["target_concept"][i, t])]
            return x

        with twin.hooks([(spec.hook, hook)]):
            logits = twin(batch.tokens)
        counted = batch.targets != -100
        lm = torch.nn.functional.cross_entropy(logits[counted], batch.targets[counted])
        fl = _naive_loss(written[0], batch.extra["concept_pos"], spec)
        assert res.lm_losses[step] == pytest.approx(float(lm.detach()), rel=1e-10)
        assert res.flag_losses[step] == pytest.approx(float(fl.detach()), rel=1e-10)
        opt.zero_grad()
        (lm + 0.7 * fl).backward()
        opt.step()
    assert res.stages == [1, 2]
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "numpy-int8", "numpy-scalar"])
def test_steering_concepts_of_every_integer_dtype_write_each_samples_own_code(dtype):
    """A uint8 tensor must not index the code as a mask (concepts [1, 1] would give samples 0 and 1 concepts 0
    and 1), nor int8 / int16 ones fail to index it."""
    model = pp.from_hf(_hf("gpt2"))
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(7, 2, 19, 11), on_value=2.0)
    tokens = torch.randint(0, V, (2, 5))
    want_concepts = torch.tensor([1, 1]) if dtype != "numpy-scalar" else torch.tensor(1)
    if dtype == "numpy-scalar":
        concept = np.int8(1)
    elif dtype == "numpy-int8":
        concept = np.array([1, 1], dtype=np.int8)
    else:
        concept = want_concepts.to(getattr(torch, dtype))
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=spec.hook)
        with pp.steer(model, spec, concept):
            _, cache = model.run_with_cache(tokens, names_filter=spec.hook)
    want = clean[spec.hook].clone()
    want[..., list(spec.dims)] = _code64(spec)[want_concepts.expand(2)][:, None].float()
    assert torch.equal(cache[spec.hook], want)
    out = pp.generate(model, tokens, 2, spec, concept, greedy=True)
    assert torch.equal(out, pp.generate(model, tokens, 2, spec, want_concepts, greedy=True))

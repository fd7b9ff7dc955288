"""Concept flags and the shared loss rule as users with their own models use them, checked against hand-written
computations: the flag loss against its formula on activations of every floating dtype and layout (16-bit ones
computed in float32), the read-out against the flag loss, steering and ablation on Hugging Face models (converted
and wrapped) restoring them exactly, generation under steering against a greedy loop with the same hook, and the
per-token losses of every batch form against a shifted cross-entropy with padding and -100 handled (pairs of a
16-bit model computed in float32, labels outside the vocabulary refused by name)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import pypattern as pp
from pypattern import losses
from pypattern.sampling.runner import default_loss_fn

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 40
SPEC = pp.FlagSpec(
    "blocks.1.hook_resid_pre", dims=(5, 1, 9, 3, 7), num_concepts=3, on_value=0.3, off_value=-0.7
)


def _code64(spec: pp.FlagSpec) -> torch.Tensor:
    """The code, written out from the docstring: concept c's contiguous group of the flags on, the others off."""
    n, c = len(spec.dims), spec.num_concepts
    sizes = [n // c + (1 if i < n % c else 0) for i in range(c)]
    code = torch.full((c, n), spec.off_value, dtype=torch.float64)
    start = 0
    for i, s in enumerate(sizes):
        code[i, start : start + s] = spec.on_value
        start += s
    return code


def _flag_loss_naive(acts: torch.Tensor, labels: torch.Tensor, spec: pp.FlagSpec) -> float:
    """mean over labelled positions of mean over k of (acts[b, t, dims[k]] - code[label, k])**2, in float64."""
    a = acts.double()
    b, t, _ = a.shape
    lab = labels if labels.dim() == 2 else labels[:, None].expand(b, t)
    code = _code64(spec)
    total, n = 0.0, 0
    for i in range(b):
        for j in range(t):
            c = int(lab[i, j])
            if c >= 0:
                total += sum(float(a[i, j, d] - code[c, k]) ** 2 for k, d in enumerate(spec.dims)) / len(
                    spec.dims
                )
                n += 1
    return total / n


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(n_positions: int = 64):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=n_positions)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return transformers.GPT2LMHeadModel(cfg).eval()


def _flag_model(kind: str):
    family, how = kind.split("-")
    hf = _llama() if family == "llama" else _gpt2()
    return pp.from_hf(hf) if how == "converted" else pp.hooked_hf(hf)


KINDS = ["llama-converted", "llama-hooked", "gpt2-converted", "gpt2-hooked"]


# ----- flag loss and read-out -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_flag_loss_matches_its_formula_in_every_dtype_layout_and_batch_size(dtype):
    g = torch.Generator().manual_seed(3)
    # non-contiguous activations (a permuted view), per-position labels with unknown (-1) positions
    acts = (torch.randn(12, 4, 6, generator=g, dtype=torch.float64) * 0.8).to(dtype).permute(1, 2, 0)
    assert not acts.is_contiguous()
    lab = torch.randint(-1, 3, (4, 6), generator=g)
    # the activations' own values in float64: 16-bit inputs are exact there, and the loss is computed in float32
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    got = pp.flag_loss(acts, lab, SPEC)
    assert got.dtype == (dtype if dtype in (torch.float64, torch.float32) else torch.float32)
    assert float(got) == pytest.approx(_flag_loss_naive(acts, lab, SPEC), rel=tol)
    # a batch of one with one label per sample
    one = acts[2:3]
    got1 = pp.flag_loss(one, torch.tensor([2]), SPEC)
    assert float(got1) == pytest.approx(_flag_loss_naive(one, torch.tensor([2]), SPEC), rel=tol)
    # the gradient reaches the activations in their own dtype, on the flag dimensions only
    leaf = acts.detach().clone().requires_grad_(True)
    pp.flag_loss(leaf, lab, SPEC).backward()
    assert leaf.grad.dtype == dtype
    rest = [d for d in range(12) if d not in SPEC.dims]
    assert not bool(leaf.grad[..., rest].any()) and bool(leaf.grad[..., list(SPEC.dims)].any())


def test_16_bit_flags_far_from_the_code_give_a_finite_loss_and_the_right_read_out():
    spec = pp.FlagSpec("blocks.0.hook_resid_post", dims=(0, 1, 2, 3), num_concepts=2)
    acts = torch.zeros(1, 2, 6, dtype=torch.float16)
    acts[0, 0, [2, 3]] = 300.0  # concept 1's flags, far above 1 (in float16 the squared distances overflow)
    acts[0, 1, [0, 1]] = 300.0  # concept 0's
    lab = torch.tensor([[1, 0]])
    loss = pp.flag_loss(acts, lab, spec)
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(_flag_loss_naive(acts, lab, spec), rel=1e-6)
    assert pp.read_flags(acts, spec).tolist() == [[1, 0]]
    assert pp.read_flags(acts.bfloat16(), spec).tolist() == [[1, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_flags_is_the_concept_of_least_flag_loss_and_reads_each_code_back(dtype):
    g = torch.Generator().manual_seed(5)
    acts = (torch.randn(3, 4, 12, generator=g) * 0.7).to(dtype)
    read = pp.read_flags(acts, SPEC)
    for b in range(3):
        for t in range(4):
            per = [float(pp.flag_loss(acts[b : b + 1, t : t + 1], torch.tensor([c]), SPEC)) for c in range(3)]
            assert int(read[b, t]) == min(range(3), key=per.__getitem__)
    # the code flag_loss targets is what read_flags reads back, at zero loss
    exact = acts.clone()
    concepts = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 0], [1, 0, 1, 2]])
    exact[..., list(SPEC.dims)] = SPEC.code(dtype)[concepts]
    assert torch.equal(pp.read_flags(exact, SPEC), concepts)
    assert float(pp.flag_loss(exact, concepts, SPEC)) == pytest.approx(0.0, abs=1e-5)


# ----- steering on Hugging Face models ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_steer_and_ablate_on_hugging_face_models_write_the_code_and_restore_the_model_exactly(kind):
    model = _flag_model(kind)
    tokens = torch.randint(0, V, (3, 7))
    concepts = torch.tensor([2, 0, 1])
    for hook in ("blocks.1.hook_resid_post", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_pre"):
        spec = pp.FlagSpec(hook, dims=(30, 2, 17, 8, 11), num_concepts=3, on_value=4.0, off_value=-2.0)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=hook)
            before, clean = model(tokens), cache[hook]
            with pp.steer(model, spec, concepts, positions=3):
                steered = model(tokens)
                _, cache = model.run_with_cache(tokens, names_filter=hook)
            acts = cache[hook]
            want = clean.clone()
            want[:, 3:, list(spec.dims)] = spec.code(clean.dtype)[concepts][:, None]
            assert torch.equal(acts, want)  # the flags from position 3 on, nothing else
            assert not torch.equal(steered, before)  # the last layer's resid_post reaches the logits too
            assert torch.equal(model(tokens), before)
            with pytest.raises(KeyError, match="inside"), pp.ablate_flags(model, spec, 0.5):
                assert not torch.equal(model(tokens), before)
                raise KeyError("inside")
            assert torch.equal(model(tokens), before)
            assert not any(getattr(hp, "_fns", None) for hp in model.hook_dict.values())
    # dims beyond the residual width: refused naming dims and the width (at the first forward on a wrapper, whose
    # hook widths are known only from the activations)
    wide = pp.FlagSpec("blocks.1.hook_resid_post", dims=(3, 32), num_concepts=2)
    with pytest.raises(ValueError, match=r"dims=\(3, 32\) has entries >= d_model=32"):  # noqa: PT012
        with pp.steer(model, wide, 1):
            model(tokens)
    assert torch.equal(model(tokens), before)


@pytest.mark.parametrize("kind", ["llama-hooked", "gpt2-converted"])
def test_generate_under_steering_is_a_greedy_loop_with_the_same_hook(kind):
    model = _flag_model(kind)
    spec = pp.FlagSpec("blocks.1.hook_resid_post", dims=(3, 1, 8, 20), on_value=5.0, off_value=-5.0)
    prompt = torch.randint(0, V, (3, 4))
    concepts = torch.tensor([0, 1, 1])
    code = _code64(spec)[concepts]

    def write(x, hook):
        x = x.clone()
        x[:, 2:, list(spec.dims)] = code[:, None].to(x.dtype)
        return x

    tokens = prompt
    with torch.no_grad(), model.hooks([(spec.hook, write)]):
        for _ in range(5):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
    out = pp.generate(model, prompt, 5, spec, concepts, positions=2, greedy=True)
    assert torch.equal(out, tokens)
    free = pp.generate(model, prompt, 5, greedy=True)
    assert not torch.equal(free, out)  # the steering changed the continuation


@pytest.mark.parametrize("how", ["hooked", "raw"])
def test_generate_refuses_a_length_beyond_a_hugging_face_models_learned_positions(how):
    hf = _gpt2(n_positions=12)
    model = pp.hooked_hf(hf) if how == "hooked" else hf
    prompt = torch.randint(0, V, (2, 4))
    assert pp.generate(model, prompt, 8, greedy=True).shape == (2, 12)
    with pytest.raises(ValueError, match=r"prompt length 4 \+ steps=9 exceeds the model's n_ctx=12"):
        pp.generate(model, prompt, 9, greedy=True)


# ----- the loss rule ----------------------------------------------------------------------------------------
def _shifted_ce(logits, ids, mask, labels):
    """Per-token losses (batch, pos - 1) and their mask by hand: position t scores target t + 1 when the target is
    not -100 and both positions are real tokens."""
    lp = torch.log_softmax(logits.double(), -1)
    tgt = ids if labels is None else labels
    b, t = ids.shape
    out = torch.full((b, t - 1), float("nan"), dtype=torch.float64)
    for i in range(b):
        for j in range(t - 1):
            real = mask is None or (int(mask[i, j]) == 1 and int(mask[i, j + 1]) == 1)
            if int(tgt[i, j + 1]) != -100 and real:
                out[i, j] = -lp[i, j, int(tgt[i, j + 1])]
    return out, ~torch.isnan(out)


@pytest.mark.parametrize("kind", ["raw", "hooked"])
def test_token_losses_of_mapping_batches_equal_a_hand_written_shifted_cross_entropy(kind):
    hf = _llama()
    model = hf if kind == "raw" else pp.hooked_hf(hf)
    ids = torch.randint(0, V, (4, 7))
    am = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [0] * 7, [0, 0, 1, 1, 1, 1, 1]])  # right, none, left
    labels = ids.clone()
    labels[0, 3] = -100
    labels[3, 5] = -100
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=am).logits
    for mask in (am, am.bool(), am.float()):
        for lab in (None, labels):
            batch = {"input_ids": ids, "attention_mask": mask} | ({} if lab is None else {"labels": lab})
            want, counted = _shifted_ce(logits, ids, am, lab)
            with torch.no_grad():
                got, got_mask = losses.token_losses(model, batch)
                per_sample = losses.sample_losses(model, batch)
                mean = losses.batch_loss(model, batch)
            assert torch.equal(got_mask, counted)
            torch.testing.assert_close(got.double()[counted], want[counted], rtol=1e-5, atol=1e-6)
            assert bool(got[~counted].isnan().all())
            assert bool(per_sample[2].isnan())  # the all-padding row has no counted token
            rows = [0, 1, 3]
            torch.testing.assert_close(
                per_sample[rows].double(), want[rows].nansum(-1) / counted[rows].sum(-1), rtol=1e-5, atol=1e-6
            )
            assert float(mean) == pytest.approx(float(want[counted].mean()), rel=1e-5)
    # right padding with -100 labels at the padding: Hugging Face's own .loss (recomputed, not read: the rule does
    # not pass labels to the model)
    right = {"input_ids": ids[:2], "attention_mask": am[:2], "labels": ids[:2].masked_fill(am[:2] == 0, -100)}
    with torch.no_grad():
        own = hf(**right).loss
        assert float(losses.batch_loss(model, right)) == pytest.approx(float(own), rel=1e-6)
        # a (loss, logits) tuple and an output holding both: the logits are read
        for out in (hf(**right, return_dict=False), hf(**right)):
            assert torch.equal(losses.read_logits(out), hf(**right).logits)


def test_pair_losses_of_16_bit_models_are_computed_in_float32():
    g = torch.Generator().manual_seed(7)

    class Scores(torch.nn.Module):
        def __init__(self, dtype, out):
            super().__init__()
            self.lin = torch.nn.Linear(8, out).to(dtype)

        def forward(self, x):
            return self.lin(x.to(self.lin.weight.dtype)) * 30

    class PerPosition(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.emb = torch.nn.Embedding(V, 50).to(dtype)

        def forward(self, x):
            return self.emb(x) * 20

    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 50, (64,), generator=g)
        model = Scores(dtype, 50)
        with torch.no_grad():
            want = F.cross_entropy(model(x).double(), y, reduction="none")
            got = losses.sample_losses(model, (x, y))
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
            assert float(losses.batch_loss(model, (x, y))) == pytest.approx(float(want.mean()), rel=1e-6)
            assert float(default_loss_fn(model, (x, y))) == pytest.approx(float(want.mean()), rel=1e-6)
        xs, ys = torch.randint(0, V, (4, 9), generator=g), torch.randint(0, 50, (4, 9), generator=g)
        ys[1, 2] = -100
        seq = PerPosition(dtype)
        with torch.no_grad():
            want = F.cross_entropy(seq(xs).double().transpose(1, 2), ys, reduction="none")
            got, counted = losses.token_losses(seq, (xs, ys))
            torch.testing.assert_close(got.double()[counted], want[counted], rtol=1e-6, atol=1e-5)
            assert float(losses.batch_loss(seq, (xs, ys))) == pytest.approx(
                float(want[counted].mean()), rel=1e-6
            )
        # a regression whose outputs and targets are 16-bit: squared errors of 1e6 (inf in float16)
        reg = Scores(dtype, 1)
        yf = (torch.randn(64, generator=g) * 100 + 1000).to(dtype)
        with torch.no_grad():
            want = (reg(x).double().squeeze(-1) - yf.double()) ** 2
            got = losses.sample_losses(reg, (x, yf))
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)
            assert float(losses.batch_loss(reg, (x, yf))) == pytest.approx(float(want.mean()), rel=1e-6)


@pytest.mark.parametrize("bad", [-1, V])
def test_labels_outside_the_vocabulary_are_refused_naming_the_labels(bad):
    model = pp.hooked_hf(_llama())
    ids = torch.randint(0, V, (2, 6))
    labels = ids.clone()
    labels[1, 4] = bad  # a padding label of -1 instead of -100, or an id beyond the vocabulary
    batch = {"input_ids": ids, "labels": labels}
    for fn in (losses.token_losses, losses.sample_losses, losses.batch_loss, default_loss_fn):
        with pytest.raises(ValueError, match=rf"batch\['labels'\] contains {bad} .* -100"), torch.no_grad():
            fn(model, batch)
    # where the position does not count (padding), any label is fine
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        got, counted = losses.token_losses(model, batch | {"attention_mask": am})
    assert not bool(counted[1, 3:].any()) and bool(torch.isfinite(got[counted]).all())


def test_flag_training_and_measurements_refuse_a_task_longer_than_a_wrapped_models_positions():
    task = pp.TopicTask(num_topics=2, tokens_per_topic=6, num_shared=4, seq_len=12)
    cfg = transformers.GPT2Config(vocab_size=task.d_vocab, n_embd=32, n_layer=2, n_head=4, n_positions=8)
    model = pp.hooked_hf(transformers.GPT2LMHeadModel(cfg).eval())
    spec = pp.FlagSpec("blocks.1.hook_resid_pre", dims=(0, 1, 2, 3))
    said = r"the task's sequences have 12 tokens \(n_ctx=12\) but the model has 8 learned positions"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=said):
        pp.train_flags(model, task, spec, stage1_steps=1, stage2_steps=0, batch_size=2, quiet=True)
    with pytest.raises(ValueError, match=said):
        pp.probe_accuracy(model, task, spec, num_samples=4)
    with pytest.raises(ValueError, match=said):
        pp.flag_report(model, task, spec, num_samples=4, prompt_len=3, gen_steps=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

"""Generation from left-padded batches of prompts of different lengths (:func:`pypattern.flags.generate` with
``attention_mask``).

The independent reference is each prompt generated alone, unpadded: a row of the padded batch must continue with
the same tokens, and each step's logits at that row must equal the alone prompt's step logits (read from the
model's output by a forward hook). Hugging Face's own greedy ``generate`` on the raw model, given the same
left-padded batch and mask, must produce the same tokens. Steering ``positions`` are column indices of the padded
batch (as :func:`pypattern.steer` counts them, and as Hugging Face's ``generate`` under ``steer`` of a ``hooked_hf``
wrapper does). Right padding, bad masks, models that cannot take the mask and prompts too long for learned
positions are refused by name.
"""

import warnings

import pytest
import torch

import pypattern as pp
from pypattern.flags import generate
from pypattern.models import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40  # vocabulary
STEPS = 4  # generated tokens
N_POS = 12  # learned positions
PAD = 0  # the padding token id
# three prompts of 5, 2 and 4 real tokens, left-padded to 5 columns
PROMPTS = [[5, 9, 17, 3, 21], [11, 30], [7, 2, 26, 14]]
SPEC = pp.FlagSpec(
    "blocks.1.hook_resid_pre", dims=tuple(range(12)), num_concepts=2, on_value=6.0, off_value=-6.0
)


def _padded(prompts=PROMPTS, width=None):
    """Left-padded ids ``(batch, width)`` and their mask (1 at real tokens)."""
    width = max(len(p) for p in prompts) if width is None else width
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    am = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        am[i, width - len(p) :] = 1
    return ids, am


def _pp_model(pos: str) -> Transformer:
    cfg = TransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_mlp=48,
        d_vocab=V,
        n_ctx=N_POS,
        positional_embedding_type=pos,
        dtype=torch.float64,
        seed=3,
    )
    return Transformer(cfg).eval()


def _hf(arch: str) -> torch.nn.Module:
    T = transformers
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=N_POS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = T.GPT2LMHeadModel(cfg)
    else:
        cfg = T.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=N_POS,
        )
        model = T.LlamaForCausalLM(cfg)
    for c in (model.config, model.generation_config):
        c.bos_token_id = c.eos_token_id = None
        c.pad_token_id = PAD
    return model.double().eval()


def _model(kind: str):
    """(model for pypattern's generate, raw Hugging Face model or None)."""
    if kind in ("standard", "rotary"):
        return _pp_model(kind), None
    how, arch, *eager = kind.split("-")
    hf = _hf(arch)
    if eager:
        # eager attention in float64 makes NaN at the padding queries (a softmax over no key), which would reach the
        # real tokens; Hugging Face's own generate is compared on the default (sdpa) attention, same weights
        model = _hf(arch)
        model.set_attn_implementation("eager")
        return model, hf
    if how == "from_hf":
        return pp.from_hf(hf), hf
    if how == "hooked":
        return pp.hooked_hf(hf), hf
    return hf, hf


KINDS = [
    "standard",
    "rotary",
    "from_hf-gpt2",
    "from_hf-llama",
    "hooked-gpt2",
    "hooked-llama",
    "raw-llama",
    "raw-llama-eager",
]


class _StepLogits:
    """The last column's logits of every forward of ``model`` while open: ``(batch, steps, vocab)``."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __enter__(self):
        def grab(mod, args, out):
            logits = out if isinstance(out, torch.Tensor) else out.logits
            self.seen.append(logits[:, -1].detach().clone())

        self.handle = self.model.register_forward_hook(grab)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def logits(self) -> torch.Tensor:
        return torch.stack(self.seen, 1)


def _hf_generate(hf, ids, am):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(
            ids,
            attention_mask=am,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            pad_token_id=PAD,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_continues_as_its_prompt_alone(kind):
    model, hf = _model(kind)
    ids, am = _padded()
    width = ids.shape[1]
    with _StepLogits(model) as padded_steps:
        out = generate(model, ids, STEPS, greedy=True, attention_mask=am)
    assert out.shape == (len(PROMPTS), width + STEPS)
    assert torch.equal(out[:, :width], ids)  # the prompts, padding included, as given
    for i, p in enumerate(PROMPTS):
        with _StepLogits(model) as alone_steps:
            alone = generate(model, torch.tensor([p]), STEPS, greedy=True)
        assert torch.equal(out[i, width - len(p) :], alone[0])
        torch.testing.assert_close(
            padded_steps.logits[i].double(), alone_steps.logits[0].double(), rtol=1e-9, atol=1e-9
        )
    # the batch is really padded: without the mask the shorter rows continue otherwise
    assert not torch.equal(generate(model, ids, STEPS, greedy=True), out)
    if hf is not None:  # Hugging Face's own greedy generate of the same left-padded batch
        assert torch.equal(_hf_generate(hf, ids, am), out)


@pytest.mark.parametrize("kind", ["standard", "hooked-gpt2", "raw-gpt2"])
def test_a_padded_batch_longer_than_the_learned_positions(kind):
    """Each row's real tokens, not the padded width, must fit the learned positions: N_POS - STEPS real tokens in
    a batch of N_POS - STEPS + 2 columns (every row padded) continue as alone; one more is refused by name."""
    model, hf = _model(kind)
    n = N_POS - STEPS
    prompts = [list(range(1, n + 1)), [4, 8, 15]]
    ids, am = _padded(prompts, width=n + 2)
    out = generate(model, ids, STEPS, greedy=True, attention_mask=am)
    for i, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), STEPS, greedy=True)
        assert torch.equal(out[i, n + 2 - len(p) :], alone[0])
    if hf is not None:
        assert torch.equal(_hf_generate(hf, ids, am), out)
    too_long = [list(range(1, n + 2)), [4, 8, 15]]
    ids, am = _padded(too_long, width=n + 2)
    with pytest.raises(
        ValueError, match=rf"prompt row 0 has {n + 1} real tokens.*steps={STEPS}.*n_ctx={N_POS}"
    ):
        generate(model, ids, STEPS, greedy=True, attention_mask=am)


@pytest.mark.parametrize("kind", ["standard", "rotary", "from_hf-llama", "hooked-gpt2", "hooked-llama"])
def test_steering_every_position_continues_as_alone(kind):
    model, _ = _model(kind)
    ids, am = _padded()
    width = ids.shape[1]
    concept = torch.tensor([1, 0, 1])
    out = generate(model, ids, STEPS, SPEC, concept, greedy=True, attention_mask=am)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([p]), STEPS, SPEC, int(concept[i]), greedy=True)
        assert torch.equal(out[i, width - len(p) :], alone[0])
    # the steering changes the continuation
    assert not torch.equal(generate(model, ids, STEPS, greedy=True, attention_mask=am), out)


def _generated(model, ids, *args, **kw):
    """pypattern's greedy tokens and each step's last-column logits ``(batch, STEPS, vocab)``."""
    with _StepLogits(model) as steps:
        out = generate(model, ids, STEPS, *args, greedy=True, **kw)
    return out, steps.logits


@pytest.mark.parametrize("kind", ["standard", "from_hf-gpt2", "hooked-llama"])
def test_positions_count_the_columns_of_the_padded_batch(kind):
    """An int ``p`` steers columns >= p of every row (padding counted), i.e. a row padded by ``n`` from its own
    token ``p - n`` on, the row's mask shifted by its padding; the docstring's per-prompt mask steers each row from
    its own token ``k``, as the prompt alone with ``positions=k``. Tokens and each step's logits."""
    model, _ = _model(kind)
    ids, am = _padded()
    width = ids.shape[1]
    num_pad = (am == 0).sum(-1)
    concept = 1
    p = 3
    by_column, by_column_logits = _generated(model, ids, SPEC, concept, positions=p, attention_mask=am)
    for i, prompt in enumerate(PROMPTS):
        own = torch.arange(len(prompt) + STEPS) >= p - int(num_pad[i])  # the same columns, counted in the row
        alone, alone_logits = _generated(model, torch.tensor([prompt]), SPEC, concept, positions=own)
        assert torch.equal(by_column[i, width - len(prompt) :], alone[0])
        torch.testing.assert_close(by_column_logits[i], alone_logits[0], rtol=1e-9, atol=1e-9)
    k = p  # from own token p: row 0 (unpadded) as by column, the padded rows later
    mask = torch.arange(width + STEPS) >= (num_pad[:, None] + k)
    per_prompt, per_prompt_logits = _generated(model, ids, SPEC, concept, positions=mask, attention_mask=am)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_logits = _generated(model, torch.tensor([prompt]), SPEC, concept, positions=k)
        assert torch.equal(per_prompt[i, width - len(prompt) :], alone[0])
        torch.testing.assert_close(per_prompt_logits[i], alone_logits[0], rtol=1e-9, atol=1e-9)
    # the two rules steer different positions here (the unpadded row 0 alike)
    gap = (by_column_logits - per_prompt_logits).abs().amax((1, 2))
    assert gap[0] < 1e-9 and bool((gap[1:] > 1e-6).all())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_steered_positions_match_hugging_face_generate_under_steer(arch):
    """Hugging Face's greedy generate of the raw model under ``steer`` of its ``hooked_hf`` wrapper (with its
    key-value cache) continues the padded batch as pypattern's generate does, on the wrapper and on the
    converted model, for an int and a mask ``positions``."""
    hf = _hf(arch)
    hooked, converted = pp.hooked_hf(hf), pp.from_hf(hf)
    ids, am = _padded()
    mask = torch.zeros(ids.shape[1] + STEPS, dtype=torch.bool)
    mask[[1, 4, 6]] = True
    concept = torch.tensor([1, 0, 1])
    for positions in (3, mask):
        with pp.steer(hooked, SPEC, concept, positions=positions):
            theirs = _hf_generate(hf, ids, am)
        for model in (hooked, converted):
            ours = generate(
                model, ids, STEPS, SPEC, concept, positions=positions, greedy=True, attention_mask=am
            )
            assert torch.equal(ours, theirs)
        assert not torch.equal(theirs, _hf_generate(hf, ids, am))


def test_a_mask_without_padding_and_a_single_prompt():
    model = _pp_model("rotary")
    ids = torch.tensor([[5, 9, 17], [11, 30, 2]])
    plain = generate(model, ids, STEPS, greedy=True)
    for am in (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3)):
        assert torch.equal(generate(model, ids, STEPS, greedy=True, attention_mask=am), plain)
    one = generate(
        model, torch.tensor([0, 0, 5, 9]), STEPS, greedy=True, attention_mask=torch.tensor([0, 0, 1, 1])
    )
    assert torch.equal(one[0, 2:], generate(model, torch.tensor([5, 9]), STEPS, greedy=True)[0])


def test_bad_masks_are_refused_by_name():
    model = _pp_model("standard")
    ids = torch.tensor([[5, 9, 17], [11, 30, 2]])
    with pytest.raises(
        ValueError, match=r"attention_mask row 1 has padding after a real token \(column 2\).*left"
    ):
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask row 0 has padding after a real token \(column 1\)"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask row 1 is all padding"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask contains 2"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1], [0, 2, 1]]))
    with pytest.raises(ValueError, match="attention_mask contains nan"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1.0, 1, 1], [float("nan"), 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); give \(2, 3\)"):
        generate(model, ids, 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(
        ValueError, match=r"attention_mask has shape \(3,\); give \(3,\) or \(1, 3\)|shape \(2, 3\)"
    ):
        generate(model, ids[0], 2, attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="attention_mask has dtype"):
        generate(model, ids, 2, attention_mask=torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="attention_mask is a str"):
        generate(model, ids, 2, attention_mask="left")


class _NoMask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, 8)
        self.out = torch.nn.Linear(8, V)

    def forward(self, tokens):
        return self.out(self.embed(tokens))


class _MaskOnly(_NoMask):
    def forward(self, tokens, attention_mask=None):
        return self.out(self.embed(tokens))


def test_models_that_cannot_take_the_padding_are_refused():
    ids, am = _padded()
    for model, missing in ((_NoMask(), "attention_mask"), (_MaskOnly(), "position_ids")):
        with pytest.raises(ValueError, match=rf"attention_mask has padding.*forward takes no {missing}"):
            generate(model, ids, 2, greedy=True, attention_mask=am)
        # a mask without padding changes nothing
        full = torch.ones_like(ids)
        assert torch.equal(
            generate(model, ids, 2, greedy=True, attention_mask=full), generate(model, ids, 2, greedy=True)
        )

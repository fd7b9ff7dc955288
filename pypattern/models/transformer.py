"""A small causal transformer with TransformerLens' weight layout, parameter names and hook names.

Weights (TransformerLens layout): ``embed.W_E (d_vocab, d_model)``, ``pos_embed.W_pos (n_ctx, d_model)``,
``blocks.{l}.attn.W_Q/W_K/W_V (n_heads, d_model, d_head)``, ``W_O (n_heads, d_head, d_model)``,
``b_Q/b_K/b_V (n_heads, d_head)``, ``b_O (d_model,)``, ``blocks.{l}.mlp.W_in (d_model, d_mlp)``, ``b_in``,
``W_out (d_mlp, d_model)``, ``b_out``, ``blocks.{l}.ln1/ln2.w/b``, ``ln_final.w/b``, ``unembed.W_U
(d_model, d_vocab)``, ``b_U``.

Hook points (TransformerLens names): ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.ln1.hook_scale/hook_normalized``, ``blocks.{l}.attn.hook_q/hook_k/hook_v`` ``(batch, pos, n_heads,
d_head)``, ``blocks.{l}.attn.hook_attn_scores/hook_pattern`` ``(batch, n_heads, query_pos, key_pos)``,
``blocks.{l}.attn.hook_z`` ``(batch, pos, n_heads, d_head)``, ``blocks.{l}.hook_attn_out``,
``blocks.{l}.hook_resid_mid``, ``blocks.{l}.mlp.hook_pre/hook_post``, ``blocks.{l}.hook_mlp_out``,
``blocks.{l}.hook_resid_post``, ``ln_final.hook_scale/hook_normalized``. Attention-only models (``d_mlp`` None
or 0) have no ``ln2``, ``mlp``, ``hook_resid_mid`` or ``hook_mlp_out``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookedRootModule, HookPoint

__all__ = ["TransformerConfig", "Transformer", "component_masks", "list_components", "gelu_new"]

_ACT_FNS = ("gelu", "relu", "gelu_new")
_NORMS = ("LN", None)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def apply_act(x: torch.Tensor, act_fn: str) -> torch.Tensor:
    if act_fn == "gelu":
        return F.gelu(x)
    if act_fn == "relu":
        return F.relu(x)
    return gelu_new(x)


@dataclass
class TransformerConfig:
    """Shape and options of :class:`Transformer`.

    Parameters
    ----------
    n_layers, d_model, n_heads, d_head, d_vocab, n_ctx : int
        Sizes; ``d_head`` defaults to ``d_model // n_heads``.
    d_mlp : int or None
        Hidden width of the MLP; ``None`` or 0 makes an attention-only model.
    act_fn : {"gelu", "relu", "gelu_new"}
    normalization_type : {"LN", None}
    positional_embedding : bool
        Learned absolute positional embedding (``pos_embed.W_pos``) when True.
    dtype : torch.dtype
    seed : int or None
        Seed of the weight initialisation (normal, std ``init_range``; biases 0; LayerNorm weights 1).
    """

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = 256
    d_vocab: int = 64
    n_ctx: int = 32
    act_fn: str = "gelu"
    normalization_type: str | None = "LN"
    positional_embedding: bool = True
    dtype: torch.dtype = torch.float32
    seed: int | None = 0
    init_range: float | None = None
    ln_eps: float = 1e-5
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_head is None:
            self.d_head = self.d_model // self.n_heads
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"act_fn={self.act_fn!r} is not valid; choose one of {_ACT_FNS}")
        if self.normalization_type not in _NORMS:
            raise ValueError(
                f"normalization_type={self.normalization_type!r} is not valid; choose 'LN' or None"
            )
        for k in ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k}={v!r} is not valid; give a positive int")
        if self.init_range is None:
            self.init_range = 0.8 / math.sqrt(self.d_model)

    @property
    def attn_only(self) -> bool:
        return not self.d_mlp

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' names (``w``, ``b``, ``hook_scale``, ``hook_normalized``).

    Without a hook on ``hook_scale`` it runs torch's fused ``layer_norm`` (about 25% faster fwd+bwd of the whole
    model under ``vmap`` here); with one, the explicit form that computes the scale, to float rounding the same."""

    def __init__(self, d: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d, dtype=dtype))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hook_scale._fns:  # nothing reads or edits the scale: torch's fused kernel, then w and b
            return self.hook_normalized(
                torch.addcmul(self.b, F.layer_norm(x, x.shape[-1:], eps=self.eps), self.w)
            )
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


class Embed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_pos[: tokens.shape[-1]].unsqueeze(0).expand(tokens.shape[0], -1, -1)


class Unembed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab, dtype=cfg.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_U + self.b_U


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        H, d, dh, dt = cfg.n_heads, cfg.d_model, cfg.d_head, cfg.dtype
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(H, d, dh, dtype=dt))
        self.W_K = nn.Parameter(torch.empty(H, d, dh, dtype=dt))
        self.W_V = nn.Parameter(torch.empty(H, d, dh, dtype=dt))
        self.W_O = nn.Parameter(torch.empty(H, dh, d, dtype=dt))
        self.b_Q = nn.Parameter(torch.zeros(H, dh, dtype=dt))
        self.b_K = nn.Parameter(torch.zeros(H, dh, dtype=dt))
        self.b_V = nn.Parameter(torch.zeros(H, dh, dtype=dt))
        self.b_O = nn.Parameter(torch.zeros(d, dtype=dt))
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def proj(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``x (..., d_model)`` -> ``(..., n_heads, d_head)`` with one matmul."""
        H, d, dh = W.shape
        return (x @ W.permute(1, 0, 2).reshape(d, H * dh)).view(*x.shape[:-1], H, dh) + b

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor | None = None) -> torch.Tensor:
        kv_in = q_in if kv_in is None else kv_in
        q = self.hook_q(self.proj(q_in, self.W_Q, self.b_Q))
        k = self.hook_k(self.proj(kv_in, self.W_K, self.b_K))
        v = self.hook_v(self.proj(kv_in, self.W_V, self.b_V))
        T = q.shape[1]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.cfg.d_head)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = self.hook_attn_scores(scores.masked_fill(mask, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        H, dh, d = self.W_O.shape
        return z.reshape(*z.shape[:-2], H * dh) @ self.W_O.reshape(H * dh, d) + self.b_O


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, dtype=cfg.dtype))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, dtype=cfg.dtype))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(apply_act(pre, self.cfg.act_fn))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ln = cfg.normalization_type == "LN"
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.dtype) if ln else nn.Identity()
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.dtype) if ln else nn.Identity()
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        resid = resid + self.hook_attn_out(self.attn(self.ln1(resid)))
        if not self.cfg.attn_only:
            resid = self.hook_resid_mid(resid)
            resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)


class Transformer(HookedRootModule):
    """Causal decoder-only transformer with TransformerLens names (see the module docstring).

    Parameters
    ----------
    cfg : TransformerConfig or dict
        Its fields may also be given as keyword arguments.

    Examples
    --------
    >>> model = Transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=None, d_vocab=10, n_ctx=8))
    >>> logits, cache = model.run_with_cache(torch.zeros(1, 8, dtype=torch.long))
    >>> cache["blocks.1.attn.hook_pattern"].shape
    torch.Size([1, 4, 8, 8])
    """

    def __init__(self, cfg: TransformerConfig | dict | None = None, **kwargs) -> None:
        super().__init__()
        if cfg is None:
            cfg = TransformerConfig(**kwargs)
        elif isinstance(cfg, dict):
            cfg = TransformerConfig(**{**cfg, **kwargs})
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.positional_embedding:
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        if cfg.normalization_type == "LN":
            self.ln_final = LayerNorm(cfg.d_model, cfg.ln_eps, cfg.dtype)
        else:
            self.ln_final = nn.Identity()
        self.unembed = Unembed(cfg)
        self.init_weights(cfg.seed)
        self.setup_hooks()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, ``cfg.init_range``) for every weight matrix, zeros for biases, ones for LayerNorm weights."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("W_"):
                p.copy_(
                    torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * self.cfg.init_range
                )

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embedding (through ``hook_embed``/``hook_pos_embed``): ``(batch, pos, d_model)``."""
        x = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding:
            x = x + self.hook_pos_embed(self.pos_embed(tokens))
        return x

    def forward(
        self, tokens: torch.Tensor, return_type: str | None = "logits"
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Run the model on ``tokens (batch, pos)``.

        Parameters
        ----------
        return_type : {"logits", "loss", "per_token_loss", "both", None}
            ``"logits"``: ``(batch, pos, d_vocab)``; ``"loss"``: mean next-token cross-entropy (scalar);
            ``"per_token_loss"``: ``(batch, pos - 1)``; ``"both"``: ``(logits, loss)``; None: nothing.
        """
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ValueError(
                f"tokens has {tokens.shape[-1]} positions; the model's n_ctx is {self.cfg.n_ctx}"
            )
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.unembed(self.ln_final(x))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        per_tok = lm_cross_entropy(logits, tokens)
        if return_type == "per_token_loss":
            return per_tok
        if return_type == "loss":
            return per_tok.mean()
        if return_type == "both":
            return logits, per_tok.mean()
        raise ValueError(
            f"return_type={return_type!r} is not valid; choose 'logits', 'loss', 'per_token_loss', 'both' or None"
        )

    # ----- components -------------------------------------------------------------------------------------
    def components(self, heads: bool = True) -> list[str]:
        """Names accepted by :func:`component_masks` (see there)."""
        return list_components(self, heads=heads)

    def component_masks(self, component: str, all_params: bool = False) -> dict[str, torch.Tensor]:
        """See :func:`component_masks`."""
        return component_masks(self, component, all_params=all_params)


def lm_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position: ``(batch, pos - 1)``."""
    lp = torch.log_softmax(
        logits[:, :-1].float() if logits.dtype == torch.float16 else logits[:, :-1], dim=-1
    )
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


_HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def list_components(model: Transformer, heads: bool = True) -> list[str]:
    """Component names of ``model``: ``embed``, ``pos_embed``, ``blocks.{l}.attn`` (or ``blocks.{l}.attn.head.{h}``
    for every head when ``heads``), ``blocks.{l}.mlp``, ``unembed``."""
    cfg = model.cfg
    out = ["embed"] + (["pos_embed"] if cfg.positional_embedding else [])
    for layer in range(cfg.n_layers):
        if heads:
            out += [f"blocks.{layer}.attn.head.{h}" for h in range(cfg.n_heads)]
        else:
            out.append(f"blocks.{layer}.attn")
        if not cfg.attn_only:
            out.append(f"blocks.{layer}.mlp")
    return out + ["unembed"]


def component_masks(model: nn.Module, component: str, all_params: bool = False) -> dict[str, torch.Tensor]:
    """Boolean masks selecting one component's weights, for samplers that move only that component.

    Parameters
    ----------
    model : Transformer (or any module with TransformerLens parameter names)
    component : str
        ``"blocks.{l}.attn.head.{h}"`` (that head's slice of W_Q/W_K/W_V/W_O and b_Q/b_K/b_V; the shared
        ``b_O`` is not part of any head), ``"blocks.{l}.attn"``, ``"blocks.{l}.mlp"``, ``"blocks.{l}"``,
        ``"blocks.{l}.ln1"``/``"ln2"``, ``"embed"``, ``"pos_embed"``, ``"unembed"``, ``"ln_final"``, or any
        parameter-name prefix.
    all_params : bool
        If True, the dict has every parameter (all-False masks for those outside the component); otherwise only
        parameters with at least one selected entry.

    Returns
    -------
    dict[str, torch.Tensor]
        ``{param_name: bool tensor of the parameter's shape}``.
    """
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    m = re.fullmatch(r"(blocks\.\d+\.attn)\.head\.(\d+)", component)
    if m:
        prefix, h = m.group(1), int(m.group(2))
        n_heads = params[f"{prefix}.W_Q"].shape[0] if f"{prefix}.W_Q" in params else None
        if n_heads is None:
            raise ValueError(f"component={component!r}: the model has no parameter {prefix}.W_Q")
        if not 0 <= h < n_heads:
            raise ValueError(
                f"component={component!r}: head {h} is out of range; the layer has {n_heads} heads"
            )
        for pn in _HEAD_PARAMS:
            name = f"{prefix}.{pn}"
            if name in params:
                mask = torch.zeros_like(params[name], dtype=torch.bool)
                mask[h] = True
                masks[name] = mask
    else:
        sel = [n for n in params if n == component or n.startswith(component + ".")]
        if not sel:
            raise ValueError(
                f"component={component!r} matches no parameter; valid examples: 'blocks.0.attn.head.0', "
                f"'blocks.0.mlp', 'embed', 'unembed' (the model's parameters start {list(params)[:4]})"
            )
        masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in sel}
    if all_params:
        return {n: masks.get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()}
    return masks

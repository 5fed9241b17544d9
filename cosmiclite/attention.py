"""Decomposed cross-attention: capture M = Softmax(QK^T/sqrt(d)) (Sec. 4.1, Eq. 2) per token and per group (Sec. 4.3).

In every cross-attention layer (diffusers' `attn2`) the image features give the queries Q (one row per latent
cell) and the 77 text-token embeddings give the keys K. Row p of M says how cell p spreads its attention over
the 77 tokens (each row sums to 1). Column j of M, reshaped to the layer's grid, is token j's map m_j. CosmicMan
decomposes M by the caption groups of Sec. 4.2: group i owns the tokens [s_i, e_i), its per-token maps are
m_j for j in the span, and its group map is their mean (1/(e_i - s_i)) sum_j m_j, the second term of Eq. 3.

How it is captured: a diffusers attention processor (`CrossAttentionCapture`) is installed with
`unet.set_attn_processor` on the cross-attention layers only. At the resolutions asked for it computes
attention eagerly (matmul + softmax, then M @ V: the probabilities exist as a tensor, stored token-major as M^T)
and hands M to a store; at other resolutions it calls the layer's original processor. Self-attention keeps its
stock SDPA processor, which matters: eager self-attention (as Prompt-to-Prompt's store does) costs far more than
eager cross-attention, where 77 keys make it cheap (docs/results.md, Speed and memory). The model stays stock;
leaving the `capture_cross_attention` context puts the original processors back.

Two stores:
    mode="training"  keeps every recorded M in the autograd graph (per head, or the head mean), for HOLA (Eq. 3).
                     `store.maps()` -> {res: [ (B, H, res*res, 77) per layer ]} for the latest UNet forward
                     (views of M^T as computed: each token's map m_j is contiguous in memory).
    mode="inference" no grad; reduces as it goes: the head mean is added into one running sum per resolution
                     (mean over heads, layers and steps), or one per step when `per_step=True`, so memory is
                     O(res^2 x 77) after any number of steps (O(res^2 x groups) with `spans` and
                     keep_tokens=False), not O(steps x layers x heads x tokens).

Resolutions are keyed by the map's height in latent cells (the side, for square images). Defaults: the maps at
latent/4 and latent/2, i.e. 1/32 and 1/16 of the image side for SD 1.5 at 512 px (16 and 32) and SDXL at
1024 px (32 and 64), doubled while the coarser one is under 8 cells: the toy model's 16x16 latents (64 px,
VAE x4) give 8 and 16, since its 4x4 maps say little about a 64 px person.

Classifier-free guidance: StableDiffusionPipeline and StableDiffusionXLPipeline batch the UNet input as
[unconditional, conditional] (`torch.cat([negative_prompt_embeds, prompt_embeds])`), so with `guidance_batch=True` only
the second half of the batch is recorded: the maps are those of the prompt, not of the empty prompt.

But: maps of attention-mask-padded keys, IP-adapter or other joint-attention variants are not handled (SD/SDXL
text cross-attention only); training with gradient checkpointing records maps again during recomputation
(they are cleared at the next UNet forward).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

Span = tuple[int, int]


def default_resolutions(latent_side: int) -> tuple[int, int]:
    """The map sides recorded when none are asked for: (latent/4, latent/2), doubled until the coarser is >= 8.

    SD 1.5 at 512 px (latent 64) -> (16, 32); SDXL at 1024 px (latent 128) -> (32, 64); toy at 64 px
    (latent 16) -> (8, 16).
    """
    lo, hi = max(latent_side // 4, 1), max(latent_side // 2, 1)
    while lo < 8 and hi < latent_side:
        lo, hi = lo * 2, hi * 2
    return lo, hi


def grid_of(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with n_queries cells in a UNet run on latents of size latent_hw.

    Each UNet level halves the grid with a stride-2 conv (padding 1), i.e. h = ceil(H / 2^k).
    """
    H, W = latent_hw
    for k in range(8):
        h, w = math.ceil(H / 2 ** k), math.ceil(W / 2 ** k)
        if h * w == n_queries:
            return h, w
    raise ValueError(f"a cross-attention layer has {n_queries} queries, which is no downsampling of the "
                     f"{H}x{W} latent; is this a UNet2DConditionModel?")


def group_matrix(spans: Sequence[Span], n_tokens: int = 77, dtype=torch.float32, device=None) -> torch.Tensor:
    """A (n_tokens, G) matrix A with A[j, i] = 1/(e_i - s_i) for j in [s_i, e_i): M @ A = the group maps (Eq. 3)."""
    A = torch.zeros(n_tokens, len(spans), dtype=dtype, device=device)
    for i, (s, e) in enumerate(spans):
        if not 0 <= s < e <= n_tokens:
            raise ValueError(f"spans[{i}]={(s, e)} must satisfy 0 <= start < end <= {n_tokens} (half-open token "
                             f"span over input_ids, as cosmiclite.discretize gives)")
        A[s:e, i] = 1.0 / (e - s)
    return A


def group_maps(token_maps: torch.Tensor, spans: Sequence[Span], token_dim: int = -1) -> torch.Tensor:
    """m_(s_i,e_i) = (1/(e_i - s_i)) sum_{j in [s_i,e_i)} m_j: the group maps of Sec. 4.3 / Eq. 3's second term.

    token_maps holds the 77 tokens along `token_dim`; the result holds the G groups there instead. Works on
    training maps (differentiable) and on stored ones.
    """
    x = token_maps.movedim(token_dim, -1)
    out = x @ group_matrix(spans, x.shape[-1], x.dtype, x.device)
    return out.movedim(-1, token_dim)


def mass_in_mask(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Fraction of each map's attention mass inside its mask: sum_p m(p) h(p) / sum_p m(p).

    maps (..., G, h, w) non-negative (group or token maps), masks (G, h, w) in [0, 1] at the same size (e.g. a
    `cosmiclite.masks.MaskSet` at that resolution). Returns (..., G). A uniform map scores the mask's area
    fraction; a map entirely on the mask scores 1. HOLA (Eq. 3) should raise it.
    """
    if maps.shape[-3:] != masks.shape[-3:]:
        raise ValueError(f"maps of shape {tuple(maps.shape)} and masks of shape {tuple(masks.shape)} must agree in "
                         f"(groups, h, w); take the masks at the maps' resolution (mask_set(..., sizes=(res,)))")
    m = maps.float()
    return (m * masks.to(m)).sum((-1, -2)) / m.sum((-1, -2)).clamp_min(eps)


# ------------------------------------------------------------------------------------------------------- stores

class _Store:
    """What the processors report to. Knows the current latent size, step and timestep from a UNet pre-hook."""

    def __init__(self, resolutions: Sequence[int] | None, guidance_batch: bool):
        self.resolutions = tuple(resolutions) if resolutions is not None else None
        self.guidance_batch = guidance_batch   # the UNet batch is [uncond, cond]: record the cond half
        self.latent_hw: tuple[int, int] | None = None
        self.step = -1
        self.timesteps: list[float] = []
        self.seen: set[int] = set()  # resolutions of the cross-attention layers met, recorded or not

    def begin_forward(self, sample: torch.Tensor, timestep: Any) -> None:
        self.latent_hw = tuple(sample.shape[-2:])
        if self.resolutions is None:
            self.resolutions = default_resolutions(self.latent_hw[0])
        self.step += 1
        t = timestep.flatten()[0].item() if torch.is_tensor(timestep) else timestep
        self.timesteps.append(float(t))

    def wants(self, n_queries: int) -> tuple[int, int] | None:
        """The (h, w) grid if this layer's resolution is recorded, else None."""
        if self.latent_hw is None:
            return None  # called outside a UNet forward: nothing to key it by
        h, w = grid_of(n_queries, self.latent_hw)
        self.seen.add(h)
        return (h, w) if h in self.resolutions else None

    def check_recorded(self, recorded) -> None:
        if not recorded:
            raise ValueError(f"no map was recorded: resolutions={self.resolutions} but this UNet's cross-attention "
                             f"layers ran at {sorted(self.seen) or 'no resolution (was the UNet called?)'}; "
                             f"pass resolutions from those")

    def record(self, name: str, probs_t: torch.Tensor, hw: tuple[int, int]) -> None:
        """Receive one layer's M as computed, token-major: M^T (b, heads, 77, h*w) on a (h, w) grid (the cond
        half only, under CFG)."""
        raise NotImplementedError


class TrainingStore(_Store):
    """Keeps every recorded M of the latest UNet forward in the autograd graph (for HOLA, Eq. 3).

    head_mean: average over heads (shape (B, 1, N, 77)) or keep them (B, heads, N, 77).
    """

    def __init__(self, resolutions=None, guidance_batch=False, head_mean: bool = False):
        super().__init__(resolutions, guidance_batch)
        self.head_mean = head_mean
        self._maps: dict[int, list[torch.Tensor]] = {}
        self.layers: dict[int, list[str]] = {}
        self.grids: dict[int, tuple[int, int]] = {}

    def begin_forward(self, sample, timestep) -> None:
        super().begin_forward(sample, timestep)
        self._maps, self.layers = {}, {}  # a new forward: the previous one's maps are no longer wanted

    def record(self, name, probs_t, hw) -> None:
        m = probs_t
        if self.head_mean:
            m = m.mean(1, keepdim=True)
        self._maps.setdefault(hw[0], []).append(m)
        self.layers.setdefault(hw[0], []).append(name)
        self.grids[hw[0]] = hw

    def maps(self) -> dict[int, list[torch.Tensor]]:
        """{res: [M of each recorded layer, (B, H, h*w, 77)]} from the latest UNet forward, differentiable: what
        `hola_terms` reads. Views of M^T as the attention computed it, so each token's map is a row in memory."""
        self.check_recorded(self._maps)
        return {r: [m.mT for m in ms] for r, ms in self._maps.items()}

    def token_maps(self) -> dict[int, torch.Tensor]:
        """{res: (B, 77, h, w)}: mean over the layers and heads at each resolution, as images (differentiable)."""
        out = {}
        for r, ms in self._maps.items():
            m = torch.stack([x.mean(1) for x in ms]).mean(0)  # (B, 77, N)
            out[r] = m.unflatten(-1, self.grids[r])
        return out


class InferenceStore(_Store):
    """Reduces maps as they come (no grad): running head/layer(/step) means, memory independent of the run length.

    per_step: keep one mean per UNet forward (denoising step) instead of one over all steps.
    spans: group spans, for `group_maps()`; with keep_tokens=False only group maps are accumulated (O(G x res^2)).
    """

    def __init__(self, resolutions=None, guidance_batch=False, per_step: bool = False,
                 spans: Sequence[Span] | None = None, keep_tokens: bool = True):
        super().__init__(resolutions, guidance_batch)
        if spans is None and not keep_tokens:
            raise ValueError("keep_tokens=False needs spans: without groups nothing would be kept")
        self.per_step, self.spans, self.keep_tokens = per_step, list(spans) if spans else None, keep_tokens
        self._A: torch.Tensor | None = None
        # per resolution: list (one entry per step, or a single entry) of [token_sum, group_sum, n_layers]
        self._acc: dict[int, list[list[Any]]] = {}
        self.grids: dict[int, tuple[int, int]] = {}

    @torch.no_grad()
    def record(self, name, probs_t, hw) -> None:
        m = probs_t.detach().float().mean(1)  # (b, 77, N): the mean over heads, token-major as computed
        slots = self._acc.setdefault(hw[0], [])
        self.grids[hw[0]] = hw
        i = self.step if self.per_step else 0
        while len(slots) <= i:
            slots.append([None, None, 0])
        slot = slots[i]
        if self.keep_tokens:  # group maps are linear in the token maps: they are taken at the end
            slot[0] = m if slot[0] is None else slot[0].add_(m)
        else:
            if self._A is None or self._A.device != m.device:
                self._A = group_matrix(self.spans, m.shape[1], device=m.device)
            g = self._A.T @ m                  # (b, G, N)
            slot[1] = g if slot[1] is None else slot[1].add_(g)
        slot[2] += 1

    def _stack(self, res: int, k: int) -> torch.Tensor:
        slots = [s for s in self._acc[res] if s[2]]
        x = torch.stack([s[k] / s[2] for s in slots])  # (T, b, C, N)
        return x.unflatten(-1, self.grids[res])  # (T, b, C, h, w)

    def token_maps(self) -> dict[int, torch.Tensor]:
        """{res: (T, b, 77, h, w)}, T = steps if per_step else 1: mean over heads, layers (and steps)."""
        if not self.keep_tokens:
            raise ValueError("token maps were not kept (keep_tokens=False)")
        self.check_recorded(self._acc)
        return {r: self._stack(r, 0) for r in self._acc}

    def group_maps(self) -> dict[int, torch.Tensor]:
        """{res: (T, b, G, h, w)}: group maps m_(s_i,e_i) in the order of `spans`."""
        if self.spans is None:
            raise ValueError("no spans were given to the store; pass spans=... or use group_maps(token_maps, spans)")
        if self.keep_tokens:
            return {r: group_maps(m, self.spans, token_dim=2) for r, m in self.token_maps().items()}
        self.check_recorded(self._acc)
        return {r: self._stack(r, 1) for r in self._acc}

    def nbytes(self) -> int:
        """Bytes held by the accumulators: the memory the capture keeps (constant in steps unless per_step)."""
        return sum(t.numel() * t.element_size() for slots in self._acc.values() for s in slots for t in s[:2]
                   if t is not None)


# --------------------------------------------------------------------------------------------------- processor

class CrossAttentionCapture:
    """Attention processor for a cross-attention layer: Eq. 2 computed eagerly where recorded, stock elsewhere.

    The eager path computes what diffusers' classic `AttnProcessor` does (scores, softmax, M @ V; the same
    upcasting and attention-mask rules), on (B, heads, tokens, d) views instead of copies, and hands the
    probabilities M to the store before they multiply V. Under CFG the unconditional half, whose maps are
    not wanted, goes through fused SDPA instead.
    """

    def __init__(self, name: str, store: _Store, fallback: Callable):
        self.name, self.store, self.fallback = name, store, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        hw = None
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            hw = self.store.wants(hidden_states.shape[1])
        if hw is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch, n_keys, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, n_keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        heads = attn.heads
        # (B, heads, tokens, d) views: no copies before the matmuls (diffusers' head_to_batch_dim copies thrice)
        Q = attn.to_q(hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)
        K = attn.to_k(encoder_hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)
        V = attn.to_v(encoder_hidden_states).unflatten(-1, (heads, -1)).transpose(1, 2)
        mask = None if attention_mask is None else attention_mask.unflatten(0, (batch, heads))
        # Classifier-free guidance: the batch is [uncond, cond] and only the conditional half's maps are kept,
        # so only that half is computed in the open; the unconditional half stays on fused SDPA.
        c0 = 0
        if self.store.guidance_batch:
            if batch % 2:
                raise ValueError(f"guidance_batch=True but the UNet batch has odd size {batch}; guidance batches "
                                 f"are [uncond, cond] halves (pass guidance_batch=False without guidance)")
            c0 = batch // 2
        outs = []
        if c0:
            outs.append(F.scaled_dot_product_attention(Q[:c0], K[:c0], V[:c0], scale=attn.scale,
                                                       attn_mask=None if mask is None else mask[:c0]))
        Q, K, V = Q[c0:], K[c0:], V[c0:]
        dtype = Q.dtype
        if attn.upcast_attention:
            Q, K = Q.float(), K.float()
        # Computed token-major, S^T = K Q^T (b, heads, 77, N): each token's map m_j is then a contiguous row, which
        # is what the loss reads (HOLA's sums and maxima over pixels run ~3-8x faster along rows than down columns
        # on CPU). The same cost as Q K^T here; the store gets M^T as computed (its maps() are transposed views).
        Ks = K * attn.scale
        St = Ks @ Q.transpose(-1, -2)                                  # (Q K^T / sqrt(d))^T: (b, heads, 77, N)
        if mask is not None:
            St = St + mask[c0:].transpose(-1, -2)
        if attn.upcast_softmax:
            St = St.float()
        Mt = St.softmax(dim=-2).to(dtype)                              # Eq. 2: M = Softmax(Q K^T / sqrt(d)), as M^T
        self.store.record(self.name, Mt, hw)
        outs.append((V.transpose(-1, -2) @ Mt).transpose(-1, -2))      # M V, as (V^T M^T)^T: M's gradient token-major

        out = (torch.cat(outs) if c0 else outs[0]).transpose(1, 2).flatten(2)  # (B, N, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))                      # linear projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention processors (the `attn2` of every transformer block)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextmanager
def capture_cross_attention(unet, mode: str = "inference", resolutions: Sequence[int] | None = None, *,
                            guidance_batch: bool = False, head_mean: bool = False, per_step: bool = False,
                            spans: Sequence[Span] | None = None, keep_tokens: bool = True,
                            layers: Callable[[str], bool] | None = None) -> Iterator[_Store]:
    """Install `CrossAttentionCapture` on the UNet's cross-attention layers; restore the processors on exit.

        with capture_cross_attention(unet, "training", resolutions=(8, 16)) as store:
            noise_pred = unet(z_t, t, c).sample
            maps = store.maps()           # {8: [(B, heads, 64, 77), ...], 16: [(B, heads, 256, 77), ...]}

    mode: "training" (TrainingStore, maps in the graph, `head_mean` to average heads) or "inference"
        (InferenceStore: `per_step`, `spans`, `keep_tokens`).
    resolutions: map heights to record (None: `default_resolutions` of the latent size).
    guidance_batch: the UNet batch is [uncond, cond] (diffusers' SD/SDXL pipelines with guidance_scale > 1): keep
        the cond half.
    layers: optional filter on processor names, e.g. `lambda n: n.startswith("up_blocks")`.
    """
    if mode == "training":
        store: _Store = TrainingStore(resolutions, guidance_batch, head_mean=head_mean)
    elif mode == "inference":
        store = InferenceStore(resolutions, guidance_batch, per_step=per_step, spans=spans, keep_tokens=keep_tokens)
    else:
        raise ValueError(f"mode={mode!r}; use 'training' (maps in the autograd graph) or 'inference' (reduced)")

    original = unet.attn_processors  # {name: processor}, a fresh dict
    chosen = [n for n in cross_attention_layers(unet) if layers is None or layers(n)]
    if not chosen:
        raise ValueError("no cross-attention layer selected: the UNet has no attn2 layers or `layers` rejects all")
    procs = dict(original)
    for n in chosen:
        procs[n] = CrossAttentionCapture(n, store, original[n])

    def pre_hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        store.begin_forward(sample, timestep)

    unet.set_attn_processor(dict(procs))  # a copy: set_attn_processor pops the entries of the dict it is given
    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()
        unet.set_attn_processor(dict(original))


# ---------------------------------------------------------------------------------------- generation + result

@dataclass
class AttentionResult:
    """Maps captured while generating one image: per resolution, per step (or averaged), per token and group.

    token_maps: {res: (T, 77, h, w)}; group_maps: {res: (T, G, h, w)} in the order of `groups`; T = number of
    denoising steps when per_step, else 1 (mean over all steps). Each map is a mean over heads and layers of
    softmax rows, so at every cell the 77 token values sum to 1.
    """
    prompt: str
    tokens: list[str]                      # token strings of positions 0..n-1 (start token ... end token)
    groups: list[tuple[str, Span]]         # (group name, token span)
    timesteps: list[float]                 # the step's timestep for each T entry (their mean when averaged)
    token_maps: dict[int, torch.Tensor]
    group_maps: dict[int, torch.Tensor]
    image: Any = None                      # np.uint8 (H, W, 3)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def resolutions(self) -> list[int]:
        return sorted(self.token_maps or self.group_maps)

    @property
    def group_names(self) -> list[str]:
        return [g for g, _ in self.groups]

    def group_map(self, name: str, res: int | None = None, step: int | None = None) -> torch.Tensor:
        """(h, w) map of one group at one resolution; step None = mean over the stored steps."""
        names = self.group_names
        if name not in names:
            raise KeyError(f"group {name!r} is not in this result; it has {names}")
        res = res if res is not None else self.resolutions[-1]
        x = self.group_maps[res][:, names.index(name)]
        return x.mean(0) if step is None else x[step]

    def mass_in_masks(self, mask_set) -> dict[int, dict[str, torch.Tensor]]:
        """{res: {group: (T,) fraction of the group map's mass inside its mask}} for groups that have a mask.

        mask_set: a `cosmiclite.masks.MaskSet` (names, masks {size: (G, s, s)}, present) holding these sizes.
        """
        out: dict[int, dict[str, torch.Tensor]] = {}
        for res in self.resolutions:
            if res not in mask_set.masks:
                raise ValueError(f"the mask set has no {res}x{res} masks; build it with sizes including {res}")
            masks = mask_set.masks[res]
            out[res] = {}
            for gi, name in enumerate(self.group_names):
                if name in mask_set.names:
                    k = list(mask_set.names).index(name)
                    m = self.group_maps[res][:, gi:gi + 1]
                    out[res][name] = mass_in_mask(m, masks[k:k + 1])[:, 0]
        return out

    def tensors(self, per_token: bool = True) -> dict[str, torch.Tensor]:
        """Flat, documented tensor names for safetensors:

        group/<name>/res<r>   (T, h, w) float32   group map m_(s_i,e_i)
        tokens/res<r>         (T, n, h, w) float32  maps of tokens 0..n-1 (n = up to the end token), per_token
        timesteps             (T,) float32
        image                 (H, W, 3) uint8, when there is an image
        """
        out: dict[str, torch.Tensor] = {"timesteps": torch.tensor(self.timesteps, dtype=torch.float32)}
        for r in self.resolutions:
            if self.group_maps:
                for gi, name in enumerate(self.group_names):
                    out[f"group/{name}/res{r}"] = self.group_maps[r][:, gi].float().contiguous()
            if per_token and self.token_maps:
                out[f"tokens/res{r}"] = self.token_maps[r][:, :len(self.tokens)].float().contiguous()
        if self.image is not None:
            out["image"] = torch.as_tensor(self.image).contiguous()
        return out

    def save(self, path: str | Path, per_token: bool = True) -> Path:
        """Write the maps as safetensors; prompt, tokens, groups and meta go in the header's metadata (JSON)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"prompt": self.prompt, "tokens": json.dumps(self.tokens),
                "groups": json.dumps([[g, list(s)] for g, s in self.groups]), "meta": json.dumps(self.meta),
                "format": "cosmiclite.attention/1"}
        save_file(self.tensors(per_token), str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionResult":
        """Read a file written by `save`."""
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("format") != "cosmiclite.attention/1":
                raise ValueError(f"{path} is not an attention file written by cosmiclite (metadata 'format')")
            t = {k: f.get_tensor(k) for k in f.keys()}
        groups = [(g, tuple(s)) for g, s in json.loads(md["groups"])]
        res = sorted({int(k.rsplit("res", 1)[1]) for k in t if "/res" in k})
        gmaps = {r: torch.stack([t[f"group/{g}/res{r}"] for g, _ in groups], 1) for r in res} if groups else {}
        tmaps = {r: t[f"tokens/res{r}"] for r in res if f"tokens/res{r}" in t}
        img = t["image"].numpy() if "image" in t else None
        return cls(md["prompt"], json.loads(md["tokens"]), groups, t["timesteps"].tolist(), tmaps, gmaps, img,
                   json.loads(md.get("meta", "{}")))


def token_strings(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Readable token strings up to and including the first end token ("</w>" word ends stripped)."""
    ids = list(input_ids)
    end = tokenizer.eos_token_id
    n = ids.index(end, 1) + 1 if end in ids[1:] else len(ids)
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids[:n])]


def generate_with_attention(pipe, prompt: str, spans: Sequence[tuple[str, Span]] = (), *, steps: int = 25,
                            seed: int = 0, guidance_scale: float = 7.5, per_step: bool = False,
                            resolutions: Sequence[int] | None = None, height: int | None = None,
                            width: int | None = None, negative_prompt: str | None = None) -> AttentionResult:
    """Generate one image with `pipe` (SD or SDXL pipeline) and capture its cross-attention maps.

    spans: (group name, (s, e)) token spans of the prompt, e.g. from `cosmiclite.discretize` (`Discretized.groups`).
    Returns an AttentionResult with the image, token maps and group maps (mean over heads and layers; over
    steps too unless per_step).
    """
    guided = guidance_scale > 1.0  # diffusers' own test for classifier-free guidance (SD/SDXL without a guidance embed)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True).input_ids
    generator = torch.Generator("cpu").manual_seed(seed)
    with capture_cross_attention(pipe.unet, "inference", resolutions, guidance_batch=guided, per_step=per_step,
                                 spans=[s for _, s in spans] or None) as store:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                   height=height, width=width, negative_prompt=negative_prompt, output_type="np")
    image = (out.images[0] * 255).round().clip(0, 255).astype("uint8")
    tmaps = {r: m[:, 0].cpu() for r, m in store.token_maps().items()}
    gmaps = {r: m[:, 0].cpu() for r, m in store.group_maps().items()} if spans else {}
    ts = store.timesteps if per_step else [sum(store.timesteps) / max(len(store.timesteps), 1)]
    meta = dict(steps=steps, seed=seed, guidance_scale=guidance_scale, per_step=per_step,
                resolutions=list(store.resolutions or ()), all_timesteps=store.timesteps)
    return AttentionResult(prompt, token_strings(pipe.tokenizer, ids), [(g, tuple(s)) for g, s in spans], ts,
                           tmaps, gmaps, image, meta)

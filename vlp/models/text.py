"""open_clip's text tower, computed by vlp: over the padded context or packed, with or without a text prefix.

These are functions of an open_clip ``CLIP`` (its modules and weights, never its ``forward`` or ``encode_text``),
so what the training step runs does not depend on how open_clip's own methods call each other.

**Packed.** A CLIP text tower attends causally and pools the end-of-text token (the largest id: open_clip's
``argmax`` pooling), so positions after a caption's end-of-text never change its embedding, yet open_clip computes
them. Flickr8k captions fill about 14 of a 24-token context. :func:`encode_packed` runs the layer norms,
projections and MLPs on the caption tokens only (one row per token of the whole batch); attention, which needs
the grid, scatters the packed rows into it and gathers them back. Same parameters, same result up to rounding.
Where the rows go depends on the captions' lengths; the trainer works that out on the host (:func:`packing_plan`
on the host's tokens), so the forward reads nothing back from an accelerator.

Every gather in the packed path reads each source row at most once in the forward (the embedding grid is built
whole, then rows are picked), so the backward scatters without collisions and a multi-threaded CPU run is
repeatable: a gather with repeated indices (``positional_embedding[rows % length]``) accumulates its gradient in
an order that varies between runs.

**Prefix** (Saito et al., "Prefix Conditioning Unifies Language and Label Supervision", CVPR 2023). P learned
vectors, chosen by the text's kind, take positions 1..P, right after the start token; the caption's tokens move P
places to the right (:func:`shift_tokens`). The context keeps its length, so a caption that no longer fits loses
its last words and keeps its end-of-text token in the last position, as open_clip's tokenizer truncates. The
positional embeddings, the causal mask and end-of-text pooling then apply unchanged, packed or padded.
"""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


@dataclass
class PackingPlan:
    """Where the packed rows of a batch of token rows sit in the (rows x ``length``) grid."""
    length: int  # grid length: every later position is padding in every row
    rows: torch.Tensor  # packed row -> flat position in the grid
    last: torch.Tensor  # each token row's end-of-text position

    def to(self, device: torch.device, non_blocking: bool = False) -> "PackingPlan":
        return PackingPlan(self.length, self.rows.to(device, non_blocking=non_blocking),
                           self.last.to(device, non_blocking=non_blocking))


def packing_plan(tokens: torch.Tensor) -> PackingPlan:
    last = tokens.argmax(dim=-1)  # the end-of-text position open_clip pools
    length = int(last.max()) + 1
    keep = (torch.arange(length, device=tokens.device) <= last[:, None]).flatten()
    return PackingPlan(length, keep.nonzero().squeeze(1), last)


def why_not_packed(clip: torch.nn.Module) -> str | None:
    """None if :func:`encode_packed` computes what ``clip.encode_text`` does, else the reason it may not."""
    reason = why_not_own_tower(clip)
    if reason:
        return reason
    tower = clip.transformer
    if tower.grad_checkpointing:
        return "gradient checkpointing"
    for block in tower.resblocks:
        attn = getattr(block, "attn", None)
        if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
                or not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.add_zero_attn or attn.dropout or not attn.batch_first):
            return "a text block other than open_clip's default ResidualAttentionBlock"
    return None


def why_not_own_tower(clip: torch.nn.Module) -> str | None:
    """None if vlp can compute ``clip``'s text tower itself (padded, with a prefix), else the reason."""
    if type(clip) is not open_clip.CLIP:
        return f"{type(clip).__name__} is not open_clip's CLIP with its built-in text tower"
    if clip.text_pool_type != "argmax" or clip.attn_mask is None:
        return f"text pooling {clip.text_pool_type!r} without a causal mask (vlp's tower needs argmax pooling)"
    if not clip.transformer.batch_first:
        return "a sequence-first text tower"
    return None


def shift_tokens(tokens: torch.Tensor, places: int) -> torch.Tensor:
    """Token rows with ``places`` free positions (id 0) after the start token and the rest moved right; a row that
    no longer fits is cut and keeps its end-of-text token in the last position."""
    if places == 0:
        return tokens
    n, length = tokens.shape
    if places >= length - 2:
        raise ValueError(f"a prefix of {places} leaves no room for text in a context of {length}")
    out = torch.zeros_like(tokens)
    out[:, 0] = tokens[:, 0]
    out[:, 1 + places:] = tokens[:, 1:length - places]
    last = tokens.argmax(dim=-1)
    cut = last + places >= length
    if bool(cut.any()):
        out[cut, length - 1] = tokens[cut, last[cut]]
    return out


def embed(clip: open_clip.CLIP, tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Token plus positional embeddings, (rows, length, width) for the ``length`` first positions of ``tokens``;
    ``prefix`` (rows, P, width), if given, replaces the embeddings of positions 1..P (tokens already shifted)."""
    cast = clip.transformer.get_cast_dtype()
    length = tokens.shape[1]
    x = clip.token_embedding(tokens).to(cast)
    if prefix is not None:
        places = prefix.shape[1]
        slots = torch.zeros(1, length, 1, dtype=torch.bool, device=x.device)
        slots[:, 1:1 + places] = True
        x = torch.where(slots, F.pad(prefix.to(cast), (0, 0, 1, length - 1 - places)), x)
    return x + clip.positional_embedding[:length].to(cast)


def _project(clip: open_clip.CLIP, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, torch.nn.Linear) else x @ clip.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def encode_padded(clip: open_clip.CLIP, tokens: torch.Tensor, prefix: torch.Tensor | None = None,
                  normalize: bool = False) -> torch.Tensor:
    """``clip.encode_text`` over the whole context, the prefix inserted (tokens already shifted)."""
    x = clip.transformer(embed(clip, tokens, prefix), attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return _project(clip, x, normalize)


def encode_packed(clip: open_clip.CLIP, tokens: torch.Tensor, plan: PackingPlan | None = None,
                  prefix: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """``clip.encode_text`` over each row's tokens up to its end-of-text token (tokens already shifted where a
    prefix is given); ``plan`` from the host's tokens, or worked out here."""
    plan = plan or packing_plan(tokens)
    batch, length, rows = tokens.shape[0], plan.length, plan.rows
    x = embed(clip, tokens[:, :length], prefix).flatten(0, 1)[rows]
    for block in clip.transformer.resblocks:
        attn = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        grid = qkv.new_zeros(batch * length, 3 * width).index_copy(0, rows, qkv)
        q, k, v = grid.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # padding rows come after: never attended
        out = out.transpose(1, 2).reshape(batch * length, width)[rows]
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = clip.ln_final(x[torch.cumsum(plan.last + 1, 0) - 1])  # each row's end-of-text row
    return _project(clip, x, normalize)

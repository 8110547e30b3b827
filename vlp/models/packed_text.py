"""open_clip's text tower computed over each caption's tokens only, packed, instead of the padded context.

A CLIP text tower attends causally and pools the end-of-text token (the largest id, open_clip's ``argmax``
pooling), so the positions after a caption's end-of-text never change its embedding: open_clip still computes
them. Flickr8k captions fill about 14 of a 24-token context, so most of the linear layers' work goes to padding.
``encode_text_packed`` runs the embedding, layer norms, projections and MLPs on the caption tokens only (one row
per token of the whole batch); attention, which needs the grid, scatters the packed rows into it and gathers
them back. Same parameters, same result up to rounding; the model keeps its modules and state dict.

Where the rows go depends on the captions' lengths, which the forward would have to read back from an
accelerator (twice, each a wait for the queued work). A trainer that still holds the tokens on the host computes
the plan there (:func:`attach_plan`) and the tensor it hands the model carries it.
"""
from __future__ import annotations

import types

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


def why_not_packed(model: torch.nn.Module) -> str | None:
    """None if ``encode_text_packed`` computes what ``model.encode_text`` does, else the reason it may not."""
    if type(model) is not open_clip.CLIP:
        return f"{type(model).__name__} is not open_clip's CLIP with its built-in text tower"
    if model.text_pool_type != "argmax" or model.attn_mask is None:
        return f"text pooling {model.text_pool_type!r} without a causal mask (packing needs argmax pooling)"
    tower = model.transformer
    if not tower.batch_first or tower.grad_checkpointing:
        return "gradient checkpointing or a sequence-first text tower"
    for block in tower.resblocks:
        attn = getattr(block, "attn", None)
        if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
                or not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.add_zero_attn or attn.dropout or not attn.batch_first):
            return "a text block other than open_clip's default ResidualAttentionBlock"
    return None


def packing_plan(text: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(grid length, packed row -> position in the (batch x length) grid, each caption's end-of-text position)."""
    last = text.argmax(dim=-1)  # the end-of-text position open_clip pools
    length = int(last.max()) + 1  # later positions are padding in every caption
    keep = (torch.arange(length, device=text.device) <= last[:, None]).flatten()
    return length, keep.nonzero().squeeze(1), last


def attach_plan(host_text: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``text`` (``host_text`` copied to its device) carrying the packing plan worked out on the host, so the packed
    forward reads nothing back from the device. Returns ``text``."""
    length, rows, last = packing_plan(host_text)
    text.vlp_packing_plan = (length, rows.to(text.device, non_blocking=True), last.to(text.device, non_blocking=True))
    return text


def encode_text_packed(self: open_clip.CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``open_clip.CLIP.encode_text`` over the tokens up to each caption's end-of-text token (bound to a model by
    ``pack_text``); the plan comes with ``text`` (:func:`attach_plan`) or is worked out here."""
    batch = text.shape[0]
    length, rows, last = getattr(text, "vlp_packing_plan", None) or packing_plan(text)
    cast = self.transformer.get_cast_dtype()
    x = self.token_embedding(text[:, :length].flatten()[rows]).to(cast)
    x = x + self.positional_embedding[rows % length].to(cast)
    for block in self.transformer.resblocks:
        attn = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        grid = qkv.new_zeros(batch * length, 3 * width).index_copy(0, rows, qkv)
        q, k, v = grid.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # padding rows come after: never attended
        out = out.transpose(1, 2).reshape(batch * length, width)[rows]
        x = x + block.ls_1(attn.out_proj(out))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = self.ln_final(x[torch.cumsum(last + 1, 0) - 1])  # each caption's end-of-text row
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def is_packed(model: torch.nn.Module) -> bool:
    return getattr(model.__dict__.get("encode_text"), "__func__", None) is encode_text_packed


def pack_text(model: torch.nn.Module) -> str | None:
    """Make ``model.encode_text`` (and so its forward) the packed computation where that is exact. Returns None
    when packed, else the reason it was left as it is."""
    reason = why_not_packed(model)
    if reason is None:
        model.encode_text = types.MethodType(encode_text_packed, model)
    return reason

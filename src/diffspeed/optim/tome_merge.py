"""Token merging by bipartite soft matching with 2-D strided destinations (Bolya and Hoffman 2023, "Token
Merging for Fast Stable Diffusion", section 3-4): the tensor algorithm, apart from the model surgery in
:mod:`diffspeed.optim.tome`.

The h x w tokens are split into destinations -- one per ``sy`` x ``sx`` window, at a random place inside it --
and sources (the rest). Each source finds its most similar destination (cosine similarity of the tokens);
the ``r`` sources with the highest similarity are averaged into their destinations and dropped, so the
attention that follows sees ``N - r`` tokens. Unmerging copies each destination's result back to the
sources merged into it.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffspeed._lazy import lazy_import

torch = lazy_import("torch")


@dataclass
class Merge:
    """What :func:`unmerge` needs to put ``N - r`` outputs back on ``N`` tokens."""

    src_idx: torch.Tensor  # (B, N_src) positions of the source tokens in the full sequence
    dst_idx: torch.Tensor  # (N_dst,) positions of the destination tokens
    unm: torch.Tensor  # (B, N_src - r) indices (into the sources) of sources kept
    merged: torch.Tensor  # (B, r) indices (into the sources) of sources merged
    into: torch.Tensor  # (B, r) index (into the destinations) each merged source went to
    n: int


def partition(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A boolean (h*w,) map of destination tokens: one per sy x sx window (random place with ``generator``,
    the window's first token without); rows and columns past the last full window are all sources."""
    hs, ws = h // sy, w // sx
    if generator is not None:
        pick = torch.randint(sy * sx, (hs, ws), generator=generator, device=generator.device).to(device)
    else:
        pick = torch.zeros(hs, ws, dtype=torch.long, device=device)
    window = torch.zeros(hs, ws, sy * sx, dtype=torch.bool, device=device)
    window.scatter_(2, pick[..., None], True)
    window = window.view(hs, ws, sy, sx).permute(0, 2, 1, 3).reshape(hs * sy, ws * sx)
    full = torch.zeros(h, w, dtype=torch.bool, device=device)
    full[:hs * sy, :ws * sx] = window
    return full.flatten()


def bipartite_merge(x: torch.Tensor, is_dst: torch.Tensor, r: int) -> tuple[torch.Tensor, Merge]:
    """Merge the ``r`` most redundant source tokens of ``x`` (B, N, C) into destinations; returns the
    (B, N - r, C) tokens -- kept sources first, then destinations -- and the :class:`Merge` to undo it."""
    b, n, c = x.shape
    dst_idx = is_dst.nonzero().squeeze(1)
    src_pos = (~is_dst).nonzero().squeeze(1)
    r = min(r, src_pos.numel())
    src, dst = x[:, src_pos], x[:, dst_idx]
    with torch.no_grad():
        a = src / src.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        bb = dst / dst.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        best, best_dst = (a @ bb.transpose(1, 2)).max(dim=-1)  # (B, N_src)
        order = best.argsort(dim=-1, descending=True)
    merged, unm = order[:, :r], order[:, r:]
    into = best_dst.gather(1, merged)
    kept = src.gather(1, unm[..., None].expand(-1, -1, c))
    moving = src.gather(1, merged[..., None].expand(-1, -1, c))
    dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), moving, reduce="mean", include_self=True)
    info = Merge(src_pos.expand(b, -1), dst_idx, unm, merged, into, n)
    return torch.cat([kept, dst], dim=1), info


def unmerge(y: torch.Tensor, m: Merge) -> torch.Tensor:
    """Put the (B, N - r, C) outputs back on all N tokens: merged sources take their destination's output."""
    b, _, c = y.shape
    n_unm = m.unm.shape[1]
    kept, dst = y[:, :n_unm], y[:, n_unm:]
    out = y.new_empty(b, m.n, c)
    out[:, m.dst_idx] = dst
    src_out = y.new_empty(b, m.src_idx.shape[1], c)
    src_out.scatter_(1, m.unm[..., None].expand(-1, -1, c), kept)
    src_out.scatter_(1, m.merged[..., None].expand(-1, -1, c), dst.gather(1, m.into[..., None].expand(-1, -1, c)))
    out[:, m.src_idx[0]] = src_out
    return out

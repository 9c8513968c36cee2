"""Shortening a padded batch of sequences after some visual tokens were dropped.

A `Compaction` is computed once from the prompt's keep mask and then applied to everything that
runs along the sequence: token ids (or embeddings), the 2D attention mask and position ids, at
prefill, at decode (where only the mask covers the prompt), and on the whole growing sequence
when generate() runs without a cache. Rows that keep different numbers of tokens are re-padded
on the side the batch was padded on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Compaction:
    """index:          [B, L'] int64 column of the prompt each kept column comes from; -1 = new pad.
    dropped_before: [B, L'] int64 prompt tokens dropped before each kept column (renumbering).
    total_dropped:  [B] int64 prompt tokens dropped per row.
    prompt_len:     L, the prompt length before compaction.
    kept_per_row:   host copy of the kept count per row (read once, so the properties and
                    `gather` never wait for the device again).
    repadded:       some row has new pad columns even though every row keeps as many (in a
                    compaction `followed_by` another, a row's pad may sit between the two).
    """

    index: torch.Tensor
    dropped_before: torch.Tensor
    total_dropped: torch.Tensor
    prompt_len: int
    kept_per_row: tuple[int, ...] = ()
    repadded: bool = False
    _safe_index: torch.Tensor | None = field(default=None, repr=False)  # index.clamp(min=0), made once

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor, left_padded: bool = True,
                       kept_per_row: list[int] | None = None) -> "Compaction":
        """keep: [B, L] bool, True where a column stays. `kept_per_row` (its row sums, when the
        caller knows them on the host) saves a device read."""
        batch, length = keep.shape
        if kept_per_row is None:
            kept_per_row = keep.sum(1).tolist()
        kept_host = tuple(int(k) for k in kept_per_row)
        width = max(kept_host, default=0)
        dropped_cum = torch.cumsum((~keep).long(), dim=1)
        total_dropped = dropped_cum[:, -1] if length else torch.zeros(batch, dtype=torch.long, device=keep.device)
        if len(set(kept_host)) <= 1:
            # every row keeps as many: the kept columns in order, no re-padding (few ops: each
            # costs a launch on a GPU host, where this runs in every prefill)
            index = keep.nonzero()[:, 1].view(batch, width)
            return cls(index, dropped_cum.gather(1, index), total_dropped, length, kept_host, _safe_index=index)
        kept_dev = torch.tensor(kept_host, device=keep.device)
        columns = torch.arange(length, device=keep.device).expand(batch, length)
        # Stable sort puts kept columns first, in order; the first kept_per_row of them are real.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        slot = torch.arange(width, device=keep.device).expand(batch, width)
        real = slot < kept_dev[:, None]
        index = torch.where(real, columns.gather(1, order), torch.full_like(order, -1))
        if left_padded:  # shift each row right by its missing count so padding stays on the left
            shift = width - kept_dev
            src = (slot - shift[:, None]).clamp(min=0)
            index = torch.where(slot >= shift[:, None], index.gather(1, src), torch.full_like(index, -1))
        dropped_before = torch.where(index >= 0, dropped_cum.gather(1, index.clamp(min=0)), 0)
        return cls(index, dropped_before, total_dropped, length, kept_host)

    @property
    def is_identity(self) -> bool:
        return all(k == self.prompt_len for k in self.kept_per_row)

    @property
    def needs_mask(self) -> bool:
        """True when rows were re-padded (rows keep different counts), so an explicit attention
        mask is required."""
        return self.repadded or len(set(self.kept_per_row)) > 1

    def followed_by(self, length: int, segment: "Compaction") -> "Compaction":
        """This compaction of a sequence of `length` columns (the prompt and the tokens
        generated after it, all kept), then `segment`'s compaction of the columns after those:
        one compaction of the whole (a conversation whose later turn was pruned too)."""
        index, dropped = self.extended(length)
        generated = length - self.prompt_len
        segment_index = torch.where(segment.index >= 0, segment.index + length, -1)
        return Compaction(
            torch.cat([index, segment_index], dim=1),
            torch.cat([dropped, segment.dropped_before + self.total_dropped[:, None]], dim=1),
            self.total_dropped + segment.total_dropped,
            length + segment.prompt_len,
            tuple(a + generated + b for a, b in zip(self.kept_per_row, segment.kept_per_row)),
            repadded=self.needs_mask or segment.needs_mask,
        )

    def extended(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, dropped_before) for a sequence of `length` >= prompt_len whose columns past
        the prompt (tokens generated so far) are all kept."""
        extra = length - self.prompt_len
        if extra < 0:
            raise ValueError(f"sequence of length {length} is shorter than the pruned prompt ({self.prompt_len})")
        if extra == 0:  # the prefill itself: no ops (every one costs a launch on a GPU host)
            return self.index, self.dropped_before
        batch = self.index.shape[0]
        tail = torch.arange(self.prompt_len, length, device=self.index.device).expand(batch, extra)
        index = torch.cat([self.index, tail], dim=1)
        dropped = torch.cat([self.dropped_before, self.total_dropped[:, None].expand(batch, extra)], dim=1)
        return index, dropped

    def gather(self, x: torch.Tensor, pad_value: float | int = 0, seq_dim: int = -1) -> torch.Tensor:
        """Compacts `x` along `seq_dim` (its length: prompt_len + tokens generated so far).

        x: [..., B, T] (ids, masks, positions incl. [3, B, T]) or [B, T, D] with seq_dim=1.
        """
        seq_dim = seq_dim % x.dim()
        index, _ = self.extended(x.shape[seq_dim])
        batch_dim = seq_dim - 1
        shape = [1] * x.dim()
        shape[batch_dim], shape[seq_dim] = index.shape
        if index is self.index:
            if self._safe_index is None:
                self._safe_index = index.clamp(min=0)
            safe = self._safe_index
        else:
            safe = index.clamp(min=0)
        idx = safe.view(shape).expand(*x.shape[:seq_dim], index.shape[1], *x.shape[seq_dim + 1 :])
        out = x.gather(seq_dim, idx)
        return out.masked_fill((index < 0).view(shape), pad_value) if self.needs_mask else out

    def renumber(self, positions: torch.Tensor) -> torch.Tensor:
        """Compacted positions [..., B, T'] -> consecutive numbering (dropped tokens removed)."""
        _, dropped = self.extended(self.prompt_len + positions.shape[-1] - self.index.shape[1])
        return (positions - dropped).clamp(min=0)

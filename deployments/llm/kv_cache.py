"""The KV cache of the running batch: one left-padded DynamicCache with its [B, T] mask, how it
grows by a column per decode step, how rows join (merging) and leave (selecting), and how a mixed
step's prompt keys/values become cache rows. Every change to cache tensors happens here.

Why left-padded merging rather than a slot cache: a plain HF model takes one `cache_position`
for the whole batch, so per-row positions need either custom attention kernels or padding.
Left padding keeps every row's newest token in the last column, so one decode step for the
whole batch is a single ordinary forward (input [B, 1], a 2-D attention mask and per-row
position_ids) that works for any decoder-only AutoModelForCausalLM. A new sequence is prefilled
on its own (no padding inside a forward, so no fully-masked rows) and merged in by padding the
shorter cache on the left; a finished row is dropped with index_select and the columns that have
become padding for every row are trimmed. Merge and trim copy the cache, which costs far less
than the model step on the models this engine serves. Knows nothing of sequences or the scheduler.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import DynamicCache


class KVCache:
    """The running rows' cache and mask ([B, T], 1 = real token, 0 = padding), row i for the
    batch's i-th sequence; both None while no row runs."""

    def __init__(self):
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Appends rows with their own cache (same width among themselves), padding the narrower side."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.width, mask.shape[1])
        _pad_left(self.cache, width - self.width)
        _pad_left(cache, width - mask.shape[1])
        self.mask = torch.cat([_padded(self.mask, width), _padded(mask, width)], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)

    def add_column(self) -> torch.Tensor:
        """Extends the mask by the column this decode step writes (the attention layers fill the
        cache's, see append_column); returns the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def clear(self) -> None:
        self.cache, self.mask = None, None

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keeps the rows `idx` (in that order) and trims the columns that became padding for all."""
        self.mask = self.mask.index_select(0, idx)
        lead = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # all-padding columns
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]


_ROOM = 32   # columns of room a running cache tensor gets when it must be copied to grow


def append_column(t: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """t [B, H, W, D] with col [B, H, 1, D] as a new last column. torch.cat would copy the whole cache
    every step; instead t gets _ROOM spare columns to its right when it is copied, and the next
    appends write into them (t is then a view of that buffer, which nothing else uses: merges,
    index_select and the engine's other copies make new tensors)."""
    b, h, w, d = t.shape
    row = t.stride(1)
    start = t.storage_offset()
    if (t.stride(3) == 1 and t.stride(2) == d and t.stride(0) == h * row and row % d == 0 and start < row
            and start // d + w < row // d and t.untyped_storage().nbytes() >= b * h * row * t.element_size()):
        grown = t.as_strided((b, h, w + 1, d), t.stride(), start)
    else:
        buf = t.new_empty(b, h, w + 1 + _ROOM, d)
        buf[:, :, :w] = t
        grown = buf[:, :, :w + 1]
    grown[:, :, w:] = col
    return grown


def zero_padding(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Padding positions never hold non-finite values, so masked attention weights (0) stay 0."""
    if bool(mask.all()):
        return
    pad = (mask == 0)[:, None, :, None]
    for layer in cache.layers:
        layer.keys.masked_fill_(pad, 0.0)
        layer.values.masked_fill_(pad, 0.0)


def prompt_cache(new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 lengths: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """A mixed step's prompts' keys/values (`new_kv`: layer -> packed k, v) as one left-padded cache (padding zeroed) and its [P, W] mask:
    one copy per layer tensor (a single prompt needs no padding, so its keys/values serve as they are;
    the engine's merge copies them into the batch anyway)."""
    width = max(lengths)
    layers = [new_kv[i] for i in sorted(new_kv)]
    device = layers[0][0].device
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    dest = []
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
        dest.extend(range(row * width + width - n, (row + 1) * width))
    if len(lengths) == 1:
        return DynamicCache(ddp_cache_data=layers), mask
    dest_t = torch.tensor(dest, device=device)
    padded = [(_left_padded(k, dest_t, len(lengths), width), _left_padded(v, dest_t, len(lengths), width))
              for k, v in layers]
    return DynamicCache(ddp_cache_data=padded), mask


def _left_padded(packed: torch.Tensor, dest: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """packed [1, H, L, D] (the prompts one after another) -> [rows, H, width, D], each prompt
    right-aligned in its row: position i of the packed row goes to flat slot dest[i]."""
    _, h, _, d = packed.shape
    out = packed.new_zeros(h, rows * width, d)
    out.index_copy_(1, dest, packed[0])
    return out.view(h, rows, width, d).transpose(0, 1)


def _pad_left(cache: DynamicCache, n: int) -> None:
    if n <= 0:
        return
    for layer in cache.layers:
        layer.keys = _zeros_before(layer.keys, n)
        layer.values = _zeros_before(layer.values, n)


def _zeros_before(t: torch.Tensor, n: int) -> torch.Tensor:
    b, h, _, d = t.shape
    return torch.cat([t.new_zeros(b, h, n, d), t], dim=2)


def _padded(mask: torch.Tensor, width: int) -> torch.Tensor:
    n = width - mask.shape[1]
    return mask if n <= 0 else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)


class SlotKVCache:
    """The running rows' cache as fixed slots (engine.kv_cache "slots"): per layer one key and one
    value buffer [S, H, C, D], row i of the batch in slot i, its tokens in columns [0, length) and
    nothing to its left, so a decode step writes one column per row in place and nothing is padded
    or merged by concatenation. A row that leaves is compacted away by moving the rows after it
    down (order kept); new rows are copied into the next free slots. S and C grow (doubling, a copy)
    only when a batch or a row outgrows them. Used only by mixed steps (attention.py reads and
    writes it); `mask` is [B, W] with 1 in each row's first `length` columns."""

    def __init__(self, rows: int, columns: int):
        self.rows, self.columns = rows, columns   # capacity
        self.keys: list[torch.Tensor] = []        # per layer [S, H, C, D]
        self.values: list[torch.Tensor] = []
        self.lengths: Optional[torch.Tensor] = None   # [B] long
        self.mask: Optional[torch.Tensor] = None

    @property
    def cache(self) -> Optional["SlotKVCache"]:
        return self if self.lengths is not None else None

    @property
    def width(self) -> int:
        return 0 if self.lengths is None else int(self.lengths.max())

    def merge(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copies rows of a left-padded cache (and its mask) into the next free slots."""
        b = 0 if self.lengths is None else self.lengths.shape[0]
        new = mask.sum(dim=1)
        lengths = new if self.lengths is None else torch.cat([self.lengths, new])
        self._reserve(cache, b + mask.shape[0], int(lengths.max()))
        width = mask.shape[1]
        for layer, theirs in enumerate(cache.layers):
            for j, n in enumerate(new.tolist()):
                self.keys[layer][b + j, :, :n] = theirs.keys[j, :, width - n:]
                self.values[layer][b + j, :, :n] = theirs.values[j, :, width - n:]
        self.lengths = lengths
        self.mask = self._mask(self.width)

    def add_column(self) -> torch.Tensor:
        """Each row gains the column this decode step writes (attention.py, through `append`)."""
        self.lengths = self.lengths + 1
        if self.width > self.columns:
            self._grow(self.rows, self.width)
        self.mask = self._mask(self.width)
        return self.mask

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the decode rows' new key/value ([B, H, 1, D]) at each row's last column (add_column
        counted it); returns views [B, H, W, D] of the rows' keys and values (right-padded)."""
        b, width = self.lengths.shape[0], self.width
        rows = torch.arange(b, device=k.device)
        last = self.lengths - 1
        self.keys[layer][rows, :, last] = k[:, :, 0]
        self.values[layer][rows, :, last] = v[:, :, 0]
        return self.keys[layer][:b, :, :width], self.values[layer][:b, :, :width]

    def clear(self) -> None:
        self.lengths, self.mask = None, None   # the buffers stay allocated for the next rows

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keeps the rows `idx` (ascending): the rows after the first gap move down into place."""
        keep = idx.tolist()
        first = next((j for j, i in enumerate(keep) if i != j), len(keep))
        if first < len(keep):
            src = idx[first:]
            width = self.width
            for buf in self.keys + self.values:
                buf[first:len(keep), :, :width] = buf[:, :, :width].index_select(0, src)
        self.lengths = self.lengths.index_select(0, idx)
        self.mask = self._mask(self.width)

    def _mask(self, width: int) -> torch.Tensor:
        return (torch.arange(width, device=self.lengths.device)[None, :] < self.lengths[:, None]).long()

    def _reserve(self, like: DynamicCache, rows: int, columns: int) -> None:
        if not self.keys:
            first = like.layers[0].keys
            _, h, _, d = first.shape
            self.rows, self.columns = max(self.rows, rows), max(self.columns, columns)
            for _ in like.layers:
                self.keys.append(first.new_zeros(self.rows, h, self.columns, d))
                self.values.append(first.new_zeros(self.rows, h, self.columns, d))
        elif rows > self.rows or columns > self.columns:
            self._grow(max(rows, self.rows), max(columns, self.columns))

    def _grow(self, rows: int, columns: int) -> None:
        rows = max(rows, self.rows if rows <= self.rows else 2 * self.rows)
        columns = max(columns, self.columns if columns <= self.columns else 2 * self.columns)
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                s, h, c, d = old.shape
                new = old.new_zeros(rows, h, columns, d)
                new[:s, :, :c] = old
                bufs[i] = new
        self.rows, self.columns = rows, columns

"""Vector quantiser for one level of a hierarchical VQ-VAE.

The quantiser maps every spatial position of an encoder output ``z`` of shape
``(B, D, H, W)`` to its nearest codebook vector (squared L2). It supports the
two standard ways of learning the codebook:

* ``ema=True`` (default): the codebook is a buffer moved towards the mean of the
  vectors assigned to each code by exponential moving averages (van den Oord et
  al. 2017, appendix), with Laplace-smoothed cluster sizes;
* ``ema=False``: the codebook is an ``nn.Parameter`` learned by gradient descent
  on the codebook loss.

On top of that it can seed the codebook from the first training batch and
restart dead codes from a ring buffer of recent encoder outputs (as in
Jukebox). All state lives in registered buffers, so ``state_dict()`` alone
makes a resumed run bit-identical to an uninterrupted one. In eval mode
nothing changes.

Random draws (the data-init rows, the subset kept in the ring buffer, the
restart candidates) never touch the global RNG. Each comes from a fresh CPU
generator seeded by (``draw_seed``, ``calls``, what the draw is for): both are
buffers, so the draws are a function of the state dict, and every rank draws
the same numbers whatever its own global stream (under torchrun each rank has
its own, for dropout). Drawing on the CPU also makes them the same on every
device.

Distributed training: the trainer injects a ``gather`` (by default none: one
process; under torchrun :func:`progvq.distributed.gather_ranks`). Each rank
quantises its own slice of the global batch, then the detached encoder
vectors of every rank are gathered in rank order, and every rank applies the
same update (data init, EMA statistics, usage, ring buffer, restarts) to the
same gathered vectors with the same draws. So every rank holds the
identical codebook after every step, and it is the codebook a single process
would hold for the same global batch (up to the summation order of floats).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["Gather", "Quantizer", "QuantizerOutput", "VQConfig", "VectorQuantizer", "code_usage", "no_gather"]


@dataclass
class QuantizerOutput:
    """Everything one forward pass of :class:`VectorQuantizer` produces.

    ``quantized`` (B, D, H, W) are the chosen codebook vectors in the input's dtype,
    straight-through, so the gradient wrt the input is the identity; ``indices``
    (B, H, W) int64 are the code indices. ``codebook_loss`` is the scalar
    ``mean((sg[z] - e)^2)`` (a constant zero with EMA) and ``commit_loss`` the scalar
    ``mean((z - sg[e])^2)``, unweighted (the caller applies beta). ``perplexity`` is a
    scalar float, ``exp(entropy)`` of this batch's code histogram, and ``codes_used`` a
    scalar int64, the number of distinct codes in this batch.
    """

    quantized: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    perplexity: Tensor
    codes_used: Tensor


def _histogram_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(K,) code counts -> (perplexity float scalar, codes used int64 scalar)."""
    p = counts.float() / counts.sum()
    # xlogy gives 0 * log 0 = 0, so unused codes add nothing to the entropy.
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
    return perplexity, (counts > 0).sum()


#: (N, D) vectors of this process -> (world * N, D) of every process in rank order, or None in one process.
Gather = Callable[[Tensor], "Tensor | None"]


def no_gather(flat: Tensor) -> Tensor | None:
    """The gather of a single process: there is nobody to gather from."""
    return None


def _seed_of(*parts: int | str) -> int:
    """A 64-bit generator seed that is a fixed function of ``parts`` (the same in every process)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


# What each draw is for: a separate stream per purpose, so adding a draw of one kind never
# shifts the numbers of another.
_INIT, _RECENT, _RESTART = "init", "recent", "restart"


def code_usage(indices: Tensor, num_codes: int) -> tuple[float, int]:
    """(perplexity, codes_used) of ``indices``, an int tensor of code indices of any shape.

    ``indices`` lie in ``[0, num_codes)``, ``num_codes`` being the codebook size K
    (e.g. all the codes of a held-out split concatenated). The perplexity is
    ``exp(entropy)`` of the code histogram, so ``k`` codes used equally often give
    ``k``; ``codes_used`` is the number of distinct codes.
    """
    if indices.numel() == 0:
        raise ValueError("code_usage needs at least one index")
    counts = torch.bincount(indices.reshape(-1).long(), minlength=num_codes)
    if counts.numel() > num_codes:
        raise ValueError(f"indices must lie in [0, {num_codes})")
    perplexity, used = _histogram_stats(counts)
    return float(perplexity), int(used)


class Quantizer(Protocol):
    """What every quantiser kind gives the levels, the trainer and the figures."""

    num_codes: int  # K: codes are integers in [0, K)
    dim: int  # D: channels of the vectors the encoder must produce

    def __call__(self, z: Tensor) -> QuantizerOutput:
        """Training pass: (B, D, H, W) -> the named output (state such as a codebook may update)."""

    def nearest(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W) int64 codes; no state changes."""

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) int64 codes -> (B, D, H, W) vectors."""


@dataclass
class VQConfig:
    """``quantizer: {kind: vq, ...}``: nearest codebook vector, straight-through, commitment loss."""

    codes: int = 512  # codebook size K
    dim: int = 64  # codebook vector size D
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    decay: float = 0.99  # EMA decay for codebook statistics and usage
    init_from_data: bool = True  # first batch's encoder outputs seed the codebook
    restart: bool = True  # dead codes jump to recent encoder outputs
    restart_threshold: float = 1.0  # dead: fewer assignments per batch (EMA) than this
    restart_every: int = 50  # training steps between dead-code checks

    @property
    def num_codes(self) -> int:
        return self.codes

    def problems(self) -> list[tuple[str, Any, str]]:
        """(key, value, what it must be) for every value out of range."""
        out = []
        if self.codes < 2:
            out.append(("codes", self.codes, ">= 2"))
        if self.dim < 1:
            out.append(("dim", self.dim, ">= 1"))
        if not 0 < self.decay < 1:
            out.append(("decay", self.decay, "in (0, 1)"))
        if self.restart_every < 1:
            out.append(("restart_every", self.restart_every, ">= 1"))
        if self.restart_threshold < 0:
            out.append(("restart_threshold", self.restart_threshold, ">= 0"))
        return out

    def build(self) -> VectorQuantizer:
        return VectorQuantizer(
            self.codes,
            self.dim,
            ema=self.ema,
            decay=self.decay,
            init_from_data=self.init_from_data,
            restart=self.restart,
            restart_threshold=self.restart_threshold,
            restart_every=self.restart_every,
        )


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with EMA or learned codebook.

    ``num_codes`` is the codebook size K and ``dim`` the code dimension D (channels of
    the encoder output). With ``ema`` the codebook is learned by EMA (a buffer) rather
    than by the codebook loss (a parameter); ``decay`` is the EMA decay, used for the
    codebook statistics and for ``usage``, and ``eps`` the Laplace smoothing of the EMA
    cluster sizes. ``init_from_data`` seeds the codebook with random vectors of the
    first training batch instead of a small uniform init. ``restart`` replaces dead
    codes every ``restart_every`` training calls (the calls between dead-code checks):
    a code is dead when its ``usage`` (EMA of assignments per batch) falls below
    ``restart_threshold``. Restarts draw from the ``buffer_size`` rows of the
    ``recent`` ring buffer.
    """

    codebook: Tensor  # (K, D); a Parameter when ema=False, else a buffer
    initialized: Tensor  # () bool
    ema_count: Tensor  # (K,) EMA of cluster sizes
    ema_sum: Tensor  # (K, D) EMA of the sum of vectors assigned to each code
    usage: Tensor  # (K,) EMA of assignments per batch, for dead-code detection
    recent: Tensor  # (buffer_size, D) ring buffer of recent encoder vectors
    recent_pos: Tensor  # () int64, next row of `recent` to write
    recent_filled: Tensor  # () int64, rows of `recent` holding data
    calls: Tensor  # () int64, training forwards so far
    draw_seed: Tensor  # () int64, seeds the quantiser's own random draws (with `calls`)

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        init_from_data: bool = True,
        restart: bool = True,
        restart_threshold: float = 1.0,
        restart_every: int = 50,
        buffer_size: int = 8192,
    ) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1 or restart_every < 1 or buffer_size < 1:
            raise ValueError("num_codes, dim, restart_every and buffer_size must be >= 1")
        if not 0.0 <= decay <= 1.0 or eps <= 0.0:
            raise ValueError("need 0 <= decay <= 1 and eps > 0")
        self.num_codes, self.dim = num_codes, dim
        self.ema, self.decay, self.eps = ema, decay, eps
        self.init_from_data = init_from_data
        self.restart = restart
        self.restart_threshold = restart_threshold
        self.restart_every = restart_every
        # how vectors of the other processes arrive: injected by the trainer (progvq.distributed.gather_ranks)
        self.gather: Gather = no_gather

        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        # Count 1 and sum = codebook keep ema_sum / ema_count equal to the codebook.
        # Kept in both modes so restarts and checkpoints treat them alike.
        self.register_buffer("ema_count", torch.ones(num_codes))
        self.register_buffer("ema_sum", init.clone())
        # Unmeasured codes count as just alive, so none is restarted untried.
        self.register_buffer("usage", torch.full((num_codes,), float(restart_threshold)))
        self.register_buffer("recent", torch.zeros(buffer_size, dim))
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        # Derived from the initial codebook, itself drawn from the global RNG: so it follows
        # the run's seed and differs between quantisers, without drawing again (the initial
        # weights of modules built after this one stay what they were).
        # (A model built on the meta device, only to count its parameters, has no values to hash.)
        data = b"" if init.is_meta else init.detach().cpu().contiguous().numpy().tobytes()
        digest = hashlib.blake2b(data, digest_size=8).digest()
        self.register_buffer("draw_seed", torch.tensor(int.from_bytes(digest, "little") >> 1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # State dicts written before `draw_seed` existed lack it: the quantiser keeps its own
        # (a function of the run's seed), so they still load, strictly.
        state_dict.setdefault(prefix + "draw_seed", self.draw_seed.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, ema={self.ema}, restart={self.restart}"

    # ------------------------------------------------------------------ public

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, D, H, W); in training mode also update the state."""
        self._check_input(z)
        b, _, h, w = z.shape
        # Distances and codebook statistics need float32: in bf16 the argmin and the
        # EMA sums are too coarse.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = rearrange(z.float(), "b d h w -> (b h w) d")  # (N, D)
            # every rank's vectors (N * world, D), the same on all ranks; None in one process
            everyone = self.gather(flat.detach()) if self.training else None
            if self.training and not bool(self.initialized):
                self._init_from(flat.detach() if everyone is None else everyone)
            idx = self._assign(flat.detach())  # (N,)
            # (N, D); carries a gradient to a learned codebook
            chosen = self.codebook[idx]

            commit_loss = F.mse_loss(flat, chosen.detach())
            if self.ema:
                codebook_loss = torch.zeros((), device=z.device)
            else:
                codebook_loss = F.mse_loss(chosen, flat.detach())
            # Straight-through written so the forward value is exactly the code vector
            # (z + (e - z).detach() can be off by rounding); d/dz is still the identity.
            st = chosen.detach() + (flat - flat.detach())

            counts, sums = self._counts_and_sums(idx, flat.detach(), with_sums=self.training)
            if self.training:
                if everyone is not None:
                    # Recomputing the assignments of all ranks' vectors (cheap next to the
                    # encoder) rather than all-reducing counts and sums: every rank then
                    # does bit-identical arithmetic, so the codebooks never drift apart.
                    self._update_state(everyone, *self._counts_and_sums(self._assign(everyone), everyone))
                else:
                    self._update_state(flat.detach(), counts, sums)
            perplexity, codes_used = _histogram_stats(counts)

        quantized = rearrange(st, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z.dtype)
        return QuantizerOutput(
            quantized=quantized,
            indices=idx.view(b, h, w),
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            perplexity=perplexity,
            codes_used=codes_used,
        )

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, H, W) int64 nearest-code indices; never changes state."""
        self._check_input(z)
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            idx = self._assign(rearrange(z.float(), "b d h w -> (b h w) d"))
        return idx.view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) int code indices -> (B, D, H, W) float32 codebook vectors."""
        return rearrange(F.embedding(indices.long(), self.codebook), "b h w d -> b d h w")

    # ----------------------------------------------------------------- helpers

    def _check_input(self, z: Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, H, W), got {tuple(z.shape)}")

    def _assign(self, flat: Tensor) -> Tensor:
        """(N, D) float32 -> (N,) int64 index of the nearest code in squared L2."""
        cb = self.codebook.detach()
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is the same for every code, so the
        # nearest code maximises z.e - |e|^2 / 2. Appending -1/2 to z and |e|^2 to e
        # makes that one matmul with no (N, K) bias to add; max(1) is about 3x faster
        # than argmax(1) on CPU and returns the same (first) index.
        z = F.pad(flat, (0, 1), value=-0.5)  # (N, D + 1)
        e = torch.cat([cb, cb.pow(2).sum(1, keepdim=True)], 1)  # (K, D + 1)
        return (z @ e.T).max(1).indices

    def _counts_and_sums(self, idx: Tensor, flat: Tensor, with_sums: bool = True) -> tuple[Tensor, Tensor | None]:
        """Assignments per code (K,) float32 and the sum of the vectors assigned to each (K, D).

        On CPU, bincount and index_add_ (sequential, so deterministic) are ~60x
        faster than a one-hot matmul; on GPUs index_add_ uses atomics, whose
        order varies, so the one-hot matmul keeps runs reproducible there.
        """
        if idx.device.type == "cpu":
            counts = torch.bincount(idx, minlength=self.num_codes).to(flat.dtype)
            sums = None
            if with_sums:
                sums = torch.zeros(self.num_codes, flat.shape[1], dtype=flat.dtype).index_add_(0, idx, flat)
            return counts, sums
        onehot = F.one_hot(idx, self.num_codes).type_as(flat)  # (N, K)
        return onehot.sum(0), onehot.T @ flat if with_sums else None

    def _generator(self, purpose: str, calls: int) -> torch.Generator:
        """A CPU generator for one draw, seeded by (``draw_seed``, ``calls``, ``purpose``).

        ``calls`` is ``int(self.calls)`` as the caller has read it (one host sync the fewer
        on GPUs). A CPU generator, so the numbers do not depend on the device.
        """
        return torch.Generator().manual_seed(_seed_of(int(self.draw_seed), calls, purpose))

    @torch.no_grad()
    def _init_from(self, flat: Tensor) -> None:
        """Seed the codebook with random rows of ``flat`` (N, D)."""
        n, gen = flat.shape[0], self._generator(_INIT, int(self.calls))
        if n >= self.num_codes:
            rows = torch.randperm(n, generator=gen)[: self.num_codes]
        else:  # too few vectors: sample with replacement
            rows = torch.randint(n, (self.num_codes,), generator=gen)
        picks = flat[rows.to(flat.device)]
        self.codebook.copy_(picks)
        self.ema_sum.copy_(picks)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_state(self, flat: Tensor, counts: Tensor, sums: Tensor) -> None:
        """Apply one training batch: EMA codebook, usage, recent buffer, restarts.

        ``flat`` (N, D) are the batch's detached float32 encoder vectors, ``counts`` (K,)
        the assignments per code in it and ``sums`` (K, D) the sum of the vectors
        assigned to each code.
        """
        d = self.decay
        if self.ema:
            self.ema_count.mul_(d).add_(counts, alpha=1 - d)
            self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
            n = self.ema_count.sum()
            # Laplace smoothing keeps codes with a near-zero count from dividing by ~0,
            # while preserving the total count n.
            smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.usage.mul_(d).add_(counts, alpha=1 - d)
        calls = int(self.calls)
        self._push_recent(flat, calls)
        self.calls.add_(1)
        if self.restart and (calls + 1) % self.restart_every == 0:
            self._restart_dead_codes(calls + 1)

    def _push_recent(self, flat: Tensor, calls: int) -> None:
        """Write (N, D) vectors into the ``recent`` ring buffer; ``calls``: this call's number."""
        size = self.recent.shape[0]
        if flat.shape[0] > size:
            # A random subset, so restarts do not favour the last images of a batch.
            keep = torch.randperm(flat.shape[0], generator=self._generator(_RECENT, calls))[:size]
            flat = flat[keep.to(flat.device)]
        n = flat.shape[0]
        slots = (self.recent_pos + torch.arange(n, device=self.recent.device)) % size
        self.recent[slots] = flat
        self.recent_pos.copy_((self.recent_pos + n) % size)
        self.recent_filled.add_(n).clamp_(max=size)

    def _restart_dead_codes(self, calls: int) -> None:
        """Replace codes with ``usage < restart_threshold`` by random recent vectors; ``calls``: calls so far."""
        dead = self.usage < self.restart_threshold  # (K,)
        # The buffer fills from row 0, wrapping once full: rows [0, filled) hold data.
        # One candidate per code, used only where dead: no host sync on the dead count.
        rows = torch.randint(int(self.recent_filled), (self.num_codes,), generator=self._generator(_RESTART, calls))
        picks = self.recent[rows.to(dead.device)]
        self.codebook.copy_(torch.where(dead.unsqueeze(1), picks, self.codebook))
        # Stats become "one observation at the new vector", matching the codebook;
        # usage goes to the threshold so the code is not judged dead again at once.
        self.ema_sum.copy_(torch.where(dead.unsqueeze(1), picks, self.ema_sum))
        self.ema_count.masked_fill_(dead, 1.0)
        self.usage.masked_fill_(dead, self.restart_threshold)

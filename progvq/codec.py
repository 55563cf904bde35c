"""Lossless compression with a trained hierarchy: the likelihood bound as a real file.

The encoders are deterministic, so -log2 p(z_L) - sum_k log2 D_k(z_(k-1) | z_k) - log2 D_1(x | z_1)
is the length of a code that can be written: a range coder (``constriction``) writes the top
codes under the prior (a class-conditional prior codes a class first), each level's codes under
its decoder given the level above (and that class, for a class-conditional decoder), and the
pixels under the level-1 decoder given z_1. The codec knows no model kind: every level and the
prior walk their own decode order and hand each step's logits to the coder (the ``coding_walk``
methods, :data:`~progvq.pixelcnn.CodeStep`).

**Exactness.** The decoder must see the very probabilities the encoder saw, bit for bit:

- the models that give probabilities run in float64 (a copy of the run's float32 weights), without
  autocast and with torch's deterministic algorithms. In float32 the convolutions of one CPU's
  AVX2 and AVX-512 kernels differed in 15% of their outputs (by an ulp); in float64 they agreed,
  and any difference would be about 1e-16 relative;
- autoregressive parts run their sequential sampling loop when encoding too, fed the true values,
  so both sides make the same calls on tensors of the same shapes (the same batches of images);
- logits become integer frequencies without floating-point functions (:func:`frequencies`):
  rounded to 1/256 bit, then an integer exponential table, so only a float64 difference that
  straddles a rounding step of 1/256 bit (odds about 1e-12 per logit) can change a table;
- each image's CRC-32 is in the file: a decoder that computed other probabilities anyway (another
  CPU or library that rounds otherwise) refuses the file rather than writing wrong pixels.

The encoders' codes come from the float32 models, as ``progvq encode`` and ``eval`` give them;
which codes are coded does not matter for exactness, only that both sides agree on their
probabilities.

``progvq encode`` writes a codes file: an npz with ``level1`` .. ``levelL``, (N, h_k, w_k) code
indices, uint16 where the level's codebook has at most 65,536 codes (int32 otherwise), and
``labels`` (N,) int64 when the images came with labels (a split of a labelled data set).

File layout (little-endian), see README "Compression":

    magic 8 bytes | version u16 | header length u32 | header (UTF-8 JSON)
    | CRC-32 of each image's uint8 pixels (u32 each)
    | per batch: its word count u32, its range-coded words (u32 each)
    | CRC-32 of everything before it (u32)
"""

from __future__ import annotations

import copy
import decimal
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import constriction
import numpy as np
import torch
from torch import Tensor

from .data import _read_npy as read_npy
from .data import load_array, load_dataset
from .errors import ProgvqError
from .fileio import check_regular
from .hierarchy import Hierarchy
from .inpaint import read_image
from .memory import check_fits
from .pixelcnn import CodeStep
from .run import Run, load_run_data
from .untrusted import Dict, Int, List, Map, Str, UntrustedError, parse_json

MAGIC = b"\x89PVQ\r\n\x1a\n"  # like PNG's: a non-ASCII byte, and line ends that text-mode copies mangle
VERSION = 1
#: frequencies of every table sum to 2**PRECISION (constriction's range coder's 24-bit precision)
PRECISION = 24
#: logits are rounded to 2**-STEP_BITS bits before they become frequencies
STEP_BITS = 8
#: weights of the integer exponential are 2**WEIGHT_BITS at most, down to 2**-WEIGHT_BITS of that
WEIGHT_BITS = 30
#: images per range-coded stream (the encoder's choice, recorded in the file)
BATCH = 1000

_PREFIX = struct.Struct("<8sHI")  # magic, version, header length
#: the JSON header's most bytes (a few hundred in practice: the run's digests, the shape, counts)
_HEADER_LIMIT = 1 << 16
#: what a header holds; a file whose header is not of this shape is refused before any value is used
HEADER_SCHEMA = Dict(
    {
        "run": Map(Str(16, r"[0-9]+|prior"), Str(128, r"[0-9a-f]+"), max_len=64),
        "shape": List(Int(1, 1 << 16), 3, 3),
        "canvas": List(Int(1, 1 << 16), 3, 3),
        "count": Int(1, 1 << 31),
        "batch": Int(1, 1 << 20),
        "classes": Int(0, 1 << 16),
    }
)
_U32 = struct.Struct("<I")
# the coder's model: constriction quantises our integer frequencies (exact float64 integers) to its own
# precision the same way in encoder and decoder; perfect=False is its fast, recommended construction
_MODEL = constriction.stream.model.Categorical(perfect=False)


class CodecError(ProgvqError):
    """A file or input the codec cannot use: not ours, damaged, another run's, wrong images."""


# ------------------------------------------------------------------ probabilities -> integer frequencies


def _exp2_table() -> np.ndarray:
    """round(2**WEIGHT_BITS * 2**(-m / 2**STEP_BITS)) for m in 0 .. 2**STEP_BITS - 1, int64.

    Computed in decimal arithmetic (software, the same on every machine), never by a libm.
    """
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    steps = 2**STEP_BITS
    two = decimal.Decimal(2)
    table = [
        int(
            ctx.power(two, ctx.subtract(decimal.Decimal(WEIGHT_BITS), ctx.divide(m, steps))).to_integral_value(
                rounding=decimal.ROUND_HALF_EVEN
            )
        )
        for m in range(steps)
    ]
    return np.array(table, dtype=np.int64)


_EXP2 = _exp2_table()
_UNITS_PER_NAT = 2**STEP_BITS / math.log(2)  # logits are in nats; the grid is in bits
# a weight shifted right by up to WEIGHT_BITS: further below the most likely symbol, every symbol weighs 0
_MAX_GAP = (WEIGHT_BITS + 1) * 2**STEP_BITS - 1


def frequencies(logits: Tensor) -> np.ndarray:
    """Logits (n, K) in nats (log-probabilities up to a constant per row) -> integer frequencies (n, K).

    Every row sums to 2**PRECISION and every symbol gets at least 1. The only floating-point
    step is the first, rounding in float64 (IEEE, the same everywhere):

    1. u = round(logit * 2**STEP_BITS / ln 2): the logit in steps of 2**-STEP_BITS bit;
    2. gap d = max(u) - u, at most (WEIGHT_BITS + 1) 2**STEP_BITS - 1;
    3. weight = EXP2[d mod 2**STEP_BITS] >> (d div 2**STEP_BITS), an integer 2**WEIGHT_BITS * 2**(-d / 2**STEP_BITS);
    4. frequency = 1 + floor(weight (2**PRECISION - K) / sum(weights)), and what the floors leave goes
       to the most likely symbol (the first of equals).

    The table is within 2**-(STEP_BITS + 1) bit of the logits' distribution where it matters, and
    each symbol's floor of 1 costs at most K 2**-PRECISION of probability.
    """
    values = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    n, k = values.shape
    if k > 2**PRECISION // 2:
        raise CodecError(f"{k} symbols do not fit the coder's {PRECISION}-bit frequencies")
    if np.isnan(values).any() or np.isposinf(values).any():
        raise CodecError("the model gave NaN or infinite logits; it cannot code these images")
    units = np.rint(np.maximum(values, -1e30) * _UNITS_PER_NAT)  # -inf (probability 0) becomes the floor
    gap = np.minimum(units.max(axis=1, keepdims=True) - units, _MAX_GAP).astype(np.int64)
    weights = _EXP2[gap & (2**STEP_BITS - 1)] >> (gap >> STEP_BITS)  # (n, K), the largest 2**WEIGHT_BITS
    free = 2**PRECISION - k
    # weights < 2**31 and free < 2**24: the product fits int64 with room to spare
    freq = 1 + (weights * free) // weights.sum(axis=1, keepdims=True)
    freq[np.arange(n), weights.argmax(axis=1)] += 2**PRECISION - freq.sum(axis=1)
    return freq


class StreamEncoder:
    """A :data:`~progvq.pixelcnn.CodeStep` that writes each step's true symbols into one range-coded stream."""

    def __init__(self) -> None:
        self._coder = constriction.stream.queue.RangeEncoder()
        self.ideal_bits = 0.0  # sum of -log2 of the coded symbols' table probabilities (what the coder nears)

    def __call__(self, logits: Tensor, true: Tensor | None) -> Tensor:
        if true is None:
            raise ValueError("an encoding step needs the true symbols")
        freq = frequencies(logits)
        symbols = true.detach().to("cpu", torch.int64).numpy().astype(np.int32)
        if symbols.shape != (len(freq),) or symbols.min() < 0 or symbols.max() >= freq.shape[1]:
            raise ValueError(f"symbols {symbols.shape} do not fit logits {tuple(logits.shape)}")
        self._coder.encode(symbols, _MODEL, freq.astype(np.float64))
        self.ideal_bits += float(-np.log2(freq[np.arange(len(freq)), symbols] / 2**PRECISION).sum())
        return true

    def words(self) -> np.ndarray:
        """The stream so far, uint32 words."""
        return self._coder.get_compressed().astype(np.uint32)


class StreamDecoder:
    """A :data:`~progvq.pixelcnn.CodeStep` that reads each step's symbols from one range-coded stream."""

    def __init__(self, words: np.ndarray) -> None:
        self._coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))

    def __call__(self, logits: Tensor, true: Tensor | None) -> Tensor:
        freq = frequencies(logits)
        try:
            symbols = self._coder.decode(_MODEL, freq.astype(np.float64))
        except (AssertionError, ValueError, RuntimeError) as err:  # how constriction reports a stream it cannot read
            raise CodecError(f"the coded stream cannot be read ({err})") from None
        return torch.from_numpy(np.asarray(symbols, dtype=np.int64)).to(logits.device)


@contextmanager
def exact_arithmetic() -> Iterator[None]:
    """No autocast (bf16 where ``precision: auto`` would take it), deterministic algorithms, no gradients."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)


def walk(
    model: Hierarchy, step: CodeStep, n: int, codes: list[Tensor] | None = None, padded: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The whole hierarchy in decode order: the prior, then D_L .. D_2, then D_1 (see module docstring).

    Encoding, ``codes`` [z_1 (n, h1, w1), ..., z_L] and ``padded`` images (n, C, H', W') uint8 on the
    model's canvas are the true values; decoding both are None. Returns (padded images (n, C, H', W')
    uint8, labels (n,) int64 or None).
    """
    top = model.num_levels
    h, w = model.grid_shape(top)
    best = None
    if codes is not None and model.conditional_levels:
        # the class under which the prior's and the class-conditional decoders' codes are likeliest together:
        # the shortest file, at most log2(classes) bits above the joint marginal bound
        best = model.infer_labels(codes)
    z, labels = model.prior.coding_walk(step, n, h, w, None if codes is None else codes[-1], best)
    for k in range(top, 1, -1):
        # a class-conditional decoder codes its level given the class the prior's walk coded first
        z = model.levels[k - 1].coding_walk(z, step, None if codes is None else codes[k - 2], labels)
    return model.levels[0].coding_walk(z, step, padded), labels


def image_checksums(images: Tensor) -> list[int]:
    """CRC-32 of each uint8 image (N, C, H, W)'s bytes in C, H, W order."""
    return [zlib.crc32(np.ascontiguousarray(image.numpy()).tobytes()) for image in images.cpu()]


# ------------------------------------------------------------------ the codec of one run


@dataclass
class Decompressed:
    """What a file held: uint8 images (N, C, H, W) at the data's own size, and the coded classes (N,) or None."""

    images: Tensor
    labels: Tensor | None


@dataclass
class Layout:
    """Sizes of a compressed file's parts, in bytes."""

    header: int  # magic, version, header length, JSON header, image checksums, stream lengths, file checksum
    coded: int  # the range-coded words
    ideal_bits: float  # what the integer tables say the coded symbols cost

    @property
    def total(self) -> int:
        return self.header + self.coded


class Codec:
    """Compress and decompress images with one run's trained hierarchy (CPU)."""

    def __init__(self, run_dir: str | Path, *, allow_stale: bool = False) -> None:
        run = Run(run_dir)
        self.run_dir = Path(run_dir)
        # float32, as trained: the encoders' codes (those of `progvq encode`) and the bound
        self.model = Hierarchy.load(run, allow_stale=allow_stale)
        # the run's identity: the digest of every stage's checkpoint in use
        self.identity = {state.name: state.digest for state in run.states()}
        # float64 copy: the probabilities the coder sees (module docstring)
        self.coder_model = copy.deepcopy(self.model).double()
        self.last_layout: Layout | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.image_shape

    def check_images(self, images: Tensor, where: str = "input") -> None:
        """Refuse (CodecError) anything but uint8 images (N >= 1, C, H, W) of the run's own size."""
        c, h, w = self.image_shape
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise CodecError(f"{where}: expected uint8 images N x {c} x {h} x {w}, got {tuple(images.shape)}")
        if len(images) == 0:
            raise CodecError(f"{where}: no images")
        got = tuple(int(v) for v in images.shape[1:])
        if got != (c, h, w):
            raise CodecError(f"{where}: images are {'x'.join(map(str, got))} (C x H x W); this run's are {c}x{h}x{w}")

    def compress(self, images: Tensor, batch_size: int = BATCH) -> bytes:
        """uint8 images (N, C, H, W) of the run's size -> the bytes of a compressed file (module docstring)."""
        self.check_images(images)
        images = images.cpu()
        header = {
            "run": self.identity,
            "shape": list(self.image_shape),
            "canvas": list(self.model.canvas.padded),
            "count": len(images),
            "batch": batch_size,
            "classes": self.model.num_classes,
        }
        parts = [b"", b"".join(_U32.pack(crc) for crc in image_checksums(images))]
        header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        parts[0] = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes
        coded = 0
        ideal = 0.0
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with exact_arithmetic():
                codes = self.model.encode(batch)  # float32 encoders
                padded = self.model.canvas.pad(batch)
                encoder = StreamEncoder()
                walk(self.coder_model, encoder, len(batch), codes, padded)
            words = encoder.words()
            parts.append(_U32.pack(len(words)) + words.astype("<u4").tobytes())
            coded += 4 * len(words)
            ideal += encoder.ideal_bits
        body = b"".join(parts)
        data = body + _U32.pack(zlib.crc32(body))
        self.last_layout = Layout(len(data) - coded, coded, ideal)
        return data

    def decompress(self, data: bytes, where: str = "file") -> Decompressed:
        """The bytes of a compressed file -> its images; refuses (CodecError) another run's, a damaged or
        a foreign file, and images whose checksum the decoded pixels do not match."""
        header, checksums, streams = self._parse(data, where)
        n, batch_size = header["count"], header["batch"]
        out, labels = [], []
        for b, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            with exact_arithmetic():
                padded, coded_labels = walk(self.coder_model, StreamDecoder(streams[b]), size)
            images = self.model.canvas.crop(padded).contiguous()
            for i, crc in enumerate(image_checksums(images)):
                if crc != checksums[start + i]:
                    raise CodecError(
                        f"{where}: image {start + i} decodes to other pixels than were coded (checksum mismatch): "
                        "this machine computes other probabilities than the encoder's did (README: Compression)"
                    )
            out.append(images)
            if coded_labels is not None:
                labels.append(coded_labels.cpu())
        return Decompressed(torch.cat(out), torch.cat(labels) if labels else None)

    def read_file(self, path: str | Path) -> bytes:
        """The bytes of the compressed file ``path``, read only once its prefix and header are checked.

        The magic, the version, the header (a bounded JSON document of a fixed schema: see
        :data:`HEADER_SCHEMA`), the run's identity and the image size are checked on the first bytes;
        then the file's real size is compared with the sizes the header allows (every image's
        checksum, every stream's length word, at most one 32-bit word per coded symbol), and with
        memory, before the rest is read. A file of other bytes, a lying header or a huge file is
        refused (:class:`CodecError`) in one line without reading it whole.
        """
        where = str(path)
        size = check_regular(path, "progvq compressed")
        try:
            with open(path, "rb") as f:
                head = f.read(_PREFIX.size + _HEADER_LIMIT)
                # the run and the image size are checked after the file's checksum (in _parse), so a
                # damaged header is called damaged; here the header only bounds what is read
                header, header_len = self._header(head, size, where)
                n, batch_size = header["count"], header["batch"]
                streams = math.ceil(n / batch_size)
                least = _PREFIX.size + header_len + 4 * n + 4 * streams + 4
                most = least + 4 * sum(self._max_words(min(batch_size, n - s)) for s in range(0, n, batch_size))
                if size < least:
                    raise CodecError(f"{where}: damaged (shorter than its header says)")
                if size > most:
                    raise CodecError(f"{where}: damaged ({size:,} bytes; {n} images of this run take at most {most:,})")
                check_fits(2 * size, f"{where}: decompressing {size:,} bytes")
                f.seek(0)
                data = f.read(most + 1)  # a file that grew since its size was read is still bounded
        except OSError as err:
            raise CodecError(f"{where}: cannot read ({err.strerror or err})") from None
        if len(data) != size:
            raise CodecError(f"{where}: changed while it was read ({size:,} bytes, then {len(data):,})")
        return data

    def _max_words(self, images: int) -> int:
        """The most 32-bit words a stream of ``images`` images can take: every symbol costs at most
        PRECISION (24) bits, so one word per coded symbol (pixels, codes of every level, the class)
        and a few for the coder's flush bound it."""
        symbols = (
            math.prod(self.model.canvas.padded)
            + 1
            + sum(h * w for h, w in (self.model.grid_shape(k) for k in range(1, self.model.num_levels + 1)))
        )
        return images * symbols + 8

    def _header(self, data: bytes, size: int, where: str) -> tuple[dict[str, Any], int]:
        """The header of a file of ``size`` bytes whose first bytes are ``data``, checked against its schema,
        and its length (whose run made it is :meth:`_check_run`'s)."""
        if len(data) < _PREFIX.size or not data.startswith(MAGIC):
            raise CodecError(f"{where}: not a progvq compressed file" + (" (empty)" if not data else ""))
        _, version, header_len = _PREFIX.unpack_from(data)
        if version != VERSION:
            raise CodecError(f"{where}: format version {version}; this progvq reads version {VERSION}")
        if header_len > _HEADER_LIMIT or _PREFIX.size + header_len + 4 > size:
            raise CodecError(f"{where}: damaged (a header of {header_len:,} bytes announced)")
        if len(data) < _PREFIX.size + header_len:
            raise CodecError(f"{where}: damaged (shorter than its header says)")
        try:
            header = parse_json(data[_PREFIX.size : _PREFIX.size + header_len], HEADER_SCHEMA, max_bytes=_HEADER_LIMIT)
        except UntrustedError as err:
            raise CodecError(f"{where}: damaged or not a progvq file (unreadable header: {err})") from None
        return header, header_len

    def _check_run(self, header: dict[str, Any], where: str) -> None:
        """Refuse a (checked) header of another run's file or of images of another size."""
        self._check_identity(header["run"], where)
        if header["shape"] != list(self.image_shape):
            raise CodecError(
                f"{where}: holds {'x'.join(map(str, header['shape']))} images; this run's are "
                f"{'x'.join(map(str, self.image_shape))}"
            )

    def _parse(self, data: bytes, where: str) -> tuple[dict[str, Any], list[int], list[np.ndarray]]:
        """Check and split a file: (header, image checksums, each batch's words)."""
        header, header_len = self._header(data, len(data), where)
        body, (crc,) = data[:-4], _U32.unpack_from(data, len(data) - 4)
        if zlib.crc32(body) != crc:
            raise CodecError(f"{where}: damaged or truncated (its checksum does not match its contents)")
        # whose file it is only after the checksum: a damaged header is called damaged, not another run's
        self._check_run(header, where)
        n, batch_size = header["count"], header["batch"]
        pos = _PREFIX.size + header_len
        if pos + 4 * n > len(body):
            raise CodecError(f"{where}: damaged (shorter than its header says)")
        checksums = list(np.frombuffer(body, dtype="<u4", count=n, offset=pos).tolist())
        pos += 4 * n
        streams = []
        for start in range(0, n, batch_size):
            if pos + 4 > len(body):
                raise CodecError(f"{where}: damaged (shorter than its header says)")
            (count,) = _U32.unpack_from(body, pos)
            if pos + 4 + 4 * count > len(body) or count > self._max_words(min(batch_size, n - start)):
                raise CodecError(f"{where}: damaged (shorter than its header says)")
            streams.append(np.frombuffer(body, dtype="<u4", count=count, offset=pos + 4).astype(np.uint32))
            pos += 4 + 4 * count
        if pos != len(body):
            raise CodecError(f"{where}: damaged ({len(body) - pos} bytes more than its header says)")
        return header, checksums, streams

    def _check_identity(self, recorded: dict[str, Any], where: str) -> None:
        """Refuse a file made with another run: every stage's checkpoint digest must be this run's."""
        for name in sorted(set(recorded) | set(self.identity), key=lambda s: (s == "prior", s)):
            there, here = str(recorded.get(name, "absent")), self.identity.get(name, "absent")
            if there != here:
                label = "the prior" if name == "prior" else f"stage {name}"
                raise CodecError(
                    f"{where}: made with another run ({label}'s checkpoint there {there[:12]}, "
                    f"in {self.run_dir} {here[:12]})"
                )

    def bound_bits(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """The bound on -log2 p(x) of each image (N,), in bits (``Hierarchy.nll``'s total times the dims)."""
        parts = [self.model.nll(b)["total"] for b in images.split(batch_size)]
        return torch.cat(parts).double() * self.model.canvas.dims


# ------------------------------------------------------------------ the commands' inputs and codes files


def read_inputs(
    model: Hierarchy,
    *,
    files: list[str] | None = None,
    npz: str | None = None,
    split: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The images to encode, uint8 (N, C, H, W) at the run's own size, and their labels (N,) or None.

    Exactly one source: image ``files`` (PNG/JPEG; a ``.npz`` or ``.npy`` among them is read as an
    array of images), one ``npz`` (or ``.npy``) of images, or the run's data ``split`` (``heldout`` or
    ``train``, with the data's labels when it has them). Anything of another size or colour, or no
    image at all, is refused (:class:`~progvq.errors.ProgvqError`) naming the file. ``cache_dir``: the
    run folder, where an image folder's decoded cache is kept (see :func:`~progvq.data.load_dataset`).
    """
    given = [name for name, value in (("images", files), ("--npz", npz), ("--split", split)) if value]
    if len(given) != 1:
        raise CodecError("give the images one way: image files, --npz FILE or --split heldout|train")
    shape = model.image_shape
    if split:
        data = (
            load_run_data(cache_dir, model.config)
            if cache_dir is not None
            else load_dataset(model.config.data, total_downsample=model.config.total_downsample())
        )
        images, labels = (data.heldout, data.heldout_labels) if split == "heldout" else (data.train, data.train_labels)
        return images, labels
    parts = []
    for name in files or [npz]:
        path = Path(name)
        if path.suffix.lower() in (".npz", ".npy"):
            parts.append(_checked(load_array(path), shape, path))
        else:
            parts.append(read_image(path, shape)[None])
    return torch.cat(parts), None


def _checked(images: Tensor, shape: tuple[int, int, int], path: Path) -> Tensor:
    got = tuple(int(v) for v in images.shape[1:])
    if got != shape:
        raise CodecError(
            f"{path}: images are {'x'.join(map(str, got))} (C x H x W); the run's are {'x'.join(map(str, shape))}"
        )
    return images


def _codes_dtype(codes: int) -> type:
    """The smallest integer dtype of the codes file that holds indices 0 .. codes - 1."""
    return np.uint16 if codes <= 2**16 else np.int32


def code_arrays(model: Hierarchy, codes: list[Tensor]) -> dict[str, np.ndarray]:
    """Codes [z_1 (N, h1, w1), ..., z_L] -> ``{"level1": ..., "levelL": ...}`` arrays of a codes file."""
    return {
        f"level{k}": z.cpu().numpy().astype(_codes_dtype(model.config.level(k).codes))
        for k, z in enumerate(codes, start=1)
    }


def read_codes(model: Hierarchy, path: str | Path, level: int | None = None) -> tuple[Tensor, int]:
    """A codes file's codes of ``level`` (default: its highest level) as (N, h, w) int64, and that level.

    Refuses (:class:`CodecError`) a file that is not an npz of codes, a level it lacks or the run
    lacks, and codes of another grid or out of the level's codebook.
    """
    path = Path(path)
    check_regular(path, "codes")
    expected = [f"level{k}" for k in range(1, model.num_levels + 1)] + ["labels"]
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                raise CodecError(f"{path}: not an npz of codes (`progvq encode` writes one)")
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()}
                unknown = sorted(name for name in members if name not in expected)
                if unknown:
                    shown = json.dumps(unknown[0])  # a name may hold a newline: the message stays one line
                    raise CodecError(
                        f"{path}: holds an array {shown}; a codes file of this run holds {', '.join(expected)}"
                    )
                have = sorted(int(name[5:]) for name in members if name.startswith("level"))
                if not have:
                    raise CodecError(f"{path}: no codes (arrays level1, level2, ...; `progvq encode` writes them)")
                level = have[-1] if level is None else level
                if level not in have:
                    raise CodecError(f"{path}: no codes of level {level} (it has levels {', '.join(map(str, have))})")
                info = members[f"level{level}"]
                with zf.open(info) as member:
                    # the header's announced size is checked against the member's length and memory first
                    array = read_npy(member, info.file_size, f"{path}[level{level}]")
    except ProgvqError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CodecError(f"{path}: cannot read codes ({' '.join(str(err).split()) or type(err).__name__})") from None
    if not 1 <= level <= model.num_levels:
        raise CodecError(f"{path}: codes of level {level}, but the run has levels 1..{model.num_levels}")
    h, w = model.grid_shape(level)
    count = model.config.level(level).codes
    if array.ndim != 3 or tuple(array.shape[1:]) != (h, w) or not np.issubdtype(array.dtype, np.integer):
        raise CodecError(
            f"{path}[level{level}]: expected integer codes N x {h} x {w}, got {array.dtype} {tuple(array.shape)}"
        )
    if len(array) == 0:
        raise CodecError(f"{path}[level{level}]: no codes")
    if array.min() < 0 or array.max() >= count:
        raise CodecError(f"{path}[level{level}]: codes out of range 0..{count - 1}")
    return torch.from_numpy(array.astype(np.int64)), level


def read_code_labels(path: str | Path, count: int, classes: int) -> Tensor | None:
    """A codes file's ``labels``, (count,) int64 in 0..classes-1, or None when it holds none (codes of
    image files rather than of a labelled split). Refuses (:class:`CodecError`) labels of another count,
    not integers, or outside the classes, naming the file."""
    path = Path(path)
    check_regular(path, "codes")
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            info = next((i for i in zf.infolist() if i.filename.removesuffix(".npy") == "labels"), None)
            if info is None:
                return None
            with zf.open(info) as member:
                array = read_npy(member, info.file_size, f"{path}[labels]")
    except ProgvqError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CodecError(f"{path}: cannot read labels ({' '.join(str(err).split()) or type(err).__name__})") from None
    if array.shape != (count,) or not np.issubdtype(array.dtype, np.integer):
        raise CodecError(f"{path}[labels]: expected {count} integer classes, got {array.dtype} {tuple(array.shape)}")
    if count and (array.min() < 0 or array.max() >= classes):
        raise CodecError(f"{path}[labels]: classes out of range 0..{classes - 1}")
    return torch.from_numpy(array.astype(np.int64))

"""How one shard becomes the parts of a multipart upload: pure, decided before a byte is sent.

S3 assembles an object from up to 10,000 parts of at least 5 MiB each (the last may be smaller);
a part is either bytes sent by the client or a range of another object copied by the server
(``UploadPartCopy``). A shard's bytes are pieces: ranges the server can copy (tensors copied from a
source in the same store, and zeros, copied from a zeros object) and ranges made here (the header,
casts, copies from a local or web source). The plan keeps as much as it can on the server:

- made pieces are sent, in parts of about :data:`MADE_PART_BYTES`;
- a copied piece of 5 MiB or more is copied by the server, in parts of at most
  :data:`COPY_PART_BYTES`;
- a small piece after a part the server copies is :class:`Joined` to it: the server first
  assembles an object of that part followed by the small piece (whose part there is the last, so
  any size is allowed), then copies it whole; one level only, so the server copies each byte at
  most twice;
- the shard's first bytes (its header), and small pieces after a joined part, are made, and sent
  with enough of what follows to fill one part of 5 MiB: the only bytes of copied tensors that pass
  through the client.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

from shardsurgeon.errors import OutputError
from shardsurgeon.plan.layout import CopyRun, PlacedPiece, ShardLayout
from shardsurgeon.plan.tensors import Piece, Zeros

MIN_PART_BYTES = 5 << 20
"""S3's smallest part but the last."""
MAX_PARTS = 10_000
MADE_PART_BYTES = 10 << 20
"""Parts made here are at most this, twice the smallest (so equal shares of a larger run never
fall below it): the memory a part costs while it is made and sent. 10,000 of them make 100 GiB."""
COPY_PART_BYTES = 512 << 20
"""Parts copied by the server are at most this: each request stays short, and a retry cheap."""
ZEROS_NBYTES = 16 << 20
"""Size of the all-zero object that zero tensors are copied from (in pieces of at most this)."""


@dataclass(frozen=True, slots=True)
class Made:
    """Bytes ``offset`` to ``offset + nbytes`` of the shard, made here and sent."""

    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Copied:
    """Bytes ``offset`` to ``offset + nbytes`` of the shard, copied by the server from the object at
    ``url``, starting at its byte ``src_offset``."""

    offset: int
    nbytes: int
    url: str
    src_offset: int


@dataclass(frozen=True, slots=True)
class Joined:
    """An object the server assembles from ``base`` then ``tail``; the shard's part copies all of it."""

    base: Copied
    tail: Made | Copied

    @property
    def offset(self) -> int:
        return self.base.offset

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.tail.nbytes


Part = Made | Copied | Joined


def plan_parts(shard: ShardLayout, zeros_url: str | None) -> list[Part]:
    """The parts of ``shard``, in order. Copies from ``s3://`` sources are left to the server, and
    zero tensors too when ``zeros_url`` names an all-zero object of :data:`ZEROS_NBYTES`."""
    parts: list[Part] = []
    for piece in _pieces(shard, zeros_url):
        last = parts[-1] if parts else None
        if isinstance(last, Made) and last.nbytes < MIN_PART_BYTES:
            # a made part under 5 MiB (the header; small pieces after a joined part) must reach 5 MiB
            # before a part of another kind follows: it takes what comes next, as made bytes
            need = MIN_PART_BYTES - last.nbytes
            if isinstance(piece, Made) or piece.nbytes - need < MIN_PART_BYTES:
                parts[-1:] = _made(Made(last.offset, last.nbytes + piece.nbytes))
                continue
            parts[-1] = Made(last.offset, MIN_PART_BYTES)
            piece = replace(
                piece, offset=piece.offset + need, nbytes=piece.nbytes - need, src_offset=piece.src_offset + need
            )
        if piece.nbytes >= MIN_PART_BYTES:
            parts.extend(_split(piece))
        elif isinstance(last, Copied):  # one level of joining only, on a base of 5 to 10 MiB: the server's
            parts[-1:] = _joined(last, piece)  # work stays linear in the shard's size
        elif isinstance(last, Made):
            parts[-1:] = _made(Made(last.offset, last.nbytes + piece.nbytes))
        else:  # after a joined part: a new made part, which grows to 5 MiB as above
            parts.append(Made(piece.offset, piece.nbytes))
    if len(parts) > MAX_PARTS:
        raise OutputError(
            f"{shard.name}: would be {len(parts)} parts, more than S3's {MAX_PARTS}; pass a smaller --max-shard-size"
        )
    return parts


def _pieces(shard: ShardLayout, zeros_url: str | None) -> Iterator[Made | Copied]:
    """The shard's bytes in order as pieces, neighbouring made ones merged."""
    pending = Made(0, shard.header_nbytes)
    for segment in shard.segments():
        match segment:
            case CopyRun(path=str() as url) if url.startswith("s3://"):
                copied: list[Copied] = [Copied(segment.offset, segment.nbytes, url, segment.src_offset)]
            case PlacedPiece(piece=Piece(op=Zeros(), nbytes=nbytes)) if zeros_url is not None:
                count = -(-nbytes // ZEROS_NBYTES)  # equal shares: each at least 5 MiB if the whole is
                bounds = [segment.offset + nbytes * number // count for number in range(count + 1)]
                copied = [Copied(start, end - start, zeros_url, 0) for start, end in itertools.pairwise(bounds)]
            case _:
                made = segment.nbytes if isinstance(segment, CopyRun) else segment.piece.nbytes
                pending = Made(pending.offset, pending.nbytes + made)
                continue
        if pending.nbytes:
            yield pending
        yield from copied
        pending = Made(copied[-1].offset + copied[-1].nbytes, 0)
    if pending.nbytes:
        yield pending


def _joined(base: Copied, tail: Made | Copied) -> list[Part]:
    """``tail`` joined to the end of ``base``, only 5 MiB of which is copied twice when it is larger."""
    if base.nbytes < 2 * MIN_PART_BYTES:
        return [Joined(base, tail)]
    head = base.nbytes - MIN_PART_BYTES
    rest = replace(base, offset=base.offset + head, nbytes=MIN_PART_BYTES, src_offset=base.src_offset + head)
    return [replace(base, nbytes=head), Joined(rest, tail)]


def _made(part: Made) -> list[Part]:
    """A made part, cut in parts of at most :data:`MADE_PART_BYTES` when it grew larger."""
    return _split(part) if part.nbytes > MADE_PART_BYTES else [part]


def _split(piece: Made | Copied) -> list[Part]:
    """``piece`` (5 MiB or more) in parts of about equal size, each at least 5 MiB and at most the
    limit of its kind (which is at least twice 5 MiB, so equal shares never fall below it)."""
    limit = MADE_PART_BYTES if isinstance(piece, Made) else COPY_PART_BYTES
    count = -(-piece.nbytes // limit)
    bounds = [piece.nbytes * number // count for number in range(count + 1)]
    return [
        replace(piece, offset=piece.offset + start, nbytes=end - start)
        if isinstance(piece, Made)
        else replace(piece, offset=piece.offset + start, nbytes=end - start, src_offset=piece.src_offset + start)
        for start, end in itertools.pairwise(bounds)
    ]


def sent_nbytes(part: Part) -> int:
    """Bytes of ``part`` that the client sends."""
    match part:
        case Made():
            return part.nbytes
        case Copied():
            return 0
        case Joined():
            return sent_nbytes(part.tail)

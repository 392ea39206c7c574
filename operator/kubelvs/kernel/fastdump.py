"""The dump's fast path: real servers and services decoded by learnt message shape.

The first message of a shape (see :class:`_Layout`) is parsed attribute by attribute; every
later message of that shape is unpacked with one ``struct`` call, and a whole receive buffer of
same-shaped messages is checked with one masked compare and unpacked by ``iter_unpack``. A
message whose attribute headers differ in any way goes to the plain decoders
(:func:`kubelvs.kernel.codec.decode_service`, :func:`kubelvs.kernel.codec.decode_dest`), and what
the fast path gives equals what they give (``tests/unit/test_codec_properties.py`` checks it over
random messages).

It pays for itself: a dump of 10,000 services x 10 real servers in the VM took 2.5x as long with
the plain decoders with counters (135 s against 54 s, the host loaded) and 3.7x without (101 s
against 27 s); bench/results.json's "dump_decoder", from ``bench/ipvs_bench.py --dump-decoders``.
"""

from __future__ import annotations

import operator
import socket
import struct
from typing import Any

from kubelvs.core.model import (
    AF_INET,
    AF_INET6,
    SVC_F_HASHED,
    SVC_F_PERSISTENT,
    Counters,
    DestCounters,
    Destination,
    DestKey,
    Method,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
    fast_constructor,
)
from kubelvs.kernel.codec import (
    _HEADER,
    _NLA,
    CMD_ATTR_DEST,
    CMD_ATTR_SERVICE,
    DEST_ACTIVE_CONNS,
    DEST_ADDR,
    DEST_ADDR_FAMILY,
    DEST_FWD_METHOD,
    DEST_INACT_CONNS,
    DEST_L_THRESH,
    DEST_PERSIST_CONNS,
    DEST_PORT,
    DEST_STATS,
    DEST_STATS64,
    DEST_TUN_FLAGS,
    DEST_TUN_PORT,
    DEST_TUN_TYPE,
    DEST_U_THRESH,
    DEST_WEIGHT,
    METHODS,
    STATS_FIELDS,
    SVC_ADDR,
    SVC_AF,
    SVC_FLAGS,
    SVC_FWMARK,
    SVC_NETMASK,
    SVC_PE_NAME,
    SVC_PORT,
    SVC_PROTOCOL,
    SVC_SCHED_NAME,
    SVC_STATS,
    SVC_STATS64,
    SVC_TIMEOUT,
    address_text,
    netmask_prefix,
    tunnel_checksum,
    tunnel_type,
)

_TOP, _SVC, _DEST, _STATS = 0, 1, 2, 3
_NESTED_CONTEXT = {
    (_TOP, CMD_ATTR_SERVICE): _SVC,
    (_TOP, CMD_ATTR_DEST): _DEST,
    (_SVC, SVC_STATS): _STATS,
    (_SVC, SVC_STATS64): _STATS,
    (_DEST, DEST_STATS): _STATS,
    (_DEST, DEST_STATS64): _STATS,
}
_RAW_ATTRS = {(_SVC, SVC_ADDR), (_SVC, SVC_SCHED_NAME), (_SVC, SVC_PE_NAME), (_DEST, DEST_ADDR)}
_PAIR_ATTRS = {(_SVC, SVC_FLAGS)}  # struct ip_vs_flags: two u32
_NUMBER_FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}
_ZERO = 0  # the first unpacked value: the genlmsghdr's reserved field, 0 in every matching message

Path = tuple[int, ...]


class _Layout:
    """What one dump message looks like, so that later messages of the same shape are decoded
    with a few C calls instead of an attribute-by-attribute walk.

    A message has the shape when its bytes, masked to every header field (the message length,
    type and command, the genlmsghdr's version and reserved field, and every attribute's length
    and type) equal the sample's: then every attribute sits at the sample's offset with the
    sample's size. :meth:`unpacker` compiles a ``struct.Struct`` reading just the wanted
    attributes of such a message (big-endian ones, the ports, come out byte-swapped).
    """

    def __init__(self, data: memoryview) -> None:
        length, _kind, _flags, _seq, _pid, _cmd, _version, reserved = _HEADER.unpack_from(data, 0)
        if reserved != 0 or length != len(data):
            raise ValueError("not a layout sample")
        self.length = length
        # (path, offset of the payload, payload size, context) of every non-nested attribute.
        self.attrs: dict[Path, tuple[int, int, int]] = {}
        self.nests: set[Path] = set()
        headers = [(0, 4), (4, 2), (16, 4)]  # nlmsg_len, nlmsg_type; cmd, version, reserved
        self._walk(data, _HEADER.size, length, _TOP, (), headers)
        mask = bytearray(length)
        for start, size in headers:
            mask[start : start + size] = b"\xff" * size
        self.mask = int.from_bytes(mask, "little")
        self.expected = int.from_bytes(data, "little") & self.mask

    def _walk(
        self, data: memoryview, offset: int, end: int, context: int, path: Path, headers: list[tuple[int, int]]
    ) -> None:
        while offset + 4 <= end:
            length, raw_kind = _NLA.unpack_from(data, offset)
            if length < 4 or offset + length > end:
                raise ValueError("truncated attribute")
            headers.append((offset, 4))
            kind = raw_kind & 0x3FFF
            sub = _NESTED_CONTEXT.get((context, kind))
            if sub is not None:
                self.nests.add((*path, kind))
                self._walk(data, offset + 4, offset + length, sub, (*path, kind), headers)
            elif length > 4:
                self.attrs[(*path, kind)] = (offset + 4, length - 4, context)
            offset += (length + 3) & ~3

    def unpacker(self, paths: list[Path]) -> tuple[struct.Struct, dict[Path, int]]:
        """A struct reading the genlmsghdr's reserved field (index 0, always 0) and then the
        attributes at ``paths`` that the message has; where each is in the unpacked tuple."""
        present = sorted((self.attrs[path][0], path) for path in set(paths) if path in self.attrs)
        formats = ["18xH"]
        position = 20
        index: dict[Path, int] = {}
        count = 1
        for offset, path in present:
            _offset, size, context = self.attrs[path]
            if offset > position:
                formats.append(f"{offset - position}x")
            index[path] = count
            if (context, path[-1]) in _PAIR_ATTRS and size == 8:
                formats.append("II")
                count += 2
            elif (context, path[-1]) in _RAW_ATTRS or size not in _NUMBER_FORMATS:
                formats.append(f"{size}s")
                count += 1
            else:
                formats.append(_NUMBER_FORMATS[size])
                count += 1
            position = offset + size
        return struct.Struct("=" + "".join(formats)), index

    def stats_paths(self, top: int, stats: int, stats64: int) -> list[Path]:
        """The ten counters' paths, in the 64-bit nest when there is one (as decode_* read them)."""
        nest = stats64 if (top, stats64) in self.nests else stats
        return [(top, nest, kind) for kind in range(1, STATS_FIELDS + 1)]


_make_destination = Destination  # a value_class: its own constructor is the fast one
_make_counters = fast_constructor(Counters)
_make_dest_counters = fast_constructor(DestCounters)
_from_bytes = int.from_bytes


class _Shape:
    """One learnt message shape: its check, its struct (the message's full length) and what the
    decoder compiled from its layout (None: the fast path cannot decode it)."""

    __slots__ = ("_expected_bytes", "_mask_bytes", "_runs", "compiled", "expected", "length", "mask", "struct")

    def __init__(self, layout: _Layout, st: struct.Struct | None, compiled: tuple[Any, ...] | None) -> None:
        self.length = layout.length
        self.mask = layout.mask
        self.expected = layout.expected
        self.struct = st
        self.compiled = compiled
        self._mask_bytes = layout.mask.to_bytes(layout.length, "little")
        self._expected_bytes = layout.expected.to_bytes(layout.length, "little")
        self._runs: dict[int, tuple[int, int]] = {}

    def run(self, count: int) -> tuple[int, int]:
        """The mask and expected value of ``count`` messages of this shape back to back."""
        found = self._runs.get(count)
        if found is None:
            found = self._runs[count] = (
                _from_bytes(self._mask_bytes * count, "little"),
                _from_bytes(self._expected_bytes * count, "little"),
            )
        return found


class _Decoder:
    """Messages of a dump, by shape: each shape's layout is learnt from its first message."""

    MAX_SHAPES = 16  # per message length (scheduler names of one length, say)

    def __init__(self, with_counters: bool) -> None:
        self.with_counters = with_counters
        self._shapes: dict[int, list[_Shape]] = {}

    def _compile(self, layout: _Layout) -> tuple[struct.Struct, tuple[Any, ...]] | None:
        """(a struct of the message's full length, what ``decode`` needs) for a layout, or None
        when the fast path cannot decode messages of that shape."""
        raise NotImplementedError

    def _shape(self, view: memoryview, offset: int, length: int) -> _Shape | None:
        """The usable shape of the message at ``offset`` (learnt if new), or None: generic."""
        shapes = self._shapes.get(length)
        if shapes is None:
            shapes = self._shapes[length] = []
        masked = _from_bytes(view[offset : offset + length], "little")
        for shape in shapes:
            if masked & shape.mask == shape.expected:
                return shape if shape.compiled is not None else None
        if len(shapes) >= self.MAX_SHAPES:
            return None
        try:
            layout = _Layout(view[offset : offset + length])
        except (ValueError, struct.error):
            return None
        found = self._compile(layout)
        shape = _Shape(layout, *(found if found is not None else (None, None)))
        shapes.append(shape)
        return shape if shape.compiled is not None else None

    def _run(self, view: memoryview, offset: int, length: int, end: int) -> tuple[_Shape, int] | None:
        """The shape of the message at ``offset`` and how many messages from there (up to
        ``end``) have it, back to back: all checked with one masked compare."""
        shape = self._shape(view, offset, length)
        if shape is None:
            return None
        count = (end - offset) // length if length & 3 == 0 else 1
        if count > 1:
            mask, expected = shape.run(count)
            if _from_bytes(view[offset : offset + count * length], "little") & mask != expected:
                count = 1
        return shape, count


def _full_length(st: struct.Struct, length: int) -> struct.Struct:
    return struct.Struct(st.format + f"{length - st.size}x") if st.size < length else st


_DEST_FIELDS = (
    DEST_ADDR,
    DEST_PORT,
    DEST_WEIGHT,
    DEST_FWD_METHOD,
    DEST_U_THRESH,
    DEST_L_THRESH,
    DEST_ADDR_FAMILY,
    DEST_ACTIVE_CONNS,
    DEST_INACT_CONNS,
    DEST_PERSIST_CONNS,
)
_DEST_TUNNEL = (DEST_TUN_TYPE, DEST_TUN_PORT, DEST_TUN_FLAGS)
_IPIP, _NO_CHECKSUM, _TUN = TunnelType.IPIP, TunnelChecksum.NONE, Method.TUN
_new_tuple = tuple.__new__  # DestKey(address, port) without NamedTuple's Python-level __new__
_ntohs = socket.ntohs


class DestDecoder(_Decoder):
    """Decodes the messages of GET_DEST dumps: a few C calls per message of a known shape, and a
    whole receive buffer of same-shaped messages checked at once and unpacked by iter_unpack.

    What it gives for a message equals what :func:`decode_dest` gives (with None for counters
    when they are not wanted); messages it cannot decode are left to decode_dest.
    """

    def __init__(self, with_counters: bool) -> None:
        super().__init__(with_counters)
        self._addresses: dict[tuple[int, bytes], str] = {}

    def _compile(self, layout: _Layout) -> tuple[struct.Struct, tuple[Any, ...]] | None:
        top = CMD_ATTR_DEST
        if (top, DEST_ADDR) not in layout.attrs or (top, DEST_PORT) not in layout.attrs:
            return None
        fields = [(top, kind) for kind in _DEST_FIELDS]
        tunnel = [(top, kind) for kind in _DEST_TUNNEL]
        stats = layout.stats_paths(top, DEST_STATS, DEST_STATS64) if self.with_counters else []
        st, index = layout.unpacker(fields + tunnel + stats)
        has_family = (top, DEST_ADDR_FAMILY) in index
        return _full_length(st, layout.length), (
            operator.itemgetter(*(index.get(path, _ZERO) for path in fields)),
            has_family,
            operator.itemgetter(*(index.get(path, _ZERO) for path in tunnel)),
            operator.itemgetter(*(index.get(path, _ZERO) for path in stats)) if stats else None,
        )

    def decode(
        self, view: memoryview, offset: int, length: int, service_family: int
    ) -> tuple[Destination, DestCounters | None] | None:
        """One message, or None: not a shape the fast path decodes (use :func:`decode_dest`)."""
        dests: list[Destination] = []
        counters: list[tuple[tuple[ServiceKey, DestKey], DestCounters]] = []
        key = ServiceKey(service_family, 0, "", 0)
        wanted = counters if self.with_counters else None
        if self.decode_run(view, offset, length, offset + length, key, dests, wanted) == offset:
            return None
        return dests[0], counters[0][1] if counters else None

    def decode_run(
        self,
        view: memoryview,
        offset: int,
        length: int,
        end: int,
        key: ServiceKey,
        dests: list[Destination],
        counters: list[tuple[tuple[ServiceKey, DestKey], DestCounters]] | None,
    ) -> int:
        """Decode the message at ``offset`` (``length`` bytes) and the ones of the same shape
        right after it (up to ``end``), real servers of the service ``key``: append each to
        ``dests`` and, when ``counters`` is a list, ``((key, dest.key), its counters)`` to it.
        Return the offset after them, or ``offset`` itself when the fast path does not decode
        that message (nothing appended)."""
        found = self._run(view, offset, length, end)
        if found is None:
            return offset
        shape, count = found
        assert shape.struct is not None and shape.compiled is not None
        fields, has_family, tunnel, getter = shape.compiled
        if counters is not None and getter is None:
            return offset  # learnt without counters: not for this call
        service_family = key.family
        addresses = self._addresses
        append = dests.append
        add_counters = counters.append if counters is not None else None
        stop = offset + count * length
        at = offset
        for values in shape.struct.iter_unpack(view[offset:stop]):
            raw, port, weight, method, upper, lower, family, active, inactive, persistent = fields(values)
            if not has_family:
                family = service_family
            address = addresses.get((family, raw))
            if address is None:
                address = addresses[family, raw] = address_text(family, raw)
            method = METHODS[method & 7]
            port = _ntohs(port)
            if method is _TUN:
                kind, tunnel_port, checksum = tunnel(values)
                dest = _make_destination(
                    address,
                    port,
                    weight,
                    method,
                    upper,
                    lower,
                    tunnel_type(kind),
                    _ntohs(tunnel_port),
                    tunnel_checksum(checksum),
                    0 if family == service_family else family,
                )
            else:
                dest = _make_destination(
                    address,
                    port,
                    weight,
                    method,
                    upper,
                    lower,
                    _IPIP,
                    0,
                    _NO_CHECKSUM,
                    0 if family == service_family else family,
                )
            append(dest)
            if add_counters is not None:
                add_counters(
                    (
                        (key, _new_tuple(DestKey, (address, port))),
                        _make_dest_counters(_make_counters(*getter(values)), active, inactive, persistent),
                    )
                )
            at += length
        return stop


ServiceSettings = tuple[ServiceKey, str, int, int, int, Counters | None]
_SERVICE_FIELDS = (SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED_NAME, SVC_FLAGS, SVC_NETMASK, SVC_TIMEOUT)


class ServiceDecoder(_Decoder):
    """Decodes the messages of a GET_SERVICE dump, like :class:`DestDecoder` for real servers
    (fwmark services are left to :func:`decode_service`)."""

    def __init__(self, with_counters: bool) -> None:
        super().__init__(with_counters)
        self._names: dict[bytes, str] = {}

    def _compile(self, layout: _Layout) -> tuple[struct.Struct, tuple[Any, ...]] | None:
        top = CMD_ATTR_SERVICE
        fields = [(top, kind) for kind in _SERVICE_FIELDS]
        if any(path not in layout.attrs for path in fields) or (top, SVC_FWMARK) in layout.attrs:
            return None
        stats = layout.stats_paths(top, SVC_STATS, SVC_STATS64) if self.with_counters else []
        st, index = layout.unpacker(fields + stats)
        return _full_length(st, layout.length), (
            operator.itemgetter(*(index[path] for path in fields)),
            operator.itemgetter(*(index.get(path, _ZERO) for path in stats)) if stats else None,
        )

    def decode(self, view: memoryview, offset: int, length: int) -> tuple[VirtualService, Counters | None] | None:
        """One message, as :func:`decode_service` gives it (None for counters when they are not
        wanted), or None: not a shape the fast path decodes."""
        found = self.decode_settings(view, offset, length)
        if found is None:
            return None
        return VirtualService(*found[:5]), found[5]

    def decode_settings(self, view: memoryview, offset: int, length: int) -> ServiceSettings | None:
        """What :meth:`decode` gives, as the VirtualService's fields (key, scheduler, flags,
        persistence timeout, netmask) and the counters: for a caller that builds the
        VirtualService itself, with its real servers."""
        shape = self._shape(view, offset, length)
        if shape is None:
            return None
        assert shape.struct is not None and shape.compiled is not None
        values = shape.struct.unpack_from(view, offset)
        fields, counters = shape.compiled
        family, protocol, raw, port, sched, flags, netmask, timeout = fields(values)
        if family != AF_INET and family != AF_INET6:
            return None
        address = address_text(family, raw)
        netmask = netmask_prefix(family, netmask)
        name = self._names.get(sched)
        if name is None:
            name = self._names[sched] = sched.rstrip(b"\0").decode()
        return (
            ServiceKey(family, protocol, address, _ntohs(port)),
            name,
            flags & ~(SVC_F_PERSISTENT | SVC_F_HASHED),
            timeout if flags & SVC_F_PERSISTENT else 0,
            netmask,
            _make_counters(*counters(values)) if counters is not None else None,
        )

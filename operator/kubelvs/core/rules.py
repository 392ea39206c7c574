"""IPVS state as ``ipvsadm -Sn`` rules: the text users know, and what tests compare with."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from kubelvs.core.model import (
    AF_INET,
    SCHED_FLAG_BITS,
    SVC_F_ONEPACKET,
    Destination,
    Method,
    Protocol,
    ServiceKey,
    TunnelChecksum,
    TunnelType,
    VirtualService,
    format_hostport,
)

_PROTOCOL_OPTION: dict[int, str] = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}
_CHECKSUM_OPTION = {
    TunnelChecksum.NOCSUM: "--tun-nocsum",
    TunnelChecksum.CSUM: "--tun-csum",
    TunnelChecksum.REMCSUM: "--tun-remcsum",
}


def service_option(key: ServiceKey) -> str:
    if key.fwmark:
        return f"-f {key.fwmark}"
    option = _PROTOCOL_OPTION.get(key.protocol) or f"--protocol-{key.protocol}"  # unknown to ipvsadm too
    return f"{option} {format_hostport(key.address, key.port)}"


def service_rule(service: VirtualService) -> str:
    parts = [f"-A {service_option(service.key)} -s {service.scheduler}"]
    if service.persistence_timeout:
        parts.append(f"-p {service.persistence_timeout}")
        prefix = service.effective_netmask
        if service.key.family == AF_INET and prefix != 32:
            parts.append(f"-M {ipaddress.IPv4Network(f'0.0.0.0/{prefix}').netmask}")
        elif service.key.family != AF_INET and prefix != 128:
            parts.append(f"-M {prefix}")
    if service.sched_flags & SVC_F_ONEPACKET:
        parts.append("-o")
    names = [
        name
        for name, bit in SCHED_FLAG_BITS.items()
        if name.startswith(service.scheduler + "-") and service.sched_flags & bit
    ]
    if names:
        parts.append(f"-b {','.join(names)}")
    return " ".join(parts)


def dest_rule(key: ServiceKey, dest: Destination) -> str:
    """A real server as ``ipvsadm -Sn`` prints it (tunnel options after the weight)."""
    parts = [f"-a {service_option(key)} -r {format_hostport(dest.address, dest.port)} {dest.method.ipvsadm_flag}"]
    parts.append(f"-w {dest.weight}")
    if dest.upper_threshold:
        parts.append(f"-x {dest.upper_threshold}")
    if dest.lower_threshold:
        parts.append(f"-y {dest.lower_threshold}")
    if dest.method is Method.TUN:
        parts.append(f"--tun-type {dest.tunnel_type.name.lower()}")
        if dest.tunnel_type is TunnelType.GUE:
            parts.append(f"--tun-port {dest.tunnel_port}")
        if dest.tunnel_checksum in _CHECKSUM_OPTION:
            parts.append(_CHECKSUM_OPTION[dest.tunnel_checksum])
    return " ".join(parts)


def format_rules(services: Mapping[ServiceKey, VirtualService] | Iterable[VirtualService]) -> str:
    """Rules in a deterministic order: services by key, each followed by its real servers."""
    items = services.values() if isinstance(services, Mapping) else services
    lines = []
    for service in sorted(items, key=lambda s: s.key):
        lines.append(service_rule(service))
        lines.extend(dest_rule(service.key, d) for d in service.destinations)
    return "\n".join(lines) + ("\n" if lines else "")

"""Tiny traffic agent run inside a network namespace by tests/kernel/topology.py (stdlib only).

nsagent.py serve --name rs1 --ready FILE [--tcp PORT ...] [--udp PORT ...]
    HTTP on every --tcp port (IPv4 0.0.0.0 and IPv6 ::): GET / answers "<name>\\n",
    GET /info answers "<name> <client-ip> <local-ip>\\n".  UDP echo on every --udp port:
    answers "<name>" (or "<name> <client-ip> <local-ip>" to a datagram "info"), sent from
    the address the datagram was sent to (IP_PKTINFO), so DR/TUN replies come from the VIP.
    Writes FILE once every socket is bound; runs until killed.
nsagent.py http --host VIP --port P --n N [--src ADDR] [--path /] [--timeout S]
nsagent.py udp  --host VIP --port P --n N [--src ADDR] [--payload ping] [--timeout S]
    N requests, each on a new connection / new socket (new source port), one at a time;
    prints a JSON list of the N answer bodies (stripped), "ERR:<reason>" for a failed one.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _http_handle(conn: socket.socket, name: str) -> None:
    try:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1").split()
        path = line[1] if len(line) >= 2 else "/"
        peer = conn.getpeername()[0]
        local = conn.getsockname()[0]
        body = f"{name} {peer} {local}\n" if path.startswith("/info") else f"{name}\n"
        payload = body.encode()
        conn.sendall(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
    except OSError:
        pass
    finally:
        conn.close()


def _udp_reply(sock: socket.socket, name: str) -> None:
    try:
        data, anc, _flags, peer = sock.recvmsg(4096, socket.CMSG_SPACE(32))
    except OSError:
        return
    local = None
    cmsgs = []
    for level, ctype, cdata in anc:
        if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and len(cdata) >= 12:
            _ifindex, _spec, dst = struct.unpack("=i4s4s", cdata[:12])
            local = socket.inet_ntop(socket.AF_INET, dst)
            cmsgs = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst, b"\0" * 4))]
        elif level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO and len(cdata) >= 20:
            dst = cdata[:16]
            local = socket.inet_ntop(socket.AF_INET6, dst)
            cmsgs = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, dst + struct.pack("=i", 0))]
    body = f"{name} {peer[0]} {local}" if data.strip() == b"info" else name
    with contextlib.suppress(OSError):
        sock.sendmsg([body.encode()], cmsgs, 0, peer)


def serve(args: argparse.Namespace) -> int:
    sel = selectors.DefaultSelector()
    for port in args.tcp:
        for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(128)
            sel.register(s, selectors.EVENT_READ, "tcp")
    for port in args.udp:
        for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            s.bind((host, port))
            sel.register(s, selectors.EVENT_READ, "udp")
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, args.ready)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "tcp":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                threading.Thread(target=_http_handle, args=(conn, args.name), daemon=True).start()
            else:
                _udp_reply(sock, args.name)


def _bind_src(sock: socket.socket, src: str | None) -> None:
    if src:
        sock.bind((src, 0))


def http(args: argparse.Namespace) -> int:
    fam = _family(args.host)
    out: list[str] = []
    deadline = time.monotonic() + args.n * (args.timeout + 1) + 5
    for _ in range(args.n):
        if time.monotonic() > deadline:
            out.append("ERR:deadline")
            continue
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(args.timeout)
        try:
            _bind_src(s, args.src)
            s.connect((args.host, args.port))
            host = f"[{args.host}]" if fam == socket.AF_INET6 else args.host
            s.sendall(f"GET {args.path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
                out.append("ERR:bad-response:" + head[:40].decode("latin-1"))
            else:
                out.append(body.decode("utf-8", "replace").strip())
        except TimeoutError:
            out.append("ERR:timeout")
        except OSError as exc:
            out.append(f"ERR:{type(exc).__name__}:{exc.errno}")
        finally:
            s.close()
    print(json.dumps(out))
    return 0


def udp(args: argparse.Namespace) -> int:
    fam = _family(args.host)
    out: list[str] = []
    deadline = time.monotonic() + args.n * (args.timeout + 1) + 5
    for _ in range(args.n):
        if time.monotonic() > deadline:
            out.append("ERR:deadline")
            continue
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(args.timeout)
        try:
            _bind_src(s, args.src)
            # connect(): only an answer from the VIP itself is accepted (checks DR/TUN source).
            s.connect((args.host, args.port))
            s.send(args.payload.encode())
            out.append(s.recv(4096).decode("utf-8", "replace").strip())
        except TimeoutError:
            out.append("ERR:timeout")
        except OSError as exc:
            out.append(f"ERR:{type(exc).__name__}:{exc.errno}")
        finally:
            s.close()
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nsagent.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--ready", required=True)
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    for cmd in ("http", "udp"):
        c = sub.add_parser(cmd)
        c.add_argument("--host", required=True)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--n", type=int, default=1)
        c.add_argument("--src")
        c.add_argument("--timeout", type=float, default=3.0)
        if cmd == "http":
            c.add_argument("--path", default="/")
        else:
            c.add_argument("--payload", default="ping")
    args = p.parse_args(argv)
    return {"serve": serve, "http": http, "udp": udp}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

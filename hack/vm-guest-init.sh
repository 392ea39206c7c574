#!/bin/sh
# Guest-side init step of hack/vm.py: runs as root inside the VM, loads the kernel modules the
# kubelvs kernel tests need, prepares writable state directories, then execs the command.
# The environment (KUBELVS_IN_VM=1, HOME, TMPDIR, XDG_*, PATH) was exported by hack/vm.py.

# IPVS core, every scheduler the kernel ships, tunnels (TUN forwarding: ipip; IPv6: ip6_tunnel),
# and what the netns topologies use (veth, bridge, dummy).
MODULES="ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_lblc ip_vs_lblcr ip_vs_dh ip_vs_sh
ip_vs_sed ip_vs_nq ip_vs_fo ip_vs_ovf ip_vs_mh ipip tunnel4 ip6_tunnel tunnel6 veth bridge dummy
nf_conntrack"
# One modprobe for all: each modprobe process re-reads the module indexes over 9p, ~1 s apiece
# under TCG, so one by one costs ~20 s and `modprobe -a` ~5 s.
# shellcheck disable=SC2086
if ! modprobe -a $MODULES 2>/dev/null; then
    for m in $MODULES; do
        modprobe "$m" 2>/dev/null || echo "vm-guest-init: modprobe $m failed" >&2
    done
fi

for d in "${HOME:-/tmp/kubelvs-vm/home}" "${XDG_CACHE_HOME:-/tmp/kubelvs-vm/cache}" \
         "${TMPDIR:-/tmp/kubelvs-vm/tmp}" "${XDG_RUNTIME_DIR:-/tmp/kubelvs-vm/tmp/run}"; do
    mkdir -p "$d"
done
chmod 700 "${XDG_RUNTIME_DIR:-/tmp/kubelvs-vm/tmp/run}" 2>/dev/null
# `ip netns add` needs a writable /run/netns (tmpfs in the guest, but be sure).
mkdir -p /run/netns 2>/dev/null
ip link set lo up 2>/dev/null

# Python and the venv from squashfs images (see python_images() in hack/vm.py): imports over
# the shared 9p root are ~50x slower.
if [ -n "${KUBELVS_VM_IMAGES:-}" ]; then
    modprobe squashfs 2>/dev/null; modprobe loop 2>/dev/null
    for pair in $KUBELVS_VM_IMAGES; do
        mount -t squashfs -o loop,ro "${pair%%:*}" "${pair#*:}" \
            || echo "vm-guest-init: could not mount ${pair%%:*} (continuing over 9p)" >&2
    done
fi

if [ "${KUBELVS_VM_NETWORK:-}" = "user" ]; then
    # qemu user networking (slirp): the host's loopback is 10.0.2.2.  vng asks for eth0 + DHCP
    # (net.ifnames=0 virtme.dhcp), but udev renames the NIC here (enp0s9) and the DHCP client
    # never configures it, so configure it statically.  Deliberately NO default route: only
    # 10.0.2.0/24 is reachable, nothing from the guest can leak through slirp to other networks.
    nic=""
    for d in /sys/class/net/*; do
        [ -e "$d/device" ] || continue   # a real (virtio) NIC, not lo/tunnels/veth
        nic=${d##*/}
        break
    done
    if [ -n "$nic" ]; then
        # udev may or may not have renamed it, virtme's background udhcpc may or may not have
        # configured it (with a default route): wait for that client to finish, then take over.
        i=0
        while grep -qs udhcpc /proc/[0-9]*/comm && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
        echo 0 > "/proc/sys/net/ipv6/conf/$nic/accept_ra" 2>/dev/null
        ip link set "$nic" up
        ip -4 addr show dev "$nic" | grep -q 'inet ' || ip addr add 10.0.2.15/24 dev "$nic"
        while ip route del default 2>/dev/null; do :; done
        while ip -6 route del default 2>/dev/null; do :; done
    else
        echo "vm-guest-init: --network user but no NIC found" >&2
    fi
fi

if [ ! -e /proc/net/ip_vs ]; then
    echo "vm-guest-init: /proc/net/ip_vs missing after modprobe ip_vs (kernel $(uname -r))" >&2
fi

if [ -n "${KUBELVS_REPO:-}" ]; then
    cd "$KUBELVS_REPO" || exit 126
fi
[ "$#" -gt 0 ] || set -- /bin/sh
exec "$@"

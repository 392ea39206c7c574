"""The only part of kubelvs that talks to the kernel (through pyroute2's netlink sockets)."""

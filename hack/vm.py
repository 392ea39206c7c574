#!/usr/bin/env python3
"""Boot Debian's kernel (which has IPVS) in a virtme-ng VM and run one command inside it.

    python hack/vm.py [--rwdir DIR ...] [--network user] [--timeout S] [--log FILE]
                      [--env NAME=VALUE ...] [--verbose] -- CMD ARG...
    python hack/vm.py --vmout

The VM (``vng --disable-kvm``: TCG emulation, KVM hangs on this kind of machine) shares the
host's root filesystem read-only (with a throwaway writable /tmp, /etc, /var, ...), so the
checkout, the venv and ipvsadm are all there.  CMD runs as root with cwd = repo root after
``hack/vm-guest-init.sh`` has loaded the IPVS/tunnel modules; its exit status is ours.

Host directories given with ``--rwdir`` (outside /tmp) are shared read-write at the same path:
use one for results and logs.  Guest stdout goes to our stdout, guest stderr (and, with
--verbose, the kernel console) to our stderr.

The checkout may live anywhere, /tmp included, so the VM's output directory of a checkout is
not in it: ``python hack/vm.py --vmout`` creates and prints it,
``$KUBELVS_CACHE/vmout/<checkout name>-<hash of its path>`` (KUBELVS_CACHE defaults to
``${XDG_CACHE_HOME:-~/.cache}/kubelvs``; /var/tmp/kubelvs-<uid> if that is under /tmp), and
points the checkout's ``.vmout`` symlink at it.  The kernel tests and the benchmarks write there.

Stdlib only: also imported by tests/kernel/conftest.py (``run_in_vm``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
GUEST_INIT = REPO / "hack" / "vm-guest-init.sh"

# Exit status reported when the VM run hit its time limit (like timeout(1)).
TIMEOUT_STATUS = 124
# The guest script's first line, on its stderr: the VM booted. A boot under TCG takes 15-60 s here;
# one hung for 20 minutes at "Poking KASLR using RDRAND RDTSC..." (2026-12-04, make test): a VM
# without this line after BOOT_TIMEOUT is killed and booted once more.
GUEST_UP = "hack/vm.py: guest up"
BOOT_TIMEOUT = 300.0
# Exit status when the VM could not even be started (no vng, no kernel).
NOT_STARTED_STATUS = 125

# Guest-side state directories: / is read-only in the guest except /tmp, /etc, /var, ...
GUEST_HOME = "/tmp/kubelvs-vm/home"
GUEST_CACHE = "/tmp/kubelvs-vm/cache"
GUEST_TMP = "/tmp/kubelvs-vm/tmp"


class VMError(RuntimeError):
    """The VM cannot be started on this machine (no vng, no suitable kernel)."""


def under_tmp(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (symlinks resolved) is /tmp or inside it: the guest cannot write there."""
    resolved = Path(path).resolve()
    return resolved == Path("/tmp") or Path("/tmp") in resolved.parents


def _check_rwdirs(rwdirs: Sequence[str]) -> None:
    for d in rwdirs:
        if under_tmp(d):
            raise VMError(f"--rwdir {d}: must be outside /tmp (the guest's /tmp is a throwaway overlay)")
        Path(d).resolve().mkdir(parents=True, exist_ok=True)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$KUBELVS_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/kubelvs (as hack/cluster/build.sh)."""
    env = os.environ if environ is None else environ
    if env.get("KUBELVS_CACHE"):
        return Path(env["KUBELVS_CACHE"])
    xdg = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(xdg) / "kubelvs"


def vmout_dir(repo: str | os.PathLike[str] = REPO, environ: Mapping[str, str] | None = None) -> Path:
    """Where the VM writes for the checkout ``repo`` (results, logs): never under /tmp.

    ``$KUBELVS_VMOUT`` when set (hack/vm.py passes it to the guest, whose HOME differs), else
    ``<cache>/vmout/<checkout name>-<hash of its resolved path>``, unique per checkout, with
    <cache> from ``cache_dir()`` or, when that is under /tmp, ``/var/tmp/kubelvs-<uid>``.
    Pure apart from resolving ``repo``: nothing is created (see ``ensure_vmout``)."""
    env = os.environ if environ is None else environ
    if env.get("KUBELVS_VMOUT"):
        return Path(env["KUBELVS_VMOUT"])
    checkout = Path(repo).resolve()
    digest = hashlib.sha256(str(checkout).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", checkout.name).strip("-.") or "checkout"
    base = cache_dir(env)
    if under_tmp(base):
        base = Path("/var/tmp") / f"kubelvs-{os.getuid()}"
    return base / "vmout" / f"{name}-{digest}"


def ensure_vmout(repo: str | os.PathLike[str] = REPO) -> Path:
    """Create ``vmout_dir(repo)`` and point ``<repo>/.vmout`` at it (a convenience for people:
    programs use the returned path).  A real ``.vmout`` directory of an older layout is left
    alone."""
    out = vmout_dir(repo)
    if under_tmp(out):
        raise VMError(f"KUBELVS_VMOUT={out}: must be outside /tmp (the guest's /tmp is a throwaway overlay)")
    out.mkdir(parents=True, exist_ok=True)
    link = Path(repo) / ".vmout"
    with contextlib.suppress(OSError):  # a read-only checkout still works, without the link
        if link.is_symlink():
            if Path(os.readlink(link)) != out:
                link.unlink()
                link.symlink_to(out)
        elif not link.exists():
            link.symlink_to(out)
    return out


def _version_key(path: str) -> list[object]:
    """Sort key for /boot/vmlinuz-6.1.0-56-amd64 style names: numeric parts compare as numbers."""
    parts = re.split(r"(\d+)", os.path.basename(path))
    return [int(p) if p.isdigit() else p for p in parts]


def find_kernel() -> str:
    """The kernel image to boot: $KUBELVS_VM_KERNEL, else the newest /boot/vmlinuz-*-amd64."""
    env = os.environ.get("KUBELVS_VM_KERNEL")
    if env:
        if not os.path.exists(env):
            raise VMError(f"KUBELVS_VM_KERNEL={env} does not exist")
        return env
    found = sorted(glob.glob("/boot/vmlinuz-*-amd64"), key=_version_key)
    if not found:
        raise VMError(
            "no /boot/vmlinuz-*-amd64 kernel: install Debian's linux-image-amd64 "
            "(apt-get install linux-image-amd64 qemu-system-x86 ipvsadm busybox-static)"
        )
    kernel = found[-1]
    release = os.path.basename(kernel)[len("vmlinuz-") :]
    if not os.path.isdir(f"/lib/modules/{release}"):
        raise VMError(f"{kernel} has no /lib/modules/{release}: its modules (ip_vs, ipip) are missing")
    return kernel


def find_vng() -> str:
    """vng next to sys.executable (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "vng"
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("vng")
    if found:
        return found
    raise VMError(f"vng not found next to {sys.executable} nor on PATH: pip install virtme-ng")


def _guest_env(extra_env: dict[str, str] | None, network_user: bool = False) -> dict[str, str]:
    env: dict[str, str] = {}
    # Host variables of the project itself travel along (but never the in-VM marker).
    for key, value in os.environ.items():
        if key.startswith("KUBELVS_") and key != "KUBELVS_IN_VM":
            env[key] = value
    env.update(
        {
            "KUBELVS_IN_VM": "1",
            "KUBELVS_REPO": str(REPO),
            "KUBELVS_VMOUT": str(vmout_dir()),  # the guest's HOME differs: the host's answer
            "HOME": GUEST_HOME,
            "XDG_CACHE_HOME": GUEST_CACHE,
            "XDG_CONFIG_HOME": GUEST_HOME + "/.config",
            "XDG_RUNTIME_DIR": GUEST_TMP + "/run",
            "TMPDIR": GUEST_TMP,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "HYPOTHESIS_STORAGE_DIRECTORY": GUEST_CACHE + "/hypothesis",
            "LANG": "C.UTF-8",
            "TERM": os.environ.get("TERM", "dumb") or "dumb",
            "PATH": os.pathsep.join(
                [
                    str(Path(sys.executable).parent),
                    "/usr/local/sbin",
                    "/usr/local/bin",
                    "/usr/sbin",
                    "/usr/bin",
                    "/sbin",
                    "/bin",
                ]
            ),
        }
    )
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # e.g. another checkout's operator/
    if network_user:
        env["KUBELVS_VM_NETWORK"] = "user"  # hack/vm-guest-init.sh configures the NIC
    if extra_env:
        env.update(extra_env)
    return env


SQUASHFS_EXCLUDES = ["lib/python3*/test", "lib/python3*/idlelib", "lib/python3*/tkinter", "lib/python3*/ensurepip"]


def _newest_mtime(root: Path, files: bool = False) -> float:
    """The newest mtime of ``root``'s directories (a package installed or removed), and of its
    files too with ``files`` (a source edited in place changes no directory)."""
    newest = root.stat().st_mtime
    for dirpath, _dirs, names in os.walk(root):
        newest = max(newest, os.stat(dirpath).st_mtime)
        if files:
            newest = max([newest, *(os.stat(os.path.join(dirpath, n)).st_mtime for n in names)])
    return newest


def source_trees() -> list[Path]:
    """The directories kubelvs is imported from: this checkout's operator/ (the venv's editable
    install), and any PYTHONPATH entry holding a kubelvs package (another checkout's)."""
    trees = [REPO / "operator"]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "kubelvs").is_dir() and Path(entry).resolve() not in trees:
            trees.append(Path(entry).resolve())
    return [t for t in trees if (t / "kubelvs").is_dir()]


def python_images() -> list[tuple[Path, Path]]:
    """Squashfs images of this Python, its venv and kubelvs's sources (:func:`source_trees`),
    as (image, mount point) pairs.

    Under emulation every file lookup over the shared 9p root costs a virtio round trip:
    importing pyroute2 takes a minute that way. From a loop-mounted image (one file, read in
    large blocks and cached by the guest) the same import takes a second. kubelvs's own modules
    cost 50-200 ms each over 9p, 4 s for the CLI's imports (an installed kubelvs, in
    site-packages on a local disk, has no such cost). Images are rebuilt when a directory of
    the tree changed (a package installed or removed), a source tree's when any file did (its
    bytecode is compiled first, as the image is read-only); without mksquashfs the VM still
    works, slowly.
    """
    mksquashfs = shutil.which("mksquashfs")
    if mksquashfs is None:
        return []
    cache = cache_dir() / "vm"
    cache.mkdir(parents=True, exist_ok=True)
    trees = [Path(sys.base_prefix).resolve()]
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:
        trees.append(Path(sys.prefix).resolve())
    sources = source_trees()
    for tree in sources:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "kubelvs")], check=False)
    trees += sources
    images = []
    for tree in trees:
        image = cache / (re.sub(r"[^A-Za-z0-9]+", "-", str(tree)).strip("-") + ".sqfs")
        if not image.exists() or image.stat().st_mtime < _newest_mtime(tree, files=tree in sources):
            excludes = list(SQUASHFS_EXCLUDES)
            if in_venv and tree == trees[0]:
                excludes.append("lib/python3*/site-packages")  # the venv's own packages are used
            partial = image.with_suffix(".partial")
            subprocess.run(
                [mksquashfs, str(tree), str(partial), "-noappend", "-quiet", "-no-progress", "-comp", "lz4",
                 "-wildcards", "-e", *excludes],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            partial.replace(image)
        images.append((image, tree))
    return images


def _write_guest_script(cmd: Sequence[str], env: dict[str, str], cwd: Path) -> Path:
    """The script the guest runs.  It lives in the host's /tmp, which the guest sees (read-only
    lower layer of its /tmp overlay).  vng passes --exec on the kernel command line (base64, and
    the whole line is limited to 2 KiB), so only a short `exec /bin/sh <script>` goes there."""
    tmpdir = Path(tempfile.mkdtemp(prefix="kubelvs-vm-"))
    script = tmpdir / "run.sh"
    lines = ["#!/bin/sh", "# generated by hack/vm.py"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines.append(f"echo {shlex.quote(GUEST_UP)} >&2")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append("exec /bin/sh " + shlex.join([str(GUEST_INIT), *cmd]))
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return script


def vng_command(
    script: Path,
    rwdirs: Sequence[str],
    network_user: bool,
    verbose: bool,
    kernel: str,
    vng: str,
    memory: str,
    cpus: int,
) -> list[str]:
    cmd = [vng, "--disable-kvm", "--run", kernel, "--memory", memory, "--cpus", str(cpus)]
    # --force-9p: vng otherwise first tries virtiofsd for the root filesystem, which fails here
    # and costs seconds of waiting before it falls back to 9p anyway.
    cmd += ["--force-9p", "--cwd", str(REPO)]
    for d in rwdirs:
        cmd += ["--rwdir", str(Path(d).resolve())]
    if network_user:
        cmd += ["--network", "user"]
    if verbose:
        # Kernel console to our stderr, but only warnings and worse once booted (an info line per
        # veth/bridge port state change would flood the serial console, which is slow under TCG).
        cmd += ["--verbose", "--append", "loglevel=4"]
    cmd += ["--exec", f"exec /bin/sh {shlex.quote(str(script))}"]
    return cmd


def _pump(stream: IO[bytes], sinks: list[Callable[[str], None]]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
        if not line.endswith("\n"):
            line += "\n"
        for sink in sinks:
            with contextlib.suppress(Exception):  # a broken sink must not stall the VM's output
                sink(line)
    stream.close()


@contextlib.contextmanager
def vm_slot(announce: Callable[[str], None]) -> Iterator[None]:
    """Hold the machine's one VM slot (an flock under the cache) for the duration.

    Two emulated VMs at once starve each other (TCG has no hardware help): timings in the HA
    tests stretch past their bounds and captures drop frames. So runs queue here instead.
    """
    path = cache_dir() / "vm.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as slot:
        try:
            fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            announce(f"hack/vm.py: another VM run holds {path}; waiting for it\n")
            fcntl.flock(slot, fcntl.LOCK_EX)
        yield


def run_in_vm(
    cmd: list[str],
    rwdirs: list[str],
    timeout: float,
    network_user: bool = False,
    *,
    log_path: str | os.PathLike[str] | None = None,
    on_stdout: Callable[[str], None] | None = None,
    on_stderr: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    verbose: bool = False,
    memory: str = "2G",
    cpus: int = 2,
) -> int:
    """Boot the VM once, run ``cmd`` inside as root (cwd = repo root), return its exit status.

    ``rwdirs``: host directories (outside /tmp) shared read-write at the same path.
    ``timeout``: seconds for the whole run including boot; on expiry the VM is killed and
    TIMEOUT_STATUS (124) is returned.  NOT_STARTED_STATUS (125) if vng or the kernel is missing.
    Guest stdout goes to ``on_stdout`` (default: our stdout), guest stderr and the kernel console
    to ``on_stderr`` (default: our stderr); with ``log_path`` everything is also written there.
    ``env``: extra environment variables for the guest command.
    """
    log = open(log_path, "w", encoding="utf-8") if log_path is not None else None  # noqa: SIM115
    lock = threading.Lock()

    def to_log(line: str) -> None:
        if log is not None:
            with lock:
                log.write(line)
                log.flush()

    def default_out(line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()

    def default_err(line: str) -> None:
        sys.stderr.write(line)
        sys.stderr.flush()

    script_dir: Path | None = None
    slot: contextlib.AbstractContextManager[None] | None = None
    try:
        try:
            kernel = find_kernel()
            vng = find_vng()
            _check_rwdirs(rwdirs)
        except VMError as exc:
            to_log(f"hack/vm.py: {exc}\n")
            (on_stderr or default_err)(f"hack/vm.py: {exc}\n")
            return NOT_STARTED_STATUS
        guest_env = _guest_env(env, network_user)
        guest_env["KUBELVS_VM_IMAGES"] = " ".join(f"{image}:{mount}" for image, mount in python_images())
        script = _write_guest_script(cmd, guest_env, REPO)
        script_dir = script.parent
        argv = vng_command(script, rwdirs, network_user, verbose, kernel, vng, memory, cpus)
        host_env = dict(os.environ)
        bindir = str(Path(vng).parent)
        host_env["PATH"] = bindir + os.pathsep + host_env.get("PATH", "")  # vng calls virtme-run
        to_log(f"hack/vm.py: {shlex.join(argv)}\nhack/vm.py: guest command: {shlex.join(cmd)}\n")
        slot = vm_slot(on_stderr or default_err)
        slot.__enter__()  # released in the finally below; the timeout counts from here
        started = time.monotonic()
        for boot in (1, 2):
            up = threading.Event()

            def watch(line: str, up: threading.Event = up) -> None:
                if GUEST_UP in line:
                    up.set()

            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=host_env,
                cwd=str(REPO),
                start_new_session=True,  # own process group: a timeout kills vng and qemu together
            )
            assert proc.stdout is not None and proc.stderr is not None
            pumps = [
                threading.Thread(
                    target=_pump, args=(proc.stdout, [watch, to_log, on_stdout or default_out]), daemon=True
                ),
                threading.Thread(
                    target=_pump, args=(proc.stderr, [watch, to_log, on_stderr or default_err]), daemon=True
                ),
            ]
            for t in pumps:
                t.start()
            booting = time.monotonic()
            limit = min(BOOT_TIMEOUT, timeout - (booting - started))
            try:
                while not up.wait(1.0) and proc.poll() is None and time.monotonic() - booting < limit:
                    pass
            except BaseException:  # KeyboardInterrupt: do not leave a qemu behind
                _kill_group(proc)
                raise
            if boot == 1 and not up.is_set() and proc.poll() is None and time.monotonic() - started < timeout / 2:
                _kill_group(proc)
                for t in pumps:
                    t.join(timeout=10)
                hung = f"hack/vm.py: no guest after {limit:.0f} s (a hung boot): killed, booting again\n"
                to_log(hung)
                (on_stderr or default_err)(hung)
                continue
            break
        timed_out = False
        try:
            rc = proc.wait(timeout=max(0.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = TIMEOUT_STATUS
        except BaseException:  # KeyboardInterrupt: do not leave a qemu behind
            _kill_group(proc)
            raise
        for t in pumps:
            t.join(timeout=10)
        elapsed = time.monotonic() - started
        if timed_out:
            to_log(f"hack/vm.py: VM run exceeded {timeout:.0f} s and was killed\n")
        to_log(f"hack/vm.py: exit status {rc} after {elapsed:.1f} s\n")
        return rc
    finally:
        if slot is not None:
            slot.__exit__(None, None, None)
        if script_dir is not None:
            shutil.rmtree(script_dir, ignore_errors=True)
        if log is not None:
            log.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command as root inside a VM with Debian's kernel (IPVS, ipip).",
        usage="%(prog)s [--rwdir DIR ...] [--network user] [--timeout S] -- CMD ARG... | %(prog)s --vmout",
    )
    parser.add_argument(
        "--vmout",
        action="store_true",
        help="create this checkout's VM output directory (outside /tmp), link .vmout to it, print it; then exit",
    )
    parser.add_argument("--rwdir", action="append", default=[], help="host dir (outside /tmp) shared read-write")
    parser.add_argument("--network", choices=["user"], help="qemu user networking: host is 10.0.2.2")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    parser.add_argument("--log", help="also write all output to this file")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="guest environment")
    parser.add_argument("--verbose", action="store_true", help="kernel console (warnings and worse) on stderr")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.vmout:
        try:
            print(ensure_vmout())
        except (VMError, OSError) as exc:
            print(f"hack/vm.py: {exc}", file=sys.stderr)
            return 1
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    extra = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env {item!r}: expected NAME=VALUE")
        extra[name] = value
    return run_in_vm(
        cmd,
        args.rwdir,
        args.timeout,
        args.network == "user",
        log_path=args.log,
        env=extra,
        verbose=args.verbose,
        memory=args.memory,
        cpus=args.cpus,
    )


if __name__ == "__main__":
    sys.exit(main())

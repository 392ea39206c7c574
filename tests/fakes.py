"""An in-memory kernel for unit tests: IPVS (dump/apply with ApplyResult's semantics) and the VIP
interface, both able to fail on cue.

A shared :class:`Faults` counts kernel operations (one per IPVS request, one per address add or
remove). ``Faults(fail_at=k)`` makes operation k (0-based) fail instead of running: by raising
``IPVSError(ENOBUFS)`` (``kind="error"``: the outcome of the batch is unknown to the caller, and
operations before k did happen) or :class:`Killed` (``kind="kill"``: the process dies there; a
``BaseException``, so that no ``except Exception`` clean-up runs, as with SIGKILL).

    faults = Faults()
    ipvs, vips = FakeIPVS(faults), FakeVips(faults)
    Reconciler(ipvs, OwnershipStore(tmp), vips)
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kubelvs.core.model import Observed, ServiceKey, VirtualService
from kubelvs.core.plan import Operation, Verb
from kubelvs.core.plan import apply_operations as apply_in_memory
from kubelvs.kernel.addresses import ADDRESS_PROTO
from kubelvs.kernel.ipvs import ApplyResult, Failure, IPVSError


class Killed(BaseException):
    """The process died here (SIGKILL, the OOM killer)."""


@dataclass
class Faults:
    fail_at: int | None = None
    kind: str = "error"  # "error" (IPVSError ENOBUFS) or "kill" (Killed)
    count: int = 0

    def step(self) -> None:
        """Count one kernel operation; fail it if it is the chosen one."""
        index = self.count
        self.count += 1
        if self.fail_at is not None and index == self.fail_at:
            self.fail_at = None  # once
            if self.kind == "kill":
                raise Killed(f"killed at kernel operation {index}")
            raise IPVSError(errno.ENOBUFS, "IPVS answers were lost (receive buffer overrun): the outcome is unknown")


@dataclass
class FakeIPVS:
    """Stands in for IPVSClient: the IPVS table as a dict."""

    faults: Faults = field(default_factory=Faults)
    services: dict[ServiceKey, VirtualService] = field(default_factory=dict)
    dumps: int = 0
    applied: list[Operation] = field(default_factory=list)

    def dump(self, with_counters: bool = True) -> Observed:
        self.dumps += 1
        return Observed(services=dict(self.services))

    def apply(self, operations: Iterable[Operation]) -> ApplyResult:
        """Service operations first, then real servers (skipped for a service whose add failed),
        as IPVSClient.apply; a refused operation is a Failure with the kernel's errno."""
        ops = list(operations)
        result = ApplyResult()
        service_ops = [op for op in ops if op.verb in (Verb.ADD_SERVICE, Verb.EDIT_SERVICE, Verb.DELETE_SERVICE)]
        dest_ops = [op for op in ops if op not in service_ops]
        for op in service_ops:
            self._one(op, result)
        failed = {f.operation.key for f in result.failed if f.operation.verb is Verb.ADD_SERVICE}
        for op in dest_ops:
            if op.key in failed:
                result.skipped.append(op)
            else:
                self._one(op, result)
        return result

    def _one(self, op: Operation, result: ApplyResult) -> None:
        self.faults.step()
        error = self._refusal(op)
        if error:
            result.failed.append(Failure(op, error, ""))
            return
        self.services = apply_in_memory(self.services, [op])
        self.applied.append(op)
        result.succeeded.append(op)

    def _refusal(self, op: Operation) -> int:
        have = self.services.get(op.key)
        if op.verb is Verb.ADD_SERVICE:
            return errno.EEXIST if have is not None else 0
        if have is None:
            return errno.ESRCH
        if op.dest is None:
            return 0
        exists = op.dest.key in have.dest_map()
        if op.verb is Verb.ADD_DEST:
            return errno.EEXIST if exists else 0
        return 0 if exists else errno.ENOENT

    def count_services(self) -> int:
        return len(self.services)


@dataclass
class FakeVips:
    """Stands in for VipInterface: address -> IFA_PROTO (kubelvs's own mark on what it adds)."""

    faults: Faults = field(default_factory=Faults)
    present: dict[str, int] = field(default_factory=dict)
    families: dict[str, int] = field(default_factory=dict)
    reads: int = 0

    @contextlib.contextmanager
    def session(self) -> Iterator[FakeVips]:
        yield self

    def addresses(self) -> set[str]:
        self.reads += 1
        return set(self.present)

    def tagged(self) -> dict[str, int]:
        self.reads += 1
        return dict(self.present)

    def add(self, address: str, family: int) -> bool:
        if address in self.present:
            return False
        self.faults.step()
        self.present[address] = ADDRESS_PROTO
        self.families[address] = family
        return True

    def add_many(self, items: Sequence[tuple[str, int]]) -> list[bool | OSError]:
        return [self.add(address, family) for address, family in items]

    def remove(self, address: str, family: int) -> None:
        if address in self.present:
            self.faults.step()
            del self.present[address]

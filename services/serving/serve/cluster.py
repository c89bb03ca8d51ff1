"""What the front door needs to know of the Ray cluster: nodes that take conversations, and draining.

Draining is Ray's own (the GCS drain the autoscaler uses, reason "preemption", no deadline): Ray
stops placing anything on the node, what runs there goes on, and once the node is idle its raylet
shuts itself down. So a drained node finishes its conversations and then leaves the cluster by
itself; nothing here schedules around it, except that the front door stops the node's host actor
once it runs nothing (a live actor, even a 0-CPU one, keeps a drained node up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.serving.serve.conversation import SLOT_RESOURCE

DRAIN_MESSAGE = "voicebus serve: draining (no new conversations; the live ones finish)"
MIN_NODE_PREFIX = 6  # hex digits of a node id an operator must give (ids are 56)


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    slots: int
    draining: bool


class DrainError(Exception):
    """Why a drain request cannot be done (the message is the operator's answer, `status` its HTTP code)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def conversation_nodes(ray: Any) -> list[Node]:
    """Alive nodes that declare conversation slots, each with whether it is draining."""
    draining = draining_node_ids()
    nodes = []
    for node in ray.nodes():
        slots = int(node.get("Resources", {}).get(SLOT_RESOURCE, 0))
        if node.get("Alive") and slots:
            nodes.append(Node(node["NodeID"], node.get("NodeManagerAddress", ""), slots, node["NodeID"] in draining))
    return nodes


def draining_node_ids() -> set[str]:
    from ray._private import state  # the same view Ray Serve reads for draining nodes

    return set(state.state.get_draining_nodes())


def find_node(nodes: list[Node], prefix: str) -> Node:
    prefix = prefix.strip().lower()
    if len(prefix) < MIN_NODE_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise DrainError(f"give a node id (at least {MIN_NODE_PREFIX} hex digits, as /status shows it)")
    found = [node for node in nodes if node.node_id.startswith(prefix)]
    if not found:
        raise DrainError(f"no node taking conversations has an id starting {prefix!r}", status=404)
    if len(found) > 1:
        raise DrainError(f"{len(found)} nodes have ids starting {prefix!r}: give more of the id")
    return found[0]


def drain_node(ray: Any, node: Node) -> None:
    """Ask Ray's GCS to drain `node`; raises DrainError with Ray's reason when it refuses."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    client = GcsClient(address=ray.get_runtime_context().gcs_address)
    accepted, refusal = client.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), DRAIN_MESSAGE, 0)
    if not accepted:
        raise DrainError(f"Ray refused to drain {node.node_id[:12]}: {refusal}")

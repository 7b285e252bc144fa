"""Kubernetes NetworkPolicy semantics (networking.k8s.io/v1), evaluated over enumerated flows.

A flow is a TCP/UDP connection from a source (a pod, or an address outside the cluster) to a
destination (a pod, or an outside address) on a port. Kubernetes allows it when both ends allow it:

- egress at the source pod: no policy with policyType Egress selects the pod (then everything is
  allowed), or at least one egress rule of a selecting policy matches the destination and port;
- ingress at the destination pod: likewise with Ingress policies and the source.

A rule peer is a podSelector (pods of the policy's own namespace), a namespaceSelector (all pods of
the matching namespaces, by the labels a Pod's `namespace_labels` give its namespace), both
(matching pods in matching namespaces), or an ipBlock (addresses; pods are matched by their pod IP).
An empty selector matches everything; a rule without `to`/`from` matches every peer; a rule without
`ports` matches every port. Outside addresses have no policies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(default_factory=dict, hash=False)
    ip: str = "10.0.0.1"
    namespace_labels: dict = field(default_factory=dict, hash=False)  # besides kubernetes.io/metadata.name


@dataclass(frozen=True)
class Outside:
    name: str
    ip: str


def _matches(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _namespace_labels(pod: Pod) -> dict:
    return {**pod.namespace_labels, "kubernetes.io/metadata.name": pod.namespace}  # the latter: on every namespace


def _peer_matches(peer: dict, policy_ns: str, other) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(c) for c in block.get("except", []))
    if isinstance(other, Outside):
        return False  # selectors only ever match pods
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], _namespace_labels(other)):
            return False
    elif other.namespace != policy_ns:
        return False  # a podSelector alone means the policy's own namespace
    return _matches(peer.get("podSelector"), other.labels) if "podSelector" in peer else True


def _port_matches(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        low, high = p["port"], p.get("endPort", p["port"])
        if isinstance(low, int) and low <= port <= high:
            return True
    return False


def _types(policy: dict) -> list[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


def _allowed(policies: list[dict], pod: Pod, other, port: int, protocol: str, direction: str) -> bool:
    kind, rules_key, peers_key = ("Egress", "egress", "to") if direction == "egress" else ("Ingress", "ingress", "from")
    selecting = [p for p in policies if p["metadata"].get("namespace") == pod.namespace
                 and kind in _types(p) and _matches(p["spec"].get("podSelector") or {}, pod.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, pod.namespace, other) for peer in peers)) and \
                    _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(policies: list[dict], source, destination, port: int, protocol: str = "TCP") -> bool:
    """Whether the flow source → destination:port is allowed by `policies` (all namespaces)."""
    if isinstance(source, Pod) and not _allowed(policies, source, destination, port, protocol, "egress"):
        return False
    if isinstance(destination, Pod) and not _allowed(policies, destination, source, port, protocol, "ingress"):
        return False
    return True

"""A restarted hospital node ends the session its crashed predecessor left open.

A SuperNode killed without saying goodbye (SIGKILL, power loss) stays
online at the SuperLink until its heartbeat runs out (up to a minute), and
until then the SuperLink refuses to activate the same key again. The
Fleet API lets a node deactivate its own session: the request is signed with
the hospital's key and must name the node ID that key is registered as
(``flwr/superlink/routers/fleet/node_auth.py``), so only the key's holder can
end it. The node ID is the one the node's log recorded
(``SuperNode ID: N``) the last time the server accepted it.
"""

from __future__ import annotations

import re

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.fleet_pb2 import DeactivateNodeRequest
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from client.node import Link

NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def last_node_id(log_text: str) -> int | None:
    """The node ID the server last accepted this node as, from its log; None if never."""
    found = NODE_ID.findall(log_text)
    return int(found[-1]) if found else None


def end_previous_session(link: Link, node_id: int) -> str | None:
    """Deactivate ``node_id``'s session at the server, signed with the hospital's key.

    Returns:
        None when the server ended it, else why not (the caller then waits
        for the session to run out).
    """
    if link.key is None or link.ca is None:
        return "no key (--insecure)"
    key = load_ssh_private_key(link.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return f"{link.key} is not an EC key"
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(key, key.public_key())]
    try:
        with FleetHttpClient.from_server_address(link.superlink, False, str(link.ca.resolve()),
                                                 interceptors=interceptors) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, RuntimeError, ValueError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None

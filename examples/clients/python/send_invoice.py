#!/usr/bin/env python3
"""Sends one invoice notification through kabar and reads its status back.

    pip install grpcio grpcio-tools grpcio-health-checking
    KABAR_API_KEY=kabar_... python3 send_invoice.py --target 127.0.0.1:50051

Steps: gRPC health of kabar.v1.NotificationService, SendTemplate (the built-in
invoice_notification template, with the caller's API key as `authorization: Bearer <key>`),
then GetMessageStatus of the message id kabar answered. The Python classes are generated from
proto/kabar/v1/kabar.proto at start, into a temporary directory: nothing generated is kept.

Output, one line each: `health: SERVING`, `message_id: wamid...`, `phone: +62...`,
`status: ACCEPTED ...`. On a gRPC error it prints the code and message on stderr and exits 1.
"""

import argparse
import importlib
import importlib.resources
import os
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

# The repository's proto directory, three levels up from this file.
DEFAULT_PROTO_DIR = Path(__file__).resolve().parents[3] / "proto"


def generate_stubs(proto_dir: Path, out_dir: str):
    """Compiles kabar.proto into out_dir and returns the (messages, services) modules."""
    # The well-known types (google/protobuf/timestamp.proto) ship with grpcio-tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "kabar/v1/kabar.proto",
        ]
    )
    if status != 0:
        sys.exit(f"error: protoc could not compile {proto_dir}/kabar/v1/kabar.proto")
    sys.path.insert(0, out_dir)
    return (
        importlib.import_module("kabar.v1.kabar_pb2"),
        importlib.import_module("kabar.v1.kabar_pb2_grpc"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("KABAR_TARGET", "127.0.0.1:50051"),
        help="kabar's gRPC address, host:port (default: $KABAR_TARGET or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--phone", default="0812-3456-7890", help="the customer's phone number"
    )
    parser.add_argument(
        "--proto-dir",
        type=Path,
        default=DEFAULT_PROTO_DIR,
        help="kabar's proto directory",
    )
    args = parser.parse_args()
    # The key comes from the environment, not the command line (where `ps` would show it).
    api_key = os.environ.get("KABAR_API_KEY", "")

    with tempfile.TemporaryDirectory(prefix="kabar-stubs-") as out_dir:
        kabar_pb2, kabar_pb2_grpc = generate_stubs(args.proto_dir, out_dir)

    # Plaintext gRPC: kabar listens on a private network. With TLS on kabar's port
    # (KABAR_TLS_CERT_FILE), use grpc.secure_channel with grpc.ssl_channel_credentials().
    with grpc.insecure_channel(args.target) as channel:
        try:
            # Health is open: no key needed. It is also what a load balancer asks.
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="kabar.v1.NotificationService"),
                timeout=5,
            )
            print(
                f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
            )

            metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
            notifications = kabar_pb2_grpc.NotificationServiceStub(channel)
            invoice = "INV-2026-11-0042"
            sent = notifications.SendTemplate(
                kabar_pb2.SendTemplateRequest(
                    phone=args.phone,
                    template="invoice_notification",
                    params={
                        "nama": "Budi Santoso",
                        "periode": "November 2026",
                        "no_invoice": invoice,
                        "paket": "Internet 20 Mbps",
                        "nominal": "Rp 166.500",
                        "jatuh_tempo": "10-12-2026",
                        "customer_id": "CUST-0042",
                    },
                    # Stable per message: a retry after a timeout gets the first answer back
                    # instead of a second WhatsApp message.
                    idempotency_key=f"invoice-{invoice}",
                    reference=invoice,
                ),
                metadata=metadata,
                timeout=10,
            )
            print(f"message_id: {sent.message_id}")
            print(f"phone: {sent.phone}")

            status = notifications.GetMessageStatus(
                kabar_pb2.GetMessageStatusRequest(message_id=sent.message_id),
                metadata=metadata,
                timeout=5,
            )
            state = kabar_pb2.MessageStatus.State.Name(status.state)
            print(
                f"status: {state} template={status.template} reference={status.reference}"
            )
        except grpc.RpcError as e:
            # Decide on the code (and the ErrorInfo reason in the details), not on the text.
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An upstream that bears witness: it counts every connection the gateway
opens to it and, when asked, reads the PROXY protocol v2 header the
gateway sends first and answers with what it found.

Usage: witness_upstream.py PORT STATUS_FILE [--proxy-protocol]

STATUS_FILE holds {"accepted": N} as JSON. It is rewritten (to a
temporary name, then renamed) right after each accept and before the
connection is served, so a reader never sees half a file and never sees
a connection served that is not yet counted.

With --proxy-protocol, each connection must start with a v2 header. The
upstream decodes it and sends one JSON line back before echoing: the
command, family, addresses, the ALPN (0x01) and authority (0x02) TLVs
and the SSL TLV (0x20) with its client flags, verify result and
sub-TLVs (version 0x21, CN 0x22, cipher 0x23). A header it cannot
decode gets {"error": "..."} and the connection is closed.
Without the flag, every byte is echoed from the start.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
COMMANDS = {0x20: "LOCAL", 0x21: "PROXY"}
FAMILIES = {0x00: "UNSPEC", 0x11: "TCP4", 0x21: "TCP6"}
SSL_SUBTYPES = {0x21: "version", 0x22: "cn", 0x23: "cipher"}
# A header with a few short TLVs is far below this; more is not a header.
LONGEST_BODY = 4096


class HeaderError(Exception):
    """The connection did not start with a PROXY v2 header we can read."""


def read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise HeaderError(f"the stream ended after {len(data)} of {count} bytes")
        data += chunk
    return data


def tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Type-length-value items, as PROXY v2 lays them out."""
    items = []
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise HeaderError("a TLV is cut short")
        kind, length = data[offset], struct.unpack_from("!H", data, offset + 1)[0]
        value = data[offset + 3 : offset + 3 + length]
        if len(value) != length:
            raise HeaderError(f"TLV 0x{kind:02x} claims {length} bytes, has {len(value)}")
        items.append((kind, value))
        offset += 3 + length
    return items


def address(family: str, body: bytes) -> tuple[str, str, bytes]:
    """(source, destination, what follows) for the address block."""
    if family == "TCP4":
        size, af = 4, socket.AF_INET
    elif family == "TCP6":
        size, af = 16, socket.AF_INET6
    else:
        return "", "", body
    if len(body) < 2 * size + 4:
        raise HeaderError("the address block is cut short")
    source = socket.inet_ntop(af, body[:size])
    destination = socket.inet_ntop(af, body[size : 2 * size])
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    rest = body[2 * size + 4 :]
    return f"{source}:{source_port}", f"{destination}:{destination_port}", rest


def parse_header(conn: socket.socket) -> dict[str, object]:
    fixed = read_exactly(conn, 16)
    if fixed[:12] != SIGNATURE:
        raise HeaderError(f"no v2 signature: {fixed[:12]!r}")
    if fixed[12] not in COMMANDS:
        raise HeaderError(f"version/command byte 0x{fixed[12]:02x}")
    if fixed[13] not in FAMILIES:
        raise HeaderError(f"family byte 0x{fixed[13]:02x}")
    length = struct.unpack_from("!H", fixed, 14)[0]
    if length > LONGEST_BODY:
        raise HeaderError(f"body of {length} bytes")
    body = read_exactly(conn, length)

    family = FAMILIES[fixed[13]]
    source, destination, rest = address(family, body)
    header: dict[str, object] = {
        "command": COMMANDS[fixed[12]],
        "family": family,
        "source": source,
        "destination": destination,
        "types": [],
    }
    for kind, value in tlvs(rest):
        header["types"].append(kind)  # type: ignore[attr-defined]
        if kind == 0x01:
            header["alpn"] = value.decode()
        elif kind == 0x02:
            header["authority"] = value.decode()
        elif kind == 0x20:
            header["ssl"] = ssl_tlv(value)
    return header


def ssl_tlv(value: bytes) -> dict[str, object]:
    if len(value) < 5:
        raise HeaderError("the SSL TLV is shorter than its fixed part")
    client = value[0]
    verify = struct.unpack_from("!I", value, 1)[0]
    found: dict[str, object] = {"client": client, "verify": verify, "subtypes": []}
    for kind, sub in tlvs(value[5:]):
        found["subtypes"].append(kind)  # type: ignore[attr-defined]
        if kind in SSL_SUBTYPES:
            found[SSL_SUBTYPES[kind]] = sub.decode(errors="replace")
    return found


def serve(conn: socket.socket, proxy_protocol: bool) -> None:
    with conn:
        try:
            if proxy_protocol:
                try:
                    header = parse_header(conn)
                except HeaderError as err:
                    conn.sendall(json.dumps({"error": str(err)}).encode() + b"\n")
                    return
                conn.sendall(json.dumps(header).encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            # The gateway reset the connection: nothing is left to answer.
            return


def report(path: str, accepted: int) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump({"accepted": accepted}, handle)
    os.replace(temporary, path)


def main() -> None:
    port, status = int(sys.argv[1]), sys.argv[2]
    proxy_protocol = "--proxy-protocol" in sys.argv[3:]
    listener = socket.create_server(("127.0.0.1", port), backlog=512)
    accepted = 0
    report(status, accepted)
    while True:
        conn, _ = listener.accept()
        accepted += 1
        report(status, accepted)
        threading.Thread(target=serve, args=(conn, proxy_protocol), daemon=True).start()


if __name__ == "__main__":
    main()

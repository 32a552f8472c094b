"""The baseline peer: a TLS-terminating proxy in plain asyncio and ssl.

Usage: asyncio_proxy.py --listen HOST:PORT --upstream HOST:PORT
                        --certificate PEM --key PEM

One process, one event loop, the stream API: `asyncio.start_server`
with a server `SSLContext` completes the handshake, then each connection
opens its upstream and copies bytes both ways until both directions
end. This is the proxy a Python programmer would write first, which is
what the benchmark compares spicegw against.

TLS settings are OpenSSL's defaults for a server context (TLS 1.2 and
1.3, two session tickets per connection), as a Python programmer would
leave them. It prints `ready` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

# Bytes read from one side before they are written to the other.
RELAY_CHUNK = 64 * 1024

# Same order of magnitude as spicegw's listener backlog.
BACKLOG = 1024


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies until end of stream, then passes the end on: a half-close
    where the transport allows one (TCP), a full close otherwise (TLS)."""
    while data := await reader.read(RELAY_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    else:
        writer.close()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # A peer that vanished mid-close has nothing more to tell us.
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


class Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream

    async def serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # asyncio calls us once the TLS handshake is complete.
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            await close(client_writer)
            return

        # A reset on either side ends the connection: its error is
        # returned rather than raised, and both sides are closed below.
        await asyncio.gather(
            pump(client_reader, upstream_writer),
            pump(upstream_reader, client_writer),
            return_exceptions=True,
        )
        await close(upstream_writer)
        await close(client_writer)


async def run(args: argparse.Namespace) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.certificate, args.key)

    host, port = address(args.listen)
    proxy = Proxy(address(args.upstream))
    server = await asyncio.start_server(
        proxy.serve, host, port, ssl=context, backlog=BACKLOG, reuse_address=True
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with server:
        print("ready", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--key", required=True)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

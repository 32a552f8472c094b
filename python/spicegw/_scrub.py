"""Hiding private keys given inline from `ps` and /proc.

`--tls-key "$PEM"` puts a private key in the process's command line,
which every local user can read, and often in its environment too. Once
the key is loaded, we overwrite it in place in the memory the kernel
shows as /proc/<pid>/cmdline and /proc/<pid>/environ (the MySQL client
does the same with passwords). Workers forked afterwards inherit the
scrubbed memory.
"""

from __future__ import annotations

import re

_PRIVATE_KEY = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|(?=\0)|\Z)",
    re.DOTALL,
)


def scrub_private_keys() -> int:
    """Overwrites every PEM private key in this process's original command
    line and environment with '*'; returns how many were hidden.

    Raises OSError when /proc does not allow it.
    """
    with open("/proc/self/stat", "rb") as handle:
        fields = handle.read().rsplit(b")", 1)[1].split()
    # Fields 48 to 51 of stat(5): arg_start, arg_end, env_start, env_end;
    # the list starts at field 3.
    arg_start, arg_end, env_start, env_end = (int(value) for value in fields[45:49])
    hidden = 0
    with open("/proc/self/mem", "r+b", buffering=0) as memory:
        for start, end in ((arg_start, arg_end), (env_start, env_end)):
            memory.seek(start)
            block = memory.read(end - start)
            scrubbed, count = _PRIVATE_KEY.subn(lambda m: b"*" * len(m.group(0)), block)
            if count:
                memory.seek(start)
                memory.write(scrubbed)
                hidden += count
    return hidden

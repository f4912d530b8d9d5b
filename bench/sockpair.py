#!/usr/bin/env python3
"""Physical reference: what an idle loopback TCP connection costs, with no WebSocket and no app.

Opens N connected TCP socket pairs on 127.0.0.1 in this one process (2N sockets, so N stays under
half the 20,000 open-files cap), then reads, before and after:
  - this process's VmRSS (/proc/self/status): user-space cost, here Python socket objects;
  - Slab and MemAvailable (/proc/meminfo): the kernel's cost (struct tcp_sock, file, inode, ...),
    which no process's RSS shows, whatever the server is written in;
  - /proc/net/sockstat: sockets in use and pages of TCP buffer memory (0 for idle sockets).
Prints one JSON line. Usage: sockpair.py [N]
"""
import json
import socket
import sys
import time


def meminfo():
    out = {}
    for line in open('/proc/meminfo'):
        k, v = line.split(':', 1)
        out[k] = int(v.split()[0])
    return out


def rss_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
    return 0


def sockstat():
    for line in open('/proc/net/sockstat'):
        if line.startswith('TCP:'):
            f = line.split()[1:]
            return {f[i]: int(f[i + 1]) for i in range(0, len(f), 2)}
    return {}


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    lst = socket.socket()
    lst.bind(('127.0.0.1', 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
    time.sleep(0.2)
    m0, r0, s0 = meminfo(), rss_kib(), sockstat()
    pairs = []
    t0 = time.monotonic()
    for _ in range(n):
        c = socket.socket()
        c.connect(('127.0.0.1', port))
        a, _ = lst.accept()
        pairs.append((c, a))
    secs = time.monotonic() - t0
    time.sleep(1.0)
    m1, r1, s1 = meminfo(), rss_kib(), sockstat()
    socks = 2 * n
    slab = m1['Slab'] - m0['Slab']
    unrecl = m1.get('SUnreclaim', 0) - m0.get('SUnreclaim', 0)
    avail = m0['MemAvailable'] - m1['MemAvailable']
    out = {
        'scenario': 'tcp_socket_pairs',
        'pairs': n,
        'sockets': socks,
        'connect_accept_per_s': round(n / secs, 1),
        'process_rss_kib_per_socket': round((r1 - r0) / socks, 3),
        'kernel_slab_kib_per_socket': round(slab / socks, 3),
        'kernel_sunreclaim_kib_per_socket': round(unrecl / socks, 3),
        'memavailable_drop_kib_per_socket': round(avail / socks, 3),
        'sockstat_tcp_before': s0,
        'sockstat_tcp_after': s1,
        'tcp_buffer_pages_delta': s1.get('mem', 0) - s0.get('mem', 0),
        'note': 'machine is shared: Slab/MemAvailable deltas include other processes\' activity',
    }
    for c, a in pairs:
        c.close()
        a.close()
    lst.close()
    print(json.dumps(out))


if __name__ == '__main__':
    main()

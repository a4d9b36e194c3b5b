"""The anchor side of `cargo xtask bench`: QEMU's Python QMP client (`qemu.qmp` from PyPI)
running the same loops as our client, driven block by block so the runs interleave.

fd 3 is a QMP monitor socket (QEMU's end is the other half of a socketpair), fd 4 the control
socket. Each control line is a request, each answer one line:

    roundtrip N  ->  "wall_ns user_ns system_ns"           N `query-status` round trips
    events K     ->  "wall_ns user_ns system_ns received"  K `stop`/`cont` pairs, each
                                                           command's STOP/RESUME event awaited
    quit         ->  the client disconnects and the script ends

CPU times are this process's own (getrusage), so QEMU's time is not counted.
"""

import asyncio
import resource
import socket
import time

from qemu.qmp import EventListener, QMPClient


def cpu_ns():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_utime * 1e9), int(usage.ru_stime * 1e9)


async def main():
    monitor = socket.socket(fileno=3)
    control = socket.socket(fileno=4)
    reader, writer = await asyncio.open_connection(sock=control)
    qmp = QMPClient("bench")
    await qmp.connect(monitor)
    listener = EventListener(("STOP", "RESUME"))
    qmp.register_listener(listener)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            break
        count = int(line[1])
        user0, system0 = cpu_ns()
        start = time.perf_counter_ns()
        received = 0
        if line[0] == "roundtrip":
            for _ in range(count):
                await qmp.execute("query-status")
        elif line[0] == "events":
            # Every monitor gets every event: a first round trip brings in those the other
            # sides caused, and they are dropped (as our side does).
            await qmp.execute("query-status")
            listener.clear()
            for _ in range(count):
                await qmp.execute("stop")
                await listener.get()
                await qmp.execute("cont")
                await listener.get()
                received += 2
        else:
            raise SystemExit(f"unknown request {line!r}")
        wall = time.perf_counter_ns() - start
        user1, system1 = cpu_ns()
        answer = f"{wall} {user1 - user0} {system1 - system0} {received}\n"
        writer.write(answer.encode())
        await writer.drain()
    await qmp.disconnect()
    writer.close()


asyncio.run(main())

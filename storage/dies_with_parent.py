"""Imported into a process, makes it end when the process that started it ends, however that ends.

multiprocessing's forkserver imports its preload modules when it starts and has no other hook:
``flows/stage.py`` preloads this module, so the server that forks the parse workers dies with the
command, SIGKILL included (it otherwise lived on, with a worker and the resource tracker, after
`kill -9` of `medlm ingest`), and with it the workers (their initializer, ``die_with_parent``,
ties each to the server) and, its pipes closed, the tracker. Linux's parent-death signal would
not do for the server itself: it fires when the *thread* that started the process ends, and the
flow's task threads that start it come and go. The parent's PID comes in MEDLM_PARENT_PID, since
the parent may be gone before this is imported (then its orphan's parent is another process).
"""

import os
import threading
import time

from storage.settings import settings

_PARENT = settings().parent_pid or os.getppid()


def _watch() -> None:
    while os.getppid() == _PARENT:  # once the parent is gone, another process adopts us
        time.sleep(0.5)
    os._exit(1)


threading.Thread(target=_watch, name="dies-with-parent", daemon=True).start()

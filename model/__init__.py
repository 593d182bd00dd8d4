"""The network, its data, checkpoints and training loops: plain PyTorch, runnable without Prefect.
Importing any of it sets torch's threads from the cores this process may use (model/threads.py)."""

from model.threads import use_default_threads

use_default_threads()

"""What a simulated site's Ray worker imports when it starts, before it is given a site.

Imported by every worker of the local Ray that ``fedmsk simulate`` starts (Ray's
``preload_python_modules`` setting, ``RAY_preload_python_modules``: the raylet starts each Python
worker with ``--worker-preload-modules``), and called as the ``worker_process_setup_hook`` of a
cluster joined through ``simulation.ray_address`` (``warm``). Either way the worker pays torch,
Flower, MONAI and fedmsk's ClientApp (several seconds of CPU) while the driver is still importing
and composing, not on its first message.

Kept apart from ``simulation.runner``, which imports the ServerApp: a worker plays sites only.
"""

from __future__ import annotations

import os


def warm() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    import monai.data  # noqa: F401  (shared.sitedata's datasets)

    import client.secagg_app  # noqa: F401  (client.app, the trainer, the models)
    import shared.sitedata  # noqa: F401


if os.environ.get("RAY_preload_python_modules", "").split(",").count(__name__):  # imported by Ray's worker start
    warm()

"""Imported once by the stage zygote (services/zygote.py) before it forks any stage: everything the
stages of a pipeline import, then frozen out of the garbage collector's sight (copy-on-write stays
shared: a child's collections never write to these objects' headers)."""

import gc
import os
import warnings

# numpy's BLAS would start a thread pool in the zygote; stages do no linear algebra worth threads
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy  # noqa: E402, F401
import zmq  # noqa: E402, F401

import common.runner  # noqa: E402, F401
import services.bus  # noqa: E402, F401
import services.cli  # noqa: E402, F401
import services.gateway.stage  # noqa: E402, F401
import services.logger.stage  # noqa: E402, F401
import services.resampler  # noqa: E402, F401
import services.tools.stage  # noqa: E402, F401
import services.web.stage  # noqa: E402, F401
from common.realtime_types import client_event_models, server_event_models  # noqa: E402

# the gateway imports the openai SDK's realtime event types on first use: the GA ones, built once here
client_event_models("ga")
server_event_models("ga")
# each forked child re-runs the launcher's main module (`-m services.cli`) as multiprocessing does,
# already imported here; runpy's warning about that says nothing useful
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package.*")

gc.collect()
gc.freeze()

"""Imported once by the stage zygote (services/zygote.py) before it forks any stage: everything the
stages of a pipeline import, then frozen out of the garbage collector's sight (copy-on-write stays
shared: a child's collections never write to these objects' headers)."""

import gc
import os

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

gc.collect()
gc.freeze()

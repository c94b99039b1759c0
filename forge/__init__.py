"""Forge: fine-tune an open model end to end — dataset → LoRA/QLoRA → merge → GGUF → Ollama → seal."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning. torch's CPU kernels run on libgomp, whose idle
# threads spin; when another process wants the same cores (a second job, a busy laptop) every
# barrier waits on a descheduled spinner. Measured on 2 cores with both loaded: 60 training steps
# of the tiny model took 172 s spinning and 16 s passive; on a quiet machine both took 13 s.
# libgomp reads this when torch is first imported, so it is set here, before any torch import,
# and every process Forge starts (workers, torchrun ranks, Ray jobs) inherits it. Set
# OMP_WAIT_POLICY=ACTIVE yourself to have the spinning back.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""Memory (and time) planner for the long-video methods.

    from longvideo.planner import plan
    p = plan("fifo", "wan2.1-t2v-1.3b", 480, 832, 241, "bfloat16", gpu_memory="24GB")
    print(p.summary())          # phases, the peak's breakdown by component, recorded time, the choice
    p.peak_bytes, p.components(), p.settings, p.choice, p.time

* :func:`plan` (``estimate``): predicted peak GPU memory per phase and component, the fastest
  settings that fit a given GPU, and the time per step from the benchmark records.
* ``models``: known public configs (``known_model_names()``) and local checkpoint folders
  (config files only, never weights).
* ``activations``: the op-by-op models of one transformer / UNet / VAE call, through the liveness
  simulator of ``sim``.
* :class:`LiveTensorTracker` (``tracker``): a TorchDispatchMode counting the bytes of live
  storages allocated inside it, and the peak: what the tests measure the predictions against.

On the command line: ``longvideo plan`` (longvideo/cli/plan.py).
"""
from .estimate import (DECODE_MODES, METHODS, OFFLOAD_MODES, Part, Phase, Plan, Settings, TimeEstimate, format_bytes,
                       parse_bytes, plan)
from .models import KNOWN_MODELS, ModelSpec, known_model_names, load_model_spec, spec_from_pipeline
from .tracker import LiveTensorTracker, track_peak

__all__ = ["plan", "Plan", "Phase", "Part", "Settings", "TimeEstimate", "METHODS", "OFFLOAD_MODES", "DECODE_MODES",
           "parse_bytes", "format_bytes", "ModelSpec", "KNOWN_MODELS", "known_model_names", "load_model_spec",
           "spec_from_pipeline", "LiveTensorTracker", "track_peak"]

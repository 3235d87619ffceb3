"""Build progress from TensorRT's IProgressMonitor, as plain log lines (make's output is not a terminal).

Engine builds take minutes; one line per phase (top two levels only) and a line
each time a phase passes another quarter of its steps is enough to see it moving.
"""
from __future__ import annotations

import time


def monitor(trt, label: str):
    """An IProgressMonitor for config.progress_monitor, or None on TensorRT without the interface."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _LogMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._phases: dict[str, dict] = {}

        def _say(self, phase: dict, text: str) -> None:
            if phase["depth"] <= 1:
                print(f"[tensorrt {label}] {'  ' * phase['depth']}{text}", flush=True)

        def phase_start(self, phase_name, parent_phase, num_steps):
            parent = self._phases.get(parent_phase) if parent_phase else None
            phase = {"depth": parent["depth"] + 1 if parent else 0, "steps": max(int(num_steps), 1),
                     "quarter": 0, "t0": time.perf_counter()}
            self._phases[phase_name] = phase
            self._say(phase, f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            phase = self._phases.get(phase_name)
            if phase is not None:
                quarter = 4 * (int(step) + 1) // phase["steps"]
                if quarter > phase["quarter"] and quarter < 4:
                    phase["quarter"] = quarter
                    self._say(phase, f"{phase_name} {25 * quarter}%")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            phase = self._phases.pop(phase_name, None)
            if phase is not None:
                self._say(phase, f"{phase_name} done in {time.perf_counter() - phase['t0']:.1f} s")

    return _LogMonitor()

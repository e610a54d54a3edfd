"""Step of rule `simulate_demo`: the demo data set (simulated particles, truth, initial models)."""

from __future__ import annotations

from collections.abc import Mapping

from hetrefine.simulate import SimulationSpec, simulate_dataset


def simulate_demo(out_dir: str, settings: Mapping) -> None:
    """Simulate the demo data set described by ``settings['demo']`` into ``out_dir``."""
    d = settings["demo"]
    spec = SimulationSpec(
        n_particles=int(d["n_particles"]),
        n_classes=int(d["n_classes"]),
        box=int(d["box"]),
        pixel_size=float(d["pixel_size"]),
        snr=float(d["snr"]),
        domain_fraction=float(d["domain_fraction"]),
        junk_fraction=float(d["junk_fraction"]),
        decoy=bool(d["decoy"]),
        seed=int(d["seed"]),
        initial_scale=float(d.get("initial_scale", 1.0)),
    )
    simulate_dataset(spec, out_dir)

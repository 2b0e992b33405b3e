"""The fleet simulator: GPU and model profiles, physics, batching core, discrete-event replay."""

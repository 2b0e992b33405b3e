"""The fleet simulator: a model layer (profiles, physics, core, builders) and a replay layer (fleet, hooks, trace).

The model layer is what the live simulated engine runs on: GPU and model profiles, the physics of
an iteration, the batching core and the builders that make a replica's core from its config. The
replay layer drives that model through a trace in virtual time (the event loop, routing and
governor hooks, results) and is used only by `wattlane sim` and the benchmarks. The model layer
never imports the replay layer.
"""
